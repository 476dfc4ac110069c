"""OpenAI's request side: validate JSON bodies into engine `Request`s, and OpenAI's error objects.

No HTTP here (app.py does that), no model logic (the engine does that) and no response
shapes (responses.py): this module knows what each OpenAI field means (docs/api.md) and
how a client can get it wrong. Everything wrong surfaces as an `APIError` whose `param`
names the field, so app.py turns it into a 4xx and never a 500. Limits (n, best_of, stop
strings, logprobs) come from the engine's one `Limits` table.

Validation runs in two steps: pydantic checks types and ranges (strict: "1" is not a
number, 1 is not a boolean, unknown fields are rejected as OpenAI does), then the
functions below check what needs the model or the limits (vocabulary, FIM, n, best_of,
stop strings, logprobs) and build the engine requests. The engine's own `check()`
(context length) runs when the bridge submits them.

This module holds the completions route's body and what every route shares (the sampling
fields, structured output, the model check, the Job); the chat route's body and template,
and vLLM's `/tokenize` and `/detokenize`, are in chat_protocol.py, on these helpers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pgpt_jax.request import LOGPROBS_MODES, SEED_RANGE, Constraint, Limits, Request, fim_prompt

DEFAULT_PROMPT = "<|endoftext|>"

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]  # n, best_of: their caps are in Limits
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]  # OpenAI: a signed 64-bit integer


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


def _param_name(loc: tuple) -> tuple[str, list[str]]:
    """pydantic's ('messages', 0, 'content', 'str') -> ('messages[0].content', ['str']).

    pydantic puts the branch of a union it tried into `loc`; those labels are not fields.
    """
    name, tags = "", []
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif _UNION_TAG.match(str(part)):
            tags.append(str(part))
        else:
            name += ("." if name else "") + str(part)
    return name, tags


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem, worded for a client, with `param` naming the field."""
    errors = err.errors(include_url=False)
    e = errors[0]
    loc = tuple(e["loc"])
    name, tags = _param_name(loc)
    if e["type"] == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {name}", param=name)
    # logit_bias values are errors on ('logit_bias', '<token>'): name the field, quote the key.
    if loc and loc[0] == "logit_bias" and len(loc) > 1:
        return invalid(f"Invalid value for 'logit_bias' at token {loc[1]!r}: {e['msg']}.", param="logit_bias")
    if e["type"] == "missing":
        return invalid(f"Missing required parameter: '{name}'.", param=name)
    shown = e.get("input")
    shown = repr(shown)[:80] if not isinstance(shown, (dict, list)) else f"a {type(shown).__name__}"
    if tags:
        # A union: say every form the field takes, not just the first branch's complaint.
        forms = sorted({t for x in errors for t in _param_name(tuple(x["loc"]))[1]
                        if _param_name(tuple(x["loc"]))[0].startswith(name)})
        return invalid(f"Invalid type for '{name}': expected {' or '.join(forms)} (got {shown}).", param=name)
    return invalid(f"Invalid value for '{name}': {e['msg']} (got {shown}).", param=name)


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Strict: a string is not a number and 1 is not true; unknown fields are a 400 (OpenAI's behaviour,
    # and a typo such as "max_token" is reported rather than silently ignored).
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: Optional[bool] = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: Optional[Union[dict, str, bool]] = Field(default=None, alias="json")  # a JSON schema (or its text)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None  # Lark syntax (llguidance's dialect)
    json_object: Optional[bool] = None  # any JSON object


class JSONSchemaFormat(_Body):
    """OpenAI's response_format.json_schema."""

    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Union[dict, bool]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced, strict or not


class ResponseFormat(_Body):
    """OpenAI's chat response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class _SamplingFields(_Body):
    """Fields both endpoints share. None everywhere means "OpenAI's default"."""

    model: Optional[str] = None  # required on /v1 routes; the deployment names it on Azure routes
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    n: Optional[PositiveInt] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    user: Optional[str] = None
    seed: Optional[Seed] = None
    return_token_ids: Optional[bool] = None  # vLLM's: prompt and completion token ids in the answer
    logprobs_mode: Optional[Literal[LOGPROBS_MODES]] = None  # vLLM's; None: the server's --logprobs-mode
    speculative: Optional[bool] = None  # ours: false opts out of the server's --speculative (None: take part)
    # Structured output (vLLM's fields): at most one constraint a request (`_constraint`).
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Optional[Union[dict, str, bool]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


class CompletionBody(_SamplingFields):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked by hand for clear errors
    suffix: Optional[str] = None
    max_tokens: Optional[NonNegInt] = 16  # explicit null: up to the context length
    logprobs: Optional[NonNegInt] = None
    echo: Optional[bool] = None
    best_of: Optional[PositiveInt] = None
    prompt_logprobs: Optional[NonNegInt] = None  # vLLM's: per prompt token, its logprob, rank and top k


# ----------------------------------------------------------------------------- what a request becomes


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    name: str
    vocab_size: int
    context_length: int
    fim: bool
    limits: Limits
    tokenizer: Any  # pgpt_jax.tokenizer.Tokenizer: encode, decode, token_bytes, token_str, vocab_size
    fim_order: str = "psm"  # GPTConfig.fim_order: how `suffix` is arranged around the prompt


@dataclasses.dataclass
class Job:
    """One HTTP request's work: one engine Request per prompt, and how to format the answers."""

    kind: Literal["completion", "chat"]
    model: str
    requests: list[Request]
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: Optional[int] = None  # chat: entries per token in logprobs.content[].top_logprobs
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and token_ids in the answer
    id: str = ""
    created: int = 0

    def __post_init__(self):
        prefix = "cmpl-" if self.kind == "completion" else "chatcmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex
        self.created = self.created or int(time.time())


def _check_model(body_model: Optional[str], info: ModelInfo, deployment: Optional[str]) -> str:
    if deployment is not None:
        # Azure routes: the deployment is the model; a body "model" is informational there.
        if deployment != info.name:
            raise APIError(404, f"The API deployment for this resource does not exist: '{deployment}'.",
                           param="deployment", code="DeploymentNotFound")
        return info.name
    if body_model is None:
        raise invalid("You must provide a model parameter.", param="model")
    if body_model != info.name:
        raise APIError(404, f"The model `{body_model}` does not exist.", param="model", code="model_not_found")
    return info.name


def _prompts(value: Any, info: ModelInfo) -> list[list[int]]:
    """Any of OpenAI's four prompt forms -> token ids per prompt."""
    if value is None or value == "":
        value = DEFAULT_PROMPT
    if isinstance(value, str):
        return [info.tokenizer.encode(value)]
    if not isinstance(value, list):
        raise invalid("'prompt' must be a string, an array of strings, an array of token ids "
                      f"or an array of token arrays (got {type(value).__name__}).", param="prompt")
    if not value:
        raise invalid("'prompt' must not be an empty array.", param="prompt")
    many = not all(_is_int(t) for t in value)  # an array of prompts, not one prompt of token ids
    if many and len(value) > info.limits.max_prompts:  # before any tokenising
        raise invalid(f"'prompt' holds {len(value)} prompts; at most {info.limits.max_prompts} are allowed "
                      "in one request.", param="prompt")
    if all(isinstance(p, str) for p in value):
        return [info.tokenizer.encode(p or DEFAULT_PROMPT) for p in value]
    if all(_is_int(t) for t in value):
        return [_token_ids(value, info, "prompt")]
    if all(isinstance(p, list) for p in value):
        out = []
        for i, p in enumerate(value):
            if not p:
                raise invalid(f"'prompt[{i}]' must not be an empty array.", param="prompt")
            if not all(_is_int(t) for t in p):
                raise invalid(f"'prompt[{i}]' must be an array of token ids (integers).", param="prompt")
            out.append(_token_ids(p, info, "prompt"))
        return out
    raise invalid("'prompt' arrays must hold only strings, only token ids, or only token arrays.", param="prompt")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not token 1


def _token_ids(ids: list[int], info: ModelInfo, param: str, vocab: Optional[int] = None) -> list[int]:
    vocab = info.vocab_size if vocab is None else vocab
    for t in ids:
        if not 0 <= t < vocab:
            raise invalid(f"Token id {t} in '{param}' is outside the vocabulary [0, {vocab}).", param=param)
    return list(ids)


def _stops(stop: Union[None, str, list[str]], limits: Limits) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > limits.max_stops:
        raise invalid(f"'stop' takes at most {limits.max_stops} sequences (got {len(stops)}).", param="stop")
    return [s for s in stops if s]  # "" would match everywhere: it means "no stop"


def _n(n: Optional[int], limits: Limits) -> int:
    n = n or 1
    if n > limits.max_n:
        raise invalid(f"Invalid value for 'n': at most {limits.max_n} (got {n}).", param="n")
    return n


def _logit_bias(bias: Optional[dict[str, float]], info: ModelInfo) -> Optional[dict[int, float]]:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"Invalid key {key!r} in 'logit_bias': keys are token ids.", param="logit_bias") from None
        if not 0 <= token < info.vocab_size:
            raise invalid(f"Token id {token} in 'logit_bias' is outside the vocabulary [0, {info.vocab_size}).",
                          param="logit_bias")
        out[token] = float(value)
    return out


