"""Serving an optimized model: one engine thread that owns the model and decodes concurrent requests as a batch.

``Engine`` is independent of HTTP (``ktinject chat`` drives it directly); ``ktinject.serving.app`` puts the
OpenAI HTTP API in front of it and is the only module that needs fastapi, so ``import ktinject`` never does.
"""

from __future__ import annotations

from ktinject.serving.engine import Engine, Output, Request, RequestError
from ktinject.serving.sampling import SamplingParams

__all__ = ["Engine", "Output", "Request", "RequestError", "SamplingParams"]
