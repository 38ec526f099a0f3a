"""The OpenAI request bodies the server accepts, as pydantic models, and the OpenAI error body.

Unknown fields are rejected (400, naming the field) rather than ignored: a client asking for ``logprobs``
or ``tools`` must learn that it will not get them. Fields that are accepted but only with their neutral
value (``n`` = 1, penalties = 0, ``logprobs`` off) say so in their error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM-style extension; 0 or -1 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError(f"penalties are not supported (only 0), got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(v)}")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_kwargs(self) -> dict[str, Any]:
        return dict(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            stop=self.stop_strings(),
            ignore_eos=self.ignore_eos,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for text completions
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError(f"one prompt per request (n=1), got {len(v)}")
        return v


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem pydantic found, in one line."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if not str(part).startswith(("function-", "list[", "str", "int"))]
    param = ".".join(loc) or None
    msg = error.get("msg", "invalid value")
    if error.get("type") == "extra_forbidden":
        msg = "unknown parameter (not supported by this server)"
    elif error.get("type") == "missing":
        msg = "missing required parameter"
    return (f"{param}: {msg}" if param else msg), param


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """The JSON body of an OpenAI API error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
