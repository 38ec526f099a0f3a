"""Weight sources: one interface over live modules, safetensors and GGUF files (see source.py)."""

from ktinject.weights.gguf_source import GGUFSource
from ktinject.weights.safetensors_source import SafetensorsSource
from ktinject.weights.source import ModuleSource, RawTensor, TensorInfo, WeightSource

__all__ = ["GGUFSource", "ModuleSource", "RawTensor", "SafetensorsSource", "TensorInfo", "WeightSource"]
