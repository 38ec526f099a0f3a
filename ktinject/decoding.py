"""Compiled decoding: stock ``generate()`` runs each one-token step as one compiled graph.

At one token a decoder layer is a few big matrix products (ours, in C++) and ~300 small torch ops that
transformers runs one by one from Python; on the CPU those cost more than the layer's kernels (measured
0.57 ms per layer eagerly against 0.22 ms compiled, tiny widths). transformers already knows how to compile the
decoding step when the KV cache is static (``cache_implementation="static"`` plus a ``compile_config``), but only
on accelerators; :func:`compile_decoding` sets that up for CPU-placed models too. The CPU operators are torch
custom ops (``torch.ops.ktinject.*``), so the graph goes through them without breaking. The first
``generate()`` call pays the compilation (seconds for a few layers, longer for deep models; cached on disk by
torch afterwards), and a static cache sized to each call's prompt + new tokens.
"""

from __future__ import annotations

import logging

from torch import nn

from ktinject.errors import KtInjectError

logger = logging.getLogger("ktinject")


def compile_decoding(model: nn.Module, backend: str = "inductor") -> None:
    """Make ``model.generate()`` compile its decoding step (static KV cache + ``torch.compile``, any device).

    ``backend`` is the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` checks tracing without
    generating code). Call it once, after ``optimize``/``from_pretrained``; ``generate(...,
    cache_implementation="dynamic")`` or ``disable_compile=True`` turn it off for one call.
    """
    from transformers.generation import CompileConfig

    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        raise KtInjectError(
            f"{type(model).__name__} has no generation_config: compiled decoding needs a generative model"
        )
    if not getattr(model, "_can_compile_fullgraph", True):
        logger.warning(
            "%s does not declare a compilable forward; compiling anyway (graph breaks fall back to Python)",
            type(model).__name__,
        )
    fused = sum(type(m).__name__ == "CpuDecoderLayer" for m in model.modules())
    if fused:
        logger.warning(
            "%d decoder layers are cpu_decoder_layer operators, which decode eagerly as one C++ job per layer "
            "appending to transformers' default cache; compiled decoding gives them a static cache and two jobs "
            "per layer, measured slower on the CPU (BENCHMARKS.md). Compiling anyway.",
            fused,
        )
    config = CompileConfig(fullgraph=False, backend=backend, mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    generation_config.cache_implementation = "static"
    generation_config.compile_config = config
    logger.info("generate() will compile the decoding step (%s backend) on its first call", backend)
