"""What a request asks of the sampler, and drawing one token from a row of logits.

Each request owns its random generator, so a seeded request gives the same tokens whether it runs alone or
batched with others (the draw does not depend on what the other rows consume).
"""

from __future__ import annotations

import dataclasses

import torch

from ktinject.errors import KtInjectError


class RequestError(KtInjectError, ValueError):
    """A request the engine cannot run as asked (bad sampling value, prompt too long); ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` 0 is greedy (argmax); ``top_k`` 0 and ``top_p`` 1 turn those filters off. ``max_tokens``
    None runs until an end-of-sequence token, a stop string or the end of the context. ``ignore_eos`` keeps
    going past end-of-sequence tokens (benchmarks want fixed lengths).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise RequestError(f"top_k must be 0 (off) or positive, got {self.top_k}", param="top_k")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        """The request's own random stream (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed % 2**64)
        return generator


def model_sampling_defaults(generation_config) -> dict:
    """The model's own sampling defaults (``generation_config.json``) when it asks to sample, else greedy.

    Model authors tune these (Qwen3 ships temperature 0.6, top_p 0.95, top_k 20); a request's own values win.
    """
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return {}
    out = {}
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(generation_config, key, None)
        if value is not None:
            out[key] = value
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a ``[vocab]`` row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # drop a token once the ones before it already cover top_p; the most likely token always stays
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
