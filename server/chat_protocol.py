"""The chat route's request side, and vLLM's `/tokenize` and `/detokenize`: JSON bodies ->
an engine `Request` (chat) or token ids, on protocol.py's shared fields and checks.

The chat template is plain text, one paragraph per message, closed by an open
assistant turn, with stop strings that end the reply where the model would start
writing the user's next turn:

    System: You are terse.

    User: Say this is a test!

    Assistant:

("developer" messages render as "System"; the reply's leading whitespace is dropped.)

vLLM's `/tokenize` and `/detokenize` are validated here (`parse_tokenize`,
`parse_detokenize`): text is encoded by the same `tokenizer.encode` as a completions prompt,
and a conversation is rendered by the same `chat_prompt` as a chat request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from pgpt_jax.request import Limits, Request
from server.protocol import (Job, ModelInfo, NonNegInt, ResponseFormat, _Body, _check_model, _constraint,
                             _logit_bias, _n, _SamplingFields, _stops, _stream_flags, _token_ids, _validate,
                             invalid)

CHAT_STOPS = ("\nUser:", "\nSystem:")  # the template's next turn: the reply is over
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


# ----------------------------------------------------------------------------- request bodies


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys are ignored so a client can send back an assistant message it received
    # (with "refusal": null, "tool_calls": null, ...).
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatBody(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[NonNegInt] = None  # chat's default: up to the context length
    max_completion_tokens: Optional[NonNegInt] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[NonNegInt] = None
    response_format: Optional[ResponseFormat] = None


class TokenizeBody(_Body):
    """vLLM's TokenizeCompletionRequest."""

    model: Optional[str] = None  # optional (vLLM's); when given, the served model's name
    prompt: str
    add_special_tokens: bool = True  # GPT-2 has no BOS token: there is nothing to add either way
    return_token_strs: Optional[bool] = False


class TokenizeChatBody(_Body):
    """vLLM's TokenizeChatRequest, with the fields a plain-text template has."""

    model: Optional[str] = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True  # the open "Assistant:" turn the chat route ends with
    add_special_tokens: bool = False
    return_token_strs: Optional[bool] = False


class DetokenizeBody(_Body):
    """vLLM's DetokenizeRequest."""

    model: Optional[str] = None
    tokens: list[int]  # strict: true is not token 1


# ----------------------------------------------------------------------------- what a request becomes


def chat_prompt(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The plain-text template of the module docstring (without the open assistant turn when
    `add_generation_prompt` is false: /tokenize's option)."""
    parts = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        parts.append(f"{CHAT_ROLES[m.role]}: {content.strip()}\n\n")
    return "".join(parts) + ("Assistant:" if add_generation_prompt else "")


def _chat_stops(stop: Union[None, str, list[str]], limits: Limits) -> list[str]:
    """The client's stops, then the template's turn markers (Limits.max_template_stops of room)."""
    stops = _stops(stop, limits)
    return stops + [s for s in CHAT_STOPS if s not in stops]


def parse_chat(data: Any, info: ModelInfo, deployment: Optional[str] = None) -> Job:
    """A /chat/completions body -> a Job with one engine Request (the rendered conversation)."""
    body: ChatBody = _validate(ChatBody, data)
    model = _check_model(body.model, info, deployment)
    stream, include_usage = _stream_flags(body)
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise invalid("'logprobs' must be true when 'top_logprobs' is given.", param="top_logprobs")
        if body.top_logprobs > info.limits.max_logprobs:
            raise invalid(f"'top_logprobs' must be at most {info.limits.max_logprobs} (got {body.top_logprobs}).",
                          param="top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    n = _n(body.n, info.limits)
    request = Request(
        prompt=info.tokenizer.encode(chat_prompt(body.messages)),
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=n, logprobs=top, stop=_chat_stops(body.stop, info.limits),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias, info), seed=body.seed, stream=stream,
        logprobs_mode=body.logprobs_mode or info.limits.logprobs_mode,
        constraint=_constraint(body), speculative=body.speculative is not False,
    )
    return Job("chat", model, [request], n=n, stream=stream, include_usage=include_usage, top_logprobs=top,
               return_token_ids=bool(body.return_token_ids))


def parse_tokenize(data: Any, info: ModelInfo) -> tuple[list[int], bool]:
    """A /tokenize body -> (token ids, whether the answer lists the tokens' strings).

    `prompt` is encoded as a completions prompt is, `messages` as the chat route renders
    them; `model` is optional, and checked when given.
    """
    body: Union[TokenizeBody, TokenizeChatBody]
    if isinstance(data, dict) and "messages" in data:
        if "prompt" in data:
            raise invalid("Give either 'prompt' or 'messages', not both.", param="messages")
        body = _validate(TokenizeChatBody, data)
        text = chat_prompt(body.messages, body.add_generation_prompt)
    else:
        body = _validate(TokenizeBody, data)
        text = body.prompt
    if body.model is not None:
        _check_model(body.model, info, None)  # before tokenising: a wrong model costs no BPE work
    return info.tokenizer.encode(text), bool(body.return_token_strs)


def parse_detokenize(data: Any, info: ModelInfo) -> list[int]:
    """A /detokenize body -> its token ids, each one the tokenizer can decode."""
    body: DetokenizeBody = _validate(DetokenizeBody, data)
    if body.model is not None:
        _check_model(body.model, info, None)
    # A checkpoint may pad its vocabulary past the tokenizer's (50304 rows): those ids have no text.
    return _token_ids(body.tokens, info, "tokens", vocab=min(info.vocab_size, info.tokenizer.vocab_size))
