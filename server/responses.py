"""OpenAI's response side: the JSON bodies and stream chunks built from engine results.

No HTTP and no validation here: given a `Job` (protocol.py) and the engine's `Result`s and
`Delta`s, these functions shape what OpenAI would send, for completions and chat alike
(chat's per-token logprobs, its role on the first chunk, finish_reason on a chunk of its own).
vLLM's `return_token_ids` adds `prompt_token_ids` and `token_ids` where vLLM puts them, and its
`prompt_logprobs` a `prompt_logprobs` list to each completion choice; without them no key is added.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pgpt_jax.request import Delta, Logprobs, Result
from server.protocol import Job, ModelInfo


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def results_usage(results: list[Result]) -> dict:
    return usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


def _lp(logprobs: Optional[Logprobs]) -> Optional[dict]:
    return None if logprobs is None else logprobs.to_dict()


def _token_bytes(token: str) -> list[int]:
    """OpenAI writes a token holding part of a UTF-8 character as 'bytes:\\xe2\\x80'."""
    if token.startswith("bytes:"):
        return list(bytes.fromhex(token[len("bytes:"):].replace("\\x", "")))
    return list(token.encode("utf-8"))


def chat_logprobs(logprobs: Optional[Logprobs], top: Optional[int]) -> Optional[dict]:
    """Legacy per-token logprobs -> chat's {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if logprobs is None or top is None:
        return None
    content = []
    for token, lp, alts in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        ranked = sorted((alts or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append({
            "token": token, "logprob": lp, "bytes": _token_bytes(token),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": _token_bytes(t)} for t, v in ranked],
        })
    return {"content": content, "refusal": None}


def prompt_token_ids(job: Job, prompt_index: int) -> list[int]:
    """What `return_token_ids` reports as a prompt's ids: the user's prompt as encoded (before a
    suffix's fill-in-the-middle arrangement), or chat's rendered conversation."""
    r = job.requests[prompt_index]
    return list(r.echo_prompt if r.echo_prompt is not None else r.prompt)


def completion_response(job: Job, results: list[Result]) -> dict:
    choices = []
    for p, result in enumerate(results):
        for c in sorted(result.choices, key=lambda c: c.index):
            choice = {"text": c.text, "index": p * job.n + c.index, "logprobs": _lp(c.logprobs),
                      "finish_reason": c.finish_reason}
            if job.return_token_ids:
                choice["prompt_token_ids"] = prompt_token_ids(job, p)
                choice["token_ids"] = list(c.token_ids)
            if result.prompt_logprobs is not None:  # vLLM's; the same list for each of a prompt's choices
                choice["prompt_logprobs"] = result.prompt_logprobs
            choices.append(choice)
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": results_usage(results)}


def chat_response(job: Job, result: Result) -> dict:
    choices = []
    for c in sorted(result.choices, key=lambda c: c.index):
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text.lstrip()},
                  "logprobs": chat_logprobs(c.logprobs, job.top_logprobs), "finish_reason": c.finish_reason}
        if job.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        choices.append(choice)
    body = {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": results_usage([result])}
    if job.return_token_ids:
        body["prompt_token_ids"] = prompt_token_ids(job, 0)  # vLLM: chat's are the response's, not a choice's
    return body


def completion_chunk(job: Job, index: int, text: str, logprobs: Optional[Logprobs],
                     finish_reason: Optional[str], token_ids: Sequence[int] = (),
                     prompt_ids: Optional[list[int]] = None) -> dict:
    """`token_ids`: the tokens `text` stands for; `prompt_ids`: set on a choice's first chunk
    (both reported only when the job asks for token ids)."""
    choice = {"text": text, "index": index, "logprobs": _lp(logprobs), "finish_reason": finish_reason}
    if job.return_token_ids:
        choice["prompt_token_ids"] = prompt_ids  # null after a choice's first chunk, as vLLM sends it
        choice["token_ids"] = list(token_ids)
    chunk = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
             "choices": [choice]}
    if job.include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
    return chunk


