"""What goes into the engine and what comes out: plain host-side dataclasses, and the limits on them.

The engine speaks token ids plus sampling parameters (`Request`); it answers through a
callback with `Delta`s while a request streams and one `Result` (or an exception) at the
end. The server and `generate()` both build on these, so an OpenAI field means the same
thing in both. Logprobs are already in OpenAI's legacy shape.

`Limits` is the one table of what a request may ask for: the engine (`validate`), the
protocol layer (its 400s) and the CLI (its flags) all read it, so no limit is written twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI: a signed 64-bit integer
# vLLM's names: what the logprobs of sampled tokens are (docs/api.md, "Raw or processed logprobs")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Every per-request limit, in one place. CLI flags map onto fields one to one."""

    max_stops: int = 4  # stop strings a client may send (OpenAI's limit)
    max_template_stops: int = 4  # more a prompt template may add on top (chat's turn markers)
    max_n: int = 128
    max_best_of: int = 20
    max_logprobs: int = 5  # top logprobs per token (--max-logprobs); at most 20
    max_prompts: int = 128  # prompts in one request body (--max-prompts)
    max_choices: int = 512  # prompts x best_of of one request body (--max-choices)
    # Admission by cost: what may wait for a slot, counted over queued choices.
    max_queue: int = 256  # choices waiting for a slot (--max-queue)
    max_queued_tokens: Optional[int] = None  # prompt + max_tokens over waiting choices; None: 8 x slots x context
    request_timeout: Optional[float] = None  # seconds from submit to the last token (--request-timeout)
    queue_timeout: Optional[float] = None  # seconds a request may wait for its first slot (--queue-timeout)
    logprobs_mode: str = "raw_logprobs"  # a request's logprobs_mode when it names none (--logprobs-mode)

    def __post_init__(self):
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError("max_logprobs must be in 0..20")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}")

    @property
    def max_engine_stops(self) -> int:
        """Stop strings the engine matches per request: the client's plus a template's."""
        return self.max_stops + self.max_template_stops


@dataclasses.dataclass(frozen=True)
class Constraint:
    """Structured output: what every choice's text must be (`grammar.py` compiles it).

    kind: "json" (a JSON schema), "json_object" (any JSON object), "regex", "choice" (a list
    of strings) or "grammar" (Lark); spec: the schema, regex, list or grammar text; param:
    the request field it came from, which an error about it names.
    """

    kind: str
    spec: Any
    param: str


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
    prompt_logprobs: Optional[int] = None  # vLLM's: None, or 0..cap top entries per prompt token
    # Batch work: takes only the slots interactive work leaves free and gives them back when
    # interactive work waits (it then starts over with the same seed: the same output). It
    # has no deadlines and is outside the queue's budget (its submitter bounds it); no stream.
    background: bool = False
    logprobs_mode: str = "raw_logprobs"  # vLLM's: sampled tokens' logprobs raw or processed (LOGPROBS_MODES)
    constraint: Optional[Constraint] = None  # structured output: every choice matches it
    speculative: bool = True  # False: never proposes tokens when the engine speculates (ngram.py)

    @property
    def echo_start(self) -> int:
        """Where `echo_prompt`'s tokens sit in `prompt`: right after <|fim_prefix|> in the
        prefix-suffix-middle order, last in suffix-prefix-middle (fim_prompt); 0 without a suffix."""
        if self.echo_prompt is None:
            return 0
        n = len(self.echo_prompt)
        return 1 if list(self.prompt[1:1 + n]) == list(self.echo_prompt) else len(self.prompt) - n

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether the prefill computes logprobs at every prompt position (echo with logprobs,
        or vLLM's prompt_logprobs)."""
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None

    @property
    def candidates(self) -> int:
        """Sequences generated: best_of (which defaults to n)."""
        return self.best_of if self.best_of is not None else self.n

    def max_new(self, context_length: int) -> int:
        """Tokens this request may generate per choice."""
        if self.max_tokens is not None:
            return self.max_tokens
        return context_length - len(self.prompt)


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
    """A streamed piece of one choice. finish_reason is set on the choice's last delta.

    token_ids are the completion tokens whose text this delta releases (never the echoed
    prompt's): a choice's deltas concatenate to its Choice.token_ids.
    """

    index: int  # choice index within the request, 0..n-1
    text: str
    logprobs: Optional[Logprobs] = None
    finish_reason: Optional[str] = None
    token_ids: list[int] = dataclasses.field(default_factory=list)


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
    # vLLM's prompt_logprobs, when asked for: per prompt token (echo_prompt's, with a suffix)
    # None for the first, then {"token id": {"logprob", "rank", "decoded_token"}}.
    prompt_logprobs: Optional[list[Optional[dict[str, dict]]]] = None


class RequestError(ValueError):
    """A request the engine cannot take (OpenAI error fields)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class QueueFull(RuntimeError):
    """The engine's waiting queue (choices or their token budget) is at its limit; retry later (HTTP 429)."""


class EngineUnavailable(RuntimeError):
    """The engine is stopping, stopped or dead: it takes no new work and ends what it had (HTTP 503)."""


class RequestTimeout(TimeoutError):
    """A request ran past a deadline: `where` is "queue" (no slot in time) or "request" (the whole request)."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


def fim_prompt(prompt: list[int], suffix: list[int], fim: bool, order: str = "psm") -> list[int]:
    """The prompt a FIM model sees for `prompt` + `suffix`, in the model's order (the FIM
    paper's two): prefix-suffix-middle, or suffix-prefix-middle, where the prompt comes last
    and the middle continues it directly.

    Raises RequestError naming `suffix` for a model trained without FIM tokens.
    """
    if not fim:
        raise RequestError("suffix is not supported by this model (it has no fill-in-the-middle tokens).", "suffix")
    if order == "spm":
        return [FIM_PREFIX, FIM_SUFFIX, *suffix, FIM_MIDDLE, *prompt]
    return [FIM_PREFIX, *prompt, FIM_SUFFIX, *suffix, FIM_MIDDLE]


def context_error(context_length: int, prompt_tokens: int, max_tokens: int) -> Optional[RequestError]:
    """OpenAI's context_length_exceeded error, or None when prompt + max_tokens fits."""
    L, P, wanted = context_length, prompt_tokens, prompt_tokens + max_tokens
    if P <= L and wanted <= L:
        return None
    return RequestError(
        f"This model's maximum context length is {L} tokens, however you requested "
        f"{wanted} tokens ({P} in your prompt; {wanted - P} for the completion). "
        "Please reduce your prompt; or completion length.",
        "max_tokens" if P <= L else "prompt", "context_length_exceeded")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)  # JSON true is not token 1


