"""generate(): OpenAI-style completions for research scripts, run on the Engine (one code path)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

from pgpt_jax.engine import Engine
from pgpt_jax.model import GPT
from pgpt_jax.request import Choice, Constraint, Limits, QueueFull, Request, fim_prompt
from pgpt_jax.tokenizer import tokenizer_for

Prompt = Union[str, Sequence[int]]

# Engines generate() made, most recently used last. Each holds its model's params, a
# transposed LM head and a decode state on the device, so only a few are kept: a sweep over
# slot counts or models evicts the oldest (its compiled programs stay in jit's cache).
MAX_ENGINES = 2
_engines: "OrderedDict[tuple, tuple[GPT, Engine]]" = OrderedDict()


def engine_for(model: GPT, slots: int = 8, mesh=None, speculative: Optional[str] = None) -> Engine:
    """The engine generate() uses for `model`, slot count, mesh and speculation (made once,
    kept while recent). With `speculative` ("ngram:K[:MIN-MAX]") it times a verify call against
    a decode call first, as `pgpt-jax serve` does at warm-up: the planner verifies only where
    that pays."""
    key = (id(model), slots, mesh, speculative)
    if key in _engines and _engines[key][0] is model:
        _engines.move_to_end(key)
        return _engines[key][1]
    engine = Engine(model, tokenizer_for(model.config), slots=slots, mesh=mesh,
                    limits=Limits(max_logprobs=20, max_queue=1 << 30), speculative=speculative)
    if speculative is not None:
        engine.measure_costs()
    _engines[key] = (model, engine)
    while len(_engines) > MAX_ENGINES:
        _engines.popitem(last=False)
    return engine


def _is_single(prompt) -> bool:
    return isinstance(prompt, str) or (len(prompt) > 0 and all(isinstance(t, int) for t in prompt))


def generate(model: GPT, prompt: Union[Prompt, Sequence[Prompt]], *, max_tokens: Optional[int] = 16,
             temperature: float = 1.0, top_p: float = 1.0, n: int = 1, best_of: Optional[int] = None,
             logprobs: Optional[int] = None, echo: bool = False, stop=None,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias=None,
             seed: Optional[int] = None, suffix: Optional[str] = None, logprobs_mode: str = "raw_logprobs",
             constraint: Optional[Constraint] = None, slots: int = 8, mesh=None,
             speculative: Optional[str] = None):
    """Completes one prompt (a string or token ids) or a list of them, as the HTTP API would.

    Returns a list of `Choice`s (text, token_ids, finish_reason, logprobs in OpenAI's shape)
    for one prompt, or one such list per prompt. Scoring a text is
    `generate(model, text, max_tokens=0, echo=True, logprobs=k)`. Structured output:
    `constraint=Constraint("json", schema, "constraint")` (or "regex", "choice", "grammar").
    `speculative="ngram:4"`: n-gram speculative decoding (the same tokens, fewer calls where
    the text repeats; docs/benchmarks.md, "Speculative decoding").
    """
    single = _is_single(prompt)
    prompts = [prompt] if single else list(prompt)
    engine = engine_for(model, slots, mesh, speculative)
    tok = engine.tokenizer
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    results: list = [None] * len(prompts)
    for i, p in enumerate(prompts):
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        ids = ids or [tok.eos_id]
        echo_prompt = None
        if suffix:
            ids, echo_prompt = fim_prompt(ids, tok.encode(suffix), model.config.fim, model.config.fim_order), ids
        request = Request(prompt=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          n=n, best_of=best_of, logprobs=logprobs, echo=echo, stop=stop,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          logit_bias={int(k): v for k, v in (logit_bias or {}).items()},
                          seed=seed, echo_prompt=echo_prompt, logprobs_mode=logprobs_mode, constraint=constraint)

        def done(event, i=i):
            results[i] = event

        # A big offline job is fed as the engine takes it: the queue's token budget bounds what
        # waits (memory), so when it is spent the engine runs until the request fits.
        while True:
            try:
                engine.submit(request, done)
                break
            except QueueFull:
                if not engine.step():
                    raise
    engine.run_until_idle()
    for r in results:
        if isinstance(r, Exception):
            raise r
    out: list[list[Choice]] = [r.choices for r in results]
    return out[0] if single else out