_KINDS = {"json": "json_", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": "json_object"}


def _constraint(body: _SamplingFields) -> Optional[Constraint]:
    """The request's structured-output constraint, from whichever field names one (vLLM's
    `structured_outputs.*` and `guided_*`, OpenAI's chat `response_format`); two are a 400.
    The engine compiles it (a bad schema or regex is a 400 naming the field)."""
    found = []
    so = body.structured_outputs
    for kind, attr in _KINDS.items():
        value = getattr(so, attr) if so is not None else None
        if value is not None and not (kind == "json_object" and value is False):
            found.append(Constraint(kind, None if kind == "json_object" else value, f"structured_outputs.{kind}"))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append(Constraint(kind, value, f"guided_{kind}"))
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(Constraint("json_object", None, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format of type 'json_schema' needs 'json_schema.schema'.",
                          param="response_format.json_schema")
        found.append(Constraint("json", fmt.json_schema.schema_, "response_format.json_schema.schema"))
    if len(found) > 1:
        raise invalid(f"Give one structured-output constraint, not several ({', '.join(k.param for k in found)}).",
                      param=found[1].param)
    return found[0] if found else None


def _stream_flags(body: _SamplingFields) -> tuple[bool, bool]:
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                      param="stream_options")
    include_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
    return stream, include_usage


def _validate(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object (got {type(data).__name__}).")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise from_validation_error(err) from None


def parse_completion(data: Any, info: ModelInfo, deployment: Optional[str] = None) -> Job:
    """A /completions body -> a Job with one engine Request per prompt (prompt-major choices)."""
    body: CompletionBody = _validate(CompletionBody, data)
    model = _check_model(body.model, info, deployment)
    n = _n(body.n, info.limits)
    if body.best_of is not None and body.best_of > info.limits.max_best_of:
        raise invalid(f"Invalid value for 'best_of': at most {info.limits.max_best_of} (got {body.best_of}).",
                      param="best_of")
    best_of = body.best_of if body.best_of is not None else n  # no best_of: n candidates, none dropped
    if best_of < n:
        raise invalid(f"'best_of' ({best_of}) must be greater than or equal to 'n' ({n}).", param="best_of")
    stream, include_usage = _stream_flags(body)
    if stream and best_of > n:
        raise invalid("Cannot stream results with 'best_of' greater than 'n'.", param="best_of")
    if body.logprobs is not None and body.logprobs > info.limits.max_logprobs:
        raise invalid(f"'logprobs' must be at most {info.limits.max_logprobs} (got {body.logprobs}).",
                      param="logprobs")
    if body.prompt_logprobs is not None:
        if body.prompt_logprobs > info.limits.max_logprobs:
            raise invalid(f"'prompt_logprobs' must be at most {info.limits.max_logprobs} "
                          f"(got {body.prompt_logprobs}).", param="prompt_logprobs")
        if stream:
            raise invalid("'prompt_logprobs' is not available when streaming.", param="prompt_logprobs")
    suffix_ids = None
    if body.suffix:
        if not info.fim:
            raise invalid(f"The model `{info.name}` was not trained for insertion: 'suffix' is not supported.",
                          param="suffix")
        suffix_ids = info.tokenizer.encode(body.suffix)
    common = dict(
        max_tokens=body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=n, best_of=best_of, logprobs=body.logprobs, echo=bool(body.echo), stop=_stops(body.stop, info.limits),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias, info), seed=body.seed, stream=stream,
        prompt_logprobs=body.prompt_logprobs, logprobs_mode=body.logprobs_mode or info.limits.logprobs_mode,
        constraint=_constraint(body), speculative=body.speculative is not False,
    )
    requests = []
    prompts = _prompts(body.prompt, info)
    if len(prompts) * best_of > info.limits.max_choices:
        raise invalid(f"{len(prompts)} prompts x {best_of} choices is more than the {info.limits.max_choices} "
                      "one request may ask for.", param="best_of" if body.best_of is not None else "n")
    for ids in prompts:
        if suffix_ids is not None:
            arranged = fim_prompt(ids, suffix_ids, info.fim, info.fim_order)
            requests.append(Request(prompt=arranged, echo_prompt=ids, **common))
        else:
            requests.append(Request(prompt=ids, **common))
    return Job("completion", model, requests, n=n, stream=stream, include_usage=include_usage,
               return_token_ids=bool(body.return_token_ids))


def parse_json(raw: bytes) -> Any:
    """JSON text -> Python; NaN and Infinity (which Python's json accepts) are not JSON."""
    def reject(const: str):
        raise ValueError(f"{const} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=reject)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"The request body is not valid JSON: {err}") from None
