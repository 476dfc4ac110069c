"""From sampled tokens to what a client reads: per-choice text, stop strings, logprobs, text_offset.

One `RequestOutput` per engine request holds the output side of its choices (`best_of`
candidates): each token the device samples goes through `add_token`, which detokenizes it
incrementally (never half a UTF-8 character), cuts the text at the first stop string it
completes (across token boundaries too), and records the token's logprob (raw or
processed, as the request asks), its top alternatives and its character offset. Streaming
requests take `deltas()`: the text, token ids and logprobs not sent yet, holding back any
tail that could still grow into a stop string.
At the end, `result()` ranks best_of candidates and builds the OpenAI-shaped choices.

Structured output: a constrained request's choices each hold a grammar matcher
(`grammar.py`) that every token advances; the engine reads the next-token mask from it. A
choice whose grammar admits nothing but EOS is complete and ends with "stop" at once.

Plain Python over token ids and numbers: no JAX and no device. The engine decides when a
choice's slot is freed; this module only says that the choice has finished, and why.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Optional

from pgpt_jax import grammar
from pgpt_jax.request import Choice, Delta, Logprobs, Request, Result
from pgpt_jax.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass(eq=False)
class ChoiceOutput:
    """What one candidate has produced so far."""

    index: int  # candidate index (its PRNG key derives from it)
    detok: IncrementalDetokenizer
    text: str = ""  # completion text so far (stop strings already cut)
    sent: int = 0  # characters of text already streamed
    token_ids: list = dataclasses.field(default_factory=list)
    offsets: list = dataclasses.field(default_factory=list)  # char offset of each token in text
    lps: list = dataclasses.field(default_factory=list)
    tops: list = dataclasses.field(default_factory=list)
    sent_tokens: int = 0  # tokens already streamed (their ids, and logprobs when asked for)
    generated: int = 0  # every sampled token, EOS included
    logprob_sum: float = 0.0
    finish: Optional[str] = None  # "stop" | "length" | "abort"
    echo_sent: bool = False
    final_sent: bool = False
    matcher: Optional[grammar.Matcher] = None  # structured output: where the choice stands in its grammar


class RequestOutput:
    """The output side of one request: its candidates, its echoed prompt, and their formatting."""

    def __init__(self, request: Request, tokenizer: Tokenizer, *, max_new: int, context_length: int,
                 vocab: Optional[int] = None):
        self.request, self.tokenizer = request, tokenizer
        self.max_new, self.context_length = max_new, context_length
        echo_ids = request.echo_prompt if request.echo_prompt is not None else request.prompt
        prompt_text = tokenizer.decode(echo_ids)
        self.prompt_text = prompt_text if request.echo else ""  # what echo returns before the completion
        self.prompt_chars = len(prompt_text)  # completion text_offsets start here
        self.prompt_logprobs: Optional[Logprobs] = None  # echo with logprobs, built once
        self.vllm_prompt_logprobs: Optional[list] = None  # vLLM's prompt_logprobs, built once
        self.choices = [ChoiceOutput(i, IncrementalDetokenizer(tokenizer)) for i in range(request.candidates)]
        if request.constraint is not None:  # compiled (and cached) when the engine checked the request
            k = request.constraint
            compiled = grammar.compile(k.kind, k.spec, tokenizer, vocab)
            for c in self.choices:
                c.matcher = compiled.matcher()

    @property
    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    @property
    def generated(self) -> int:
        return sum(c.generated for c in self.choices)

    # ------------------------------------------------------------------ tokens in

    def set_prompt_logprobs(self, lp, top_ids, top_lps, ranks=None) -> None:
        """The prompt's logprobs from a prefill's f32[T-1], i32[T-1, K], f32[T-1, K], i32[T-1]:
        echo's (legacy shape) and vLLM's `prompt_logprobs`, each as the request asks. The
        first token's are null (nothing predicts it). `ranks` is needed only for prompt_logprobs."""
        r = self.request
        ids = r.echo_prompt if r.echo_prompt is not None else r.prompt
        first = r.echo_start  # a FIM prompt: where the user's tokens sit in the arrangement
        out, offset = Logprobs(), 0
        vllm: list[Optional[dict]] = []
        for i, tok in enumerate(ids):
            out.tokens.append(self.tokenizer.token_str(tok))
            out.text_offset.append(offset)
            j = first + i - 1  # index into lp: logprob of prompt token first+i
            if i == 0:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                vllm.append(None)
            else:
                out.token_logprobs.append(float(lp[j]))
                out.top_logprobs.append(self._top_dict(tok, float(lp[j]), top_ids[j], top_lps[j]))
                if r.prompt_logprobs is not None:
                    vllm.append(self._vllm_entry(tok, float(lp[j]), int(ranks[j]), top_ids[j], top_lps[j]))
            offset += len(self.tokenizer.decode([tok]))
        if r.echo and r.logprobs is not None:
            self.prompt_logprobs = out
        if r.prompt_logprobs is not None:
            self.vllm_prompt_logprobs = vllm

    def _vllm_entry(self, tok: int, tok_lp: float, rank: int, top_ids, top_lps) -> dict:
        """vLLM's entry for one prompt token: the token itself (first), then the top
        `request.prompt_logprobs`, keyed by token id as a string; the top's ranks are 1..k."""
        def one(t: int, v: float, rk: int) -> dict:
            return {"logprob": v, "rank": rk, "decoded_token": self.tokenizer.decode([t])}

        d = {str(tok): one(tok, tok_lp, rank)}
        k = self.request.prompt_logprobs
        for i, (t, v) in enumerate(zip(top_ids[:k], top_lps[:k])):
            d.setdefault(str(int(t)), one(int(t), float(v), i + 1))
        return d

    def add_token(self, c: ChoiceOutput, tok: int, lp: float, top_ids, top_lps) -> None:
        """One sampled token of choice `c` with its logprob and top K (raw or processed, as the
        device computed them for this request); may finish `c`."""
        r = self.request
        c.generated += 1
        c.logprob_sum += lp
        cut_by_stop = False
        if tok == self.tokenizer.eos_id:
            c.finish = "stop"  # EOS: its text is not returned (a constrained choice's mask allows it only at an end)
        else:
            if c.matcher is not None and not c.matcher.advance(tok):
                raise RuntimeError(f"the grammar refused token {tok}: {c.matcher.error()}")
            c.offsets.append(len(c.text))
            c.token_ids.append(tok)
            if r.logprobs is not None:
                c.lps.append(lp)
                c.tops.append(self._top_dict(tok, lp, top_ids, top_lps))
            before = len(c.text)
            c.text += c.detok.add([tok])
            cut_by_stop = bool(r.stop) and self._match_stop(c, before)
        if c.finish is None and c.matcher is not None and c.matcher.stopped():
            c.finish = "stop"  # the grammar admits nothing more: the output is complete
        if c.finish is None and (c.generated >= self.max_new
                                 or len(r.prompt) + c.generated >= self.context_length):
            c.finish = "length"
        if c.finish is not None and not cut_by_stop:
            # Bytes of an unfinished character are all that is left: show them as U+FFFD.
            before = len(c.text)
            c.text += c.detok.flush()
            if r.stop and len(c.text) > before:
                self._match_stop(c, before)

    def end(self, reason: str) -> None:
        """Every unfinished choice ends with `reason` (an abort, a max_tokens of 0)."""
        for c in self.choices:
            if c.finish is None:
                c.finish = reason

    def _match_stop(self, c: ChoiceOutput, before: int) -> bool:
        """Cuts the text before the first stop string that text past `before` completes."""
        hits = []
        for s in self.request.stop:
            i = c.text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                hits.append(i)
        if hits:
            cut = min(hits)
            c.text = c.text[:cut]
            keep = bisect.bisect_left(c.offsets, cut)
            del c.offsets[keep:], c.token_ids[keep:]
            del c.lps[keep:], c.tops[keep:]
            c.finish = "stop"
        return bool(hits)

    def _top_dict(self, tok, tok_lp, top_ids, top_lps) -> dict:
        """The top `request.logprobs` alternatives, plus the sampled token (up to k+1 entries).
        An alternative of logprob -inf (processed logprobs: outside the nucleus) is left out:
        JSON has no -inf, and the token could not have been drawn."""
        k = self.request.logprobs
        d = {self.tokenizer.token_str(int(t)): float(v) for t, v in zip(top_ids[:k], top_lps[:k])
             if v != -math.inf}
        d.setdefault(self.tokenizer.token_str(int(tok)), tok_lp)
        return d

    # ------------------------------------------------------------------ text out

    def _holdback(self, c: ChoiceOutput) -> int:
        """Characters at the end of the text that could still begin a stop string."""
        if c.finish is not None:
            return 0
        text, hold = c.text, 0
        for s in self.request.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _logprobs_slice(self, c: ChoiceOutput, start: int, end: int) -> Logprobs:
        """Completion logprobs of tokens start..end-1; offsets count the prompt's characters first."""
        return Logprobs(
            tokens=[self.tokenizer.token_str(t) for t in c.token_ids[start:end]],
            token_logprobs=c.lps[start:end],
            top_logprobs=c.tops[start:end],
            text_offset=[self.prompt_chars + o for o in c.offsets[start:end]])

    def deltas(self) -> list[Delta]:
        """What each choice has to stream now (echo first; a finished choice's last delta once)."""
        r = self.request
        want_lp = r.logprobs is not None
        out = []
        for c in self.choices:
            text, lp = "", None
            if r.echo and not c.echo_sent:
                c.echo_sent = True
                text = self.prompt_text
                if want_lp:
                    lp = Logprobs()
                    lp.extend(self.prompt_logprobs or Logprobs())
            end = len(c.text) - self._holdback(c)
            if end > c.sent:
                text += c.text[c.sent:end]
                c.sent = end
            # The tokens whose text starts before `end` go with it (every token once finished);
            # offsets ascend: bisect keeps a long stream's per-step work constant.
            n_tok = bisect.bisect_left(c.offsets, end) if c.finish is None else len(c.token_ids)
            ids = []
            if n_tok > c.sent_tokens:
                ids = c.token_ids[c.sent_tokens:n_tok]
                if want_lp:
                    lp = lp or Logprobs()
                    lp.extend(self._logprobs_slice(c, c.sent_tokens, n_tok))
                c.sent_tokens = n_tok
            finished_now = c.finish is not None and not c.final_sent
            if text or ids or (lp is not None and lp.tokens) or finished_now:
                c.final_sent = c.final_sent or finished_now
                out.append(Delta(index=c.index, text=text, logprobs=lp,
                                 finish_reason=c.finish if finished_now else None, token_ids=ids))
        return out

    def result(self) -> Result:
        """The final answer: n choices (the best by mean sampled-token logprob when best_of > n)."""
        r = self.request
        ranked = self.choices
        if len(self.choices) > r.n:
            ranked = sorted(self.choices, key=lambda c: -(c.logprob_sum / max(c.generated, 1)))[: r.n]
        choices = []
        for i, c in enumerate(ranked):
            lp = None
            if r.logprobs is not None:
                lp = Logprobs()
                if r.echo and self.prompt_logprobs is not None:
                    lp.extend(self.prompt_logprobs)
                lp.extend(self._logprobs_slice(c, 0, len(c.token_ids)))
            choices.append(Choice(index=i, text=self.prompt_text + c.text, token_ids=list(c.token_ids),
                                  finish_reason=c.finish or "length", logprobs=lp))
        return Result(choices=choices, prompt_tokens=len(r.prompt), completion_tokens=self.generated,
                      prompt_logprobs=self.vllm_prompt_logprobs)