def chat_chunk(job: Job, index: int, delta: dict, logprobs: Optional[Logprobs],
               finish_reason: Optional[str], token_ids: Sequence[int] = (),
               prompt_ids: Optional[list[int]] = None) -> dict:
    """As completion_chunk; chat's `prompt_token_ids` sit beside `choices`, on a choice's first chunk only."""
    choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs, job.top_logprobs),
              "finish_reason": finish_reason}
    if job.return_token_ids:
        choice["token_ids"] = list(token_ids)
    chunk = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
             "choices": [choice]}
    if job.include_usage:
        chunk["usage"] = None
    if job.return_token_ids and prompt_ids is not None:
        chunk["prompt_token_ids"] = prompt_ids
    return chunk


def usage_chunk(job: Job, results: list[Result]) -> dict:
    obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": [],
            "usage": results_usage(results)}


def models_list(info: ModelInfo, created: int) -> dict:
    return {"object": "list", "data": [model_card(info, created)]}


def model_card(info: ModelInfo, created: int) -> dict:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "pgpt-jax",
            "context_length": info.context_length}


class StreamFormatter:
    """Engine events of one streaming Job -> the chunks OpenAI would send, per kind.

    Stateful per choice: chat sends the assistant role on a choice's first chunk, drops
    the reply's leading whitespace, and puts finish_reason on a chunk of its own (as
    OpenAI does); with `return_token_ids`, a choice's first chunk carries its prompt's ids.
    """

    def __init__(self, job: Job):
        self.job = job
        self._started: set[int] = set()  # choices whose first chunk went out (chat: with the role)
        self._text_started: set[int] = set()  # chat: choices past their leading whitespace
        self._finished: set[int] = set()

    def delta(self, prompt_index: int, d: Delta) -> list[dict]:
        index = prompt_index * self.job.n + d.index
        if self.job.kind == "completion":
            if d.finish_reason is not None:
                self._finished.add(index)
            return [completion_chunk(self.job, index, d.text, d.logprobs, d.finish_reason, d.token_ids,
                                     self._start(prompt_index, index))]
        text = d.text if index in self._text_started else d.text.lstrip()
        if text:
            self._text_started.add(index)
        out = []
        # Tokens of dropped leading whitespace still go out: a choice's token_ids add up to the whole reply's.
        if text or (d.logprobs is not None and d.logprobs.tokens) or (self.job.return_token_ids and d.token_ids):
            out.append(self._chat_chunk(index, text, d.logprobs, d.token_ids))
        if d.finish_reason is not None:
            out += self._chat_finish(index, d.finish_reason)
        return out

    def result(self, prompt_index: int, result: Result) -> list[dict]:
        """Closing chunks for choices whose last delta did not carry a finish_reason."""
        out = []
        for c in result.choices:
            index = prompt_index * self.job.n + c.index
            if index in self._finished:
                continue
            if self.job.kind == "completion":
                self._finished.add(index)
                out.append(completion_chunk(self.job, index, "", None, c.finish_reason,
                                            prompt_ids=self._start(prompt_index, index)))
            else:
                out += self._chat_finish(index, c.finish_reason)
        return out

    def _start(self, prompt_index: int, index: int) -> Optional[list[int]]:
        """Marks choice `index` started: its prompt's ids on its first chunk, when the job asks for ids."""
        if index in self._started:
            return None
        self._started.add(index)
        return prompt_token_ids(self.job, prompt_index) if self.job.return_token_ids else None

    def _chat_chunk(self, index: int, text: str, logprobs: Optional[Logprobs], token_ids: Sequence[int]) -> dict:
        first = index not in self._started
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return chat_chunk(self.job, index, delta, logprobs, None, token_ids, self._start(0, index))

    def _chat_finish(self, index: int, reason: str) -> list[dict]:
        self._finished.add(index)
        out = []
        if index not in self._started:  # an empty reply still says who spoke
            out.append(self._chat_chunk(index, "", None, ()))
        return out + [chat_chunk(self.job, index, {}, None, reason)]
