"""The first steps of ``from_pretrained``: find the files, read the config, build the model on ``meta``.

The model is built with its parameters on the meta device but its buffers real (accelerate's
``init_empty_weights(include_buffers=False)``): every buffer is computed by the module's own constructor
on the CPU, so non-persistent buffers (rotary ``inv_freq`` and the like) exist with their true values
without any per-model code, and cost only their (small) size. Parameters take no memory until loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ktinject.devices import config_dtype
from ktinject.devices import resolve_dtype as resolve_dtype_name
from ktinject.errors import KtInjectError, WeightError
from ktinject.weights.assembled import FileSource

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the caller gave, sorted out: a model directory, a config (object or file), GGUF file(s)."""

    model_dir: Path | None
    config_file: Path | None
    config: Any  # PretrainedConfig | None
    gguf: Path | None


def sort_inputs(model_dir_or_config: Any, gguf: PathLike | None) -> Inputs:
    """Interpret ``from_pretrained``'s first argument and ``gguf=`` (never a hub id: only local paths)."""
    from transformers import PretrainedConfig

    config = None
    model_dir = config_file = None
    if isinstance(model_dir_or_config, PretrainedConfig):
        config = model_dir_or_config
    elif model_dir_or_config is not None:
        path = Path(model_dir_or_config)
        if path.is_dir():
            model_dir = path
            config_file = path / "config.json" if (path / "config.json").is_file() else None
        elif path.is_file() and path.suffix == ".gguf":
            if gguf is not None:
                raise KtInjectError(f"two GGUF files given: {path} and gguf={gguf}")
            gguf = path
        elif path.is_file():
            config_file = path
        else:
            raise KtInjectError(
                f"{model_dir_or_config}: no such directory or file (ktinject loads local files only, never a hub id)"
            )
    gguf_path = None
    if gguf is not None:
        gguf_path = Path(gguf)
        if not gguf_path.exists() and model_dir is not None and (model_dir / gguf_path).exists():
            gguf_path = model_dir / gguf_path
        if not gguf_path.is_file():
            raise WeightError(f"GGUF file not found: {gguf}")
    if gguf_path is None and model_dir is None and config_file is not None:
        model_dir = config_file.parent  # a config.json: the checkpoint is next to it
    if gguf_path is None and model_dir is None:
        raise KtInjectError("nothing to load weights from: give a model directory (safetensors) or gguf=FILE")
    return Inputs(model_dir, config_file, config, gguf_path)


def open_source(inputs: Inputs) -> FileSource:
    """The weight source: the GGUF file(s) when given, else the directory's safetensors."""
    if inputs.gguf is not None:
        from ktinject.weights.gguf_source import GGUFSource

        return GGUFSource(inputs.gguf)
    from ktinject.weights.safetensors_source import SafetensorsSource

    assert inputs.model_dir is not None
    return SafetensorsSource(inputs.model_dir)


def config_from_json(path: Path):
    """A transformers config from a config.json, or any JSON file with a model_type (never from a hub)."""
    from transformers import AutoConfig

    if path.name == "config.json":
        return AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KtInjectError(f"cannot read config {path}: {exc}") from None
    model_type = data.pop("model_type", None)
    if not model_type:
        raise KtInjectError(f"{path} has no model_type")
    for key in ("architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise KtInjectError(f"{path}: {exc}") from None


def resolve_config(inputs: Inputs, source: FileSource):
    """The config: given, or the directory's config.json, or built from the GGUF metadata."""
    if inputs.config is not None:
        return inputs.config
    if inputs.config_file is not None:
        return config_from_json(inputs.config_file)
    from ktinject.weights.gguf_config import config_from_gguf
    from ktinject.weights.gguf_source import GGUFSource

    if isinstance(source, GGUFSource):
        return config_from_gguf(source)
    raise KtInjectError(f"{inputs.model_dir} has no config.json")


def resolve_dtype(dtype: Any, config) -> torch.dtype:
    """``dtype`` (torch dtype, name, ``"auto"`` or None): None/auto take the config's dtype, else bfloat16."""
    return resolve_dtype_name(dtype, config_dtype(config))


def build_meta_model(config, dtype: torch.dtype | None = None, hf_kwargs: Mapping[str, Any] | None = None):
    """``from_config`` with parameters on meta and real (CPU) buffers; seconds for 671B. The Auto class is
    ``auto_model_class``'s: the causal LM, or the vision-language model around a MoE language model.

    The one model builder of ``from_pretrained`` and ``ktinject plan``: the plan sees the tensors (and the
    float32 ones transformers keeps) the loaded model will have. ``dtype`` None: the config's, else bfloat16.
    A config transformers cannot build a causal LM from is a KtInjectError in one line.
    """
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    from ktinject.families.model_class import auto_model_class

    dtype = dtype or config_dtype(config)
    try:
        # no_init_weights: random initialization of parameters that hold no data is pure cost (0.6 of 1.1 s for
        # DeepSeek-V3); buffers are still computed by the modules' constructors.
        with init_empty_weights(include_buffers=False), no_init_weights():
            model = auto_model_class(config).from_config(config, dtype=dtype, **dict(hf_kwargs or {}))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
        model_type = getattr(config, "model_type", "?")
        extra = f" with {', '.join(hf_kwargs)}" if hf_kwargs else ""
        raise KtInjectError(
            f"transformers cannot build a causal LM from this {model_type!r} config{extra}: {one_line(exc)}"
        ) from exc
    # init_empty_weights re-creates every parameter assigned inside it, which unties what post_init tied
    # (lm_head.weight = embed_tokens.weight); tie again now that registration is back to normal.
    model.tie_weights()
    keep_fp32_like_from_pretrained(model, dtype)
    return model


def one_line(exc: BaseException) -> str:
    """An exception in one line: transformers' messages run for pages (the first line says what is wrong)."""
    text = str(exc).strip().strip("'\"")
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, KeyError):
        return f"unknown key {first!r}" if first else "KeyError"
    return first or type(exc).__name__


def keep_fp32_like_from_pretrained(model, dtype: torch.dtype) -> None:
    """Give the tensors a model keeps in float32 (``_keep_in_fp32_modules[_strict]``, e.g. DeepSeek-V3's router)
    that dtype, as transformers' ``from_pretrained`` does; ``from_config`` alone builds them in ``dtype``."""
    import re

    get_plan = getattr(model, "_get_dtype_plan", None)
    dtype_plan = get_plan(dtype) if get_plan is not None else {}
    if not dtype_plan:
        return
    patterns = [(re.compile(p.replace("*", ".*")), d) for p, d in dtype_plan.items()]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        target = next((d for pattern, d in patterns if pattern.search(name)), None)
        if target is None or tensor.dtype == target:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor.to(target), requires_grad=tensor.requires_grad)
        else:
            module._buffers[leaf] = tensor.to(target)


def load_generation_config(model, model_dir: Path | None) -> None:
    """Use the directory's generation_config.json (eos ids, sampling defaults) when it has one."""
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