def validate(request: Request, limits: Limits, vocab_size: int, context_length: int,
             never: Sequence[int] = ()) -> None:
    """Raises RequestError for what makes `request` impossible; the error names the OpenAI field.

    `never`: tokens the model can never produce (control tokens): no logit_bias key may name one.
    """
    r = request
    if not r.prompt:
        raise RequestError("The prompt must contain at least one token.", "prompt")
    bad = [t for t in r.prompt if not (_is_int(t) and 0 <= t < vocab_size)]
    if bad:
        raise RequestError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).", "prompt")
    if not 1 <= r.n <= limits.max_n:
        raise RequestError(f"n must be between 1 and {limits.max_n}.", "n")
    if r.candidates < r.n:
        raise RequestError("best_of must be greater than or equal to n.", "best_of")
    if r.candidates > max(limits.max_best_of, r.n):
        raise RequestError(f"best_of must be at most {limits.max_best_of}.", "best_of")
    if r.stream and r.background:
        raise RequestError("Background (batch) requests cannot stream.", "stream")
    if r.stream and r.candidates > r.n:
        raise RequestError("Cannot stream results when best_of is greater than n.", "stream")
    if r.logprobs is not None and not 0 <= r.logprobs <= limits.max_logprobs:
        raise RequestError(f"logprobs must be between 0 and {limits.max_logprobs}.", "logprobs")
    if r.prompt_logprobs is not None:
        if not (_is_int(r.prompt_logprobs) and 0 <= r.prompt_logprobs <= limits.max_logprobs):
            raise RequestError(f"prompt_logprobs must be between 0 and {limits.max_logprobs}.", "prompt_logprobs")
        if r.stream:
            raise RequestError("prompt_logprobs is not available when streaming.", "prompt_logprobs")
    if r.logprobs_mode not in LOGPROBS_MODES:
        raise RequestError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}.", "logprobs_mode")
    if not 0 <= r.temperature <= 2:
        raise RequestError("temperature must be between 0 and 2.", "temperature")
    if not 0 <= r.top_p <= 1:
        raise RequestError("top_p must be between 0 and 1.", "top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(r, name) <= 2:
            raise RequestError(f"{name} must be between -2 and 2.", name)
    most = limits.max_engine_stops
    if len(r.stop) > most or any(not isinstance(s, str) or not s for s in r.stop):
        raise RequestError(f"stop must be at most {most} non-empty strings.", "stop")
    if r.seed is not None and not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]:
        raise RequestError("seed must be a 64-bit integer.", "seed")
    for tok, val in (r.logit_bias or {}).items():
        if not (_is_int(tok) and 0 <= tok < vocab_size):
            raise RequestError(f"logit_bias key {tok} is not a token id in the vocabulary.", "logit_bias")
        if tok in never:
            raise RequestError(f"logit_bias key {tok} is a control token this model never produces.", "logit_bias")
        if not -100 <= val <= 100:
            raise RequestError(f"logit_bias value for token {tok} must be between -100 and 100.", "logit_bias")
    if r.max_tokens is not None and r.max_tokens < 0:
        raise RequestError("max_tokens must be at least 0.", "max_tokens")
    err = context_error(context_length, len(r.prompt), r.max_tokens or 0)
    if err is not None:
        raise err
