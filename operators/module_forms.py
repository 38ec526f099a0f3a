"""Recognising transformers modules by what their forward computes, for operators that replace the forward.

transformers generates most families' modules from a few templates (its "modular" files), so many classes have
character-for-character the same forward: 140 RMSNorm classes share Llama's, a dozen MoE routers share
Qwen3-MoE's. A class whose forward source equals a template's computes what the template computes (given the
same attributes), which is what lets one operator serve every such family without a list of class names. A
class that differs in any way (Gemma's 1 + weight, a router with a bias) is simply not recognised.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import textwrap


@functools.cache
def forward_source(cls: type) -> str | None:
    """The dedented source of ``cls.forward`` as the class defines or inherits it (None when unavailable)."""
    forward = getattr(cls, "forward", None)
    try:
        return textwrap.dedent(inspect.getsource(forward)) if forward is not None else None
    except (OSError, TypeError):
        return None


@functools.cache
def template_sources(*qualified: str) -> frozenset[str]:
    """Forward sources of the template classes named ``module:Class`` (those this transformers lacks are skipped)."""
    sources = set()
    for name in qualified:
        module_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            continue
        src = forward_source(cls)
        if src is not None:
            sources.add(src)
    return frozenset(sources)


def computes_like(module: object, *templates: str) -> bool:
    """Whether ``module``'s class has the same forward as one of ``templates`` (``module:Class`` names)."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return False
    src = forward_source(cls)
    return src is not None and src in template_sources(*templates)
