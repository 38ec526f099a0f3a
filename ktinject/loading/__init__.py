"""``ktinject.from_pretrained``: big models built on ``meta``, rules applied, weights streamed in.

    model = ktinject.from_pretrained("/models/DeepSeek-V3", gguf="DeepSeek-V3-Q4_K_M-00001-of-00009.gguf")
    model.generate(...)

The pipeline (docs/ARCHITECTURE.md, "The pipeline"): config -> model on meta -> plan -> operators built on meta ->
every needed tensor resolved against the weights (one error listing all problems, before anything is
read) -> weights streamed (mmap, chunked dequantization, progress bar) -> nothing left on meta.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ktinject.errors import KtInjectError
from ktinject.injection import PLAN_ATTRIBUTE, inject
from ktinject.loading.model import (
    PathLike,
    build_meta_model,
    load_generation_config,
    open_source,
    resolve_config,
    resolve_dtype,
    sort_inputs,
)
from ktinject.loading.needs import check_needs, collect_needs, tensor_specs, tied_aliases
from ktinject.loading.stream import LoadStats, add_input_movers, check_nothing_on_meta, place_buffers, stream_weights
from ktinject.rules import RulesLike

logger = logging.getLogger("ktinject")

__all__ = ["LoadStats", "from_pretrained"]

DeviceMap = str | torch.device | Mapping[str, str | torch.device] | None


def device_placer(device_map: DeviceMap) -> Callable[[str], torch.device]:
    """Where tensors of modules that no rule places go: ``device_map`` is a device, or HF-style
    ``{module prefix: device}`` (longest prefix wins; ``""`` is the root); default CPU."""
    if device_map is None:
        return lambda name: torch.device("cpu")
    if isinstance(device_map, (str, torch.device)):
        if str(device_map) == "auto":
            raise KtInjectError(
                "device_map='auto' is not supported: placement is the rules' job (device_map only "
                "places modules that no rule claims); give a device or {module: device}"
            )
        device = torch.device(device_map)
        return lambda name: device
    table = {prefix: torch.device(dev) for prefix, dev in device_map.items()}

    def place(name: str) -> torch.device:
        best = None
        for prefix in table:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best):
                    best = prefix
        return table[best] if best is not None else torch.device("cpu")

    return place


def from_pretrained(
    model_dir_or_config: Any = None,
    *,
    rules: RulesLike = "auto",
    gguf: PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: DeviceMap = None,
    vars: Mapping[str, Any] | None = None,
    progress: bool = True,
    **hf_kwargs: Any,
):
    """Build a model from local weights with ``rules`` applied; returns a ready ``PreTrainedModel``.

    - ``model_dir_or_config``: a model directory (config.json, safetensors, tokenizer), a config.json, a
      ``PretrainedConfig``, a ``.gguf`` file, or None when ``gguf=`` is given.
    - ``gguf``: a GGUF file (any file of a ``-0000k-of-0000N.gguf`` split set); weights come from it, else
      from the directory's safetensors. Without a config.json the config comes from the GGUF metadata.
    - ``rules``: as for ``optimize`` (``"auto"`` picks the family's built-in file); ``vars`` override rule
      variables (``{"gpu": "cpu"}`` runs the built-in rules without a GPU).
    - ``dtype``: the model's dtype (dequantized weights are converted to it); default: the config's, else bfloat16.
    - ``device_map``: where modules that no rule places go (default CPU); placement is otherwise the rules'.
    - ``hf_kwargs`` go to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation="sdpa"``).

    Raises ``WeightError`` listing every missing or mis-shaped tensor (with the rule that needed it) before
    reading any weight, and when a GGUF/safetensors file is truncated or corrupt.
    """
    start = time.perf_counter()
    inputs = sort_inputs(model_dir_or_config, gguf)
    source = open_source(inputs)
    config = resolve_config(inputs, source)
    model_dtype = resolve_dtype(dtype, config)
    placer = device_placer(device_map)

    model = build_meta_model(config, model_dtype, hf_kwargs)
    specs = tensor_specs(model)
    aliases = tied_aliases(model)
    source.bind(model)

    p = inject(model, rules, vars=vars, model_type=getattr(config, "model_type", None))
    needs = collect_needs(model, p, specs, placer)
    resolved = check_needs(needs, source, aliases)
    stats = stream_weights(model, needs, resolved, source, aliases, progress=progress)
    place_buffers(model, p, placer)
    check_nothing_on_meta(model, p)

    add_input_movers(model, p, needs)
    load_generation_config(model, inputs.model_dir)
    setattr(model, PLAN_ATTRIBUTE, p)
    model.eval()
    source.close()
    logger.info(
        "loaded %d tensors (%.2f GiB read) from %s in %.1f s (total %.1f s)",
        stats.tensors,
        stats.bytes_read / 2**30,
        source.description,
        stats.seconds,
        time.perf_counter() - start,
    )
    return model
