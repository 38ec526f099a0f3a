"""Weight sources: one interface over live modules, safetensors and GGUF files (see source.py)."""

from ktinject.weights.source import ModuleSource, TensorInfo, WeightSource

__all__ = ["ModuleSource", "TensorInfo", "WeightSource"]
