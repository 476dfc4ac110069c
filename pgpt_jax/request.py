"""What goes into the engine and what comes out: plain host-side dataclasses.

The engine speaks token ids plus sampling parameters (`Request`); it answers through a
callback with `Delta`s while a request streams and one `Result` (or `RequestError`) at
the end. The server and `generate()` both build on these, so an OpenAI field means the
same thing in both. Logprobs are already in OpenAI's legacy shape.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence


@dataclasses.dataclass
class Request:
    prompt: list[int]  # token ids the model sees (already FIM-arranged when a suffix is used)
    max_tokens: Optional[int] = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    best_of: Optional[int] = None  # None means n
    logprobs: Optional[int] = None  # None: no logprobs; 0..cap: sampled token + that many top
    echo: bool = False
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None  # None: a random seed
    stream: bool = False  # deltas are delivered as they are produced
    echo_prompt: Optional[list[int]] = None  # tokens echo returns, when not `prompt` (suffix)


@dataclasses.dataclass
class Logprobs:
    """OpenAI legacy logprobs: one entry per token; text_offset in the returned text's coordinates."""

    tokens: list[str] = dataclasses.field(default_factory=list)
    token_logprobs: list[Optional[float]] = dataclasses.field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = dataclasses.field(default_factory=list)
    text_offset: list[int] = dataclasses.field(default_factory=list)

    def extend(self, other: "Logprobs") -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Delta:
    """A streamed piece of one choice. finish_reason is set on the choice's last delta."""

    index: int  # choice index within the request, 0..n-1
    text: str
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]  # completion tokens returned (after stop/EOS trimming)
    finish_reason: str  # "stop" | "length"
    logprobs: Optional[Logprobs] = None


@dataclasses.dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # every generated token, best_of candidates included


class RequestError(ValueError):
    """A request the engine cannot take (OpenAI error fields)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit; retry later (HTTP 429)."""


def fim_prompt(prompt: list[int], suffix: list[int], fim: bool) -> list[int]:
    """The prompt a FIM model sees for `prompt` + `suffix` (prefix-suffix-middle order).

    Raises RequestError naming `suffix` for a model trained without FIM tokens.
    """
    from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    if not fim:
        raise RequestError("suffix is not supported by this model (it has no fill-in-the-middle tokens).", "suffix")
    return [FIM_PREFIX, *prompt, FIM_SUFFIX, *suffix, FIM_MIDDLE]
