"""Engine: greedy parity with a plain argmax loop, batch invariance, n/best_of, stop strings,
streaming, echo logprobs, abort, context checks, and no recompiles after warm-up."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpt_jax import programs
from pgpt_jax.engine import Engine
from pgpt_jax.executor import Decode
from pgpt_jax.model import forward, init_cache, init_model
from pgpt_jax.programs import decode, init_state
from pgpt_jax.request import (Constraint, Delta, EngineUnavailable, Limits, QueueFull, Request, RequestError, RequestTimeout,
                              Result)
from pgpt_jax.tokenizer import get_tokenizer

NO_EOS = {50256: -100.0}  # random weights may pick EOS; keep lengths predictable


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=Limits(max_logprobs=5))
    eng.warmup()
    return eng


def run(engine, *requests):
    """Submits requests, runs the loop in this thread; returns (results, deltas per request)."""
    results, deltas = [None] * len(requests), [[] for _ in requests]

    def cb(i):
        def f(ev):
            if isinstance(ev, Delta):
                deltas[i].append(ev)
            else:
                results[i] = ev
        return f

    for i, r in enumerate(requests):
        engine.submit(r, cb(i))
    engine.run_until_idle()
    return results, deltas


def argmax_loop(model, prompt, steps):
    """The plainest greedy decoder: full forward over the whole sequence at every step."""
    T = 64  # one padded length, one compile: causal attention ignores what follows
    fwd = jax.jit(lambda toks: forward(model, toks, jnp.arange(T)[None], init_cache(model.config, 1, T))[0])
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, T), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(fwd(padded)[0, len(seq) - 1]))))
    return seq[len(prompt):]


PROMPTS = [[464, 2068, 7586], [15496, 11, 616, 1438, 318, 1757, 290], [40, 1101, 257, 1332, 13] * 5]


def test_greedy_matches_argmax_loop(engine, tiny_model):
    reqs = [Request(prompt=p, max_tokens=10, temperature=0.0) for p in PROMPTS]
    results, _ = run(engine, *reqs)
    for p, res in zip(PROMPTS, results):
        expect = argmax_loop(tiny_model, p, 10)
        got = res.choices[0].token_ids
        # EOS ends a choice early; compare up to it.
        if 50256 in expect:
            expect = expect[: expect.index(50256)]
        assert got == expect


def test_decode_runs_only_the_occupied_prefix_of_slots(engine):
    # rows=1 on a 4-slot state: slot 0 advances exactly as in an all-slots program, and the
    # other slots' tokens, positions and cache are left as they were.
    state = init_state(engine.config, 4)
    state.tokens = jnp.array([11, 22, 33, 44], jnp.int32)
    state.positions = jnp.array([3, 5, 7, 9], jnp.int32)
    copy = jax.tree.map(jnp.copy, state)
    kw = dict(steps=2, window=engine.scheduler.windows[0], top_k=engine.top_k)
    span = np.int32(kw["window"])
    full, toks_full = decode(engine.graphdef, engine.params, engine.head, copy, span, rows=4, **kw)[:2]
    part, toks_part = decode(engine.graphdef, engine.params, engine.head, state, span, rows=1, **kw)[:2]
    assert toks_part.shape == (2, 1) and toks_full.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(toks_part[:, 0]), np.asarray(toks_full[:, 0]))
    assert np.asarray(part.tokens).tolist()[1:] == [22, 33, 44]
    assert np.asarray(part.positions).tolist() == [5, 5, 7, 9]
    k, _ = part.cache[0]
    assert float(jnp.abs(k[1:]).max()) == 0.0 and float(jnp.abs(k[0]).max()) > 0.0
    assert engine.scheduler.row_buckets == (1, 4, 8)


def test_prompts_arriving_together_share_prefill_calls(engine):
    # Six prompts of one bucket in one iteration: 2 prefill calls (rows of 4: bucket 16 x 16
    # rows would exceed the 8 slots), each prompt's tokens as when it runs alone.
    assert engine.scheduler.prefill_rows[16] == (1, 4)
    prompts = [[100 + i] * (3 + i) for i in range(6)]
    reqs = [Request(prompt=p, max_tokens=5, temperature=0.0, logit_bias=NO_EOS) for p in prompts]
    alone = [run(engine, r)[0][0].choices[0].token_ids for r in reqs]
    before = engine.prefill_calls
    together, _ = run(engine, *reqs)
    assert engine.prefill_calls - before == 2
    assert [r.choices[0].token_ids for r in together] == alone


def test_bf16_params_are_upcast_once_on_cpu():
    # The embedded model ships bf16 params: the engine keeps float32 copies (XLA:CPU would
    # convert every matmul's weights each call) and decodes exactly like the bf16 model.
    model = init_model("tiny", seed=1, param_dtype="bfloat16")
    eng = Engine(model, get_tokenizer(), slots=2, decode_steps=2)
    assert {a.dtype for a in jax.tree.leaves(eng.params)} == {jnp.dtype(jnp.float32)}
    res, _ = run(eng, Request(prompt=PROMPTS[1], max_tokens=6, temperature=0.0))
    expect = argmax_loop(model, PROMPTS[1], 6)
    expect = expect[: expect.index(50256)] if 50256 in expect else expect
    assert expect and res[0].choices[0].token_ids == expect


def test_batch_invariance_seeded_and_greedy(engine):
    seeded = Request(prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=1234, logit_bias=NO_EOS)
    greedy = Request(prompt=PROMPTS[0], max_tokens=12, temperature=0.0, logit_bias=NO_EOS)
    alone, _ = run(engine, seeded, greedy)
    others = [Request(prompt=PROMPTS[i % 3], max_tokens=5 + i, temperature=0.5 + 0.1 * i, top_p=0.8,
                      presence_penalty=1.0, frequency_penalty=-0.5, seed=i, logprobs=2)
              for i in range(6)]
    crowded, _ = run(engine, *others[:3], seeded, *others[3:], greedy)
    assert crowded[3].choices[0].token_ids == alone[0].choices[0].token_ids
    assert crowded[7].choices[0].token_ids == alone[1].choices[0].token_ids
    assert len(alone[0].choices[0].token_ids) == 12


def test_n_shares_one_prefill_and_best_of_picks_highest_mean_logprob(engine):
    before = engine.prefill_calls
    res, _ = run(engine, Request(prompt=PROMPTS[1], n=4, max_tokens=6, seed=7, logprobs=0, logit_bias=NO_EOS))
    assert engine.prefill_calls == before + 1
    cands = res[0].choices
    assert len(cands) == 4 and len({tuple(c.token_ids) for c in cands}) > 1
    means = [np.mean(c.logprobs.token_logprobs) for c in cands]
    best_two = {tuple(cands[i].token_ids) for i in np.argsort(means)[-2:]}

    before = engine.prefill_calls
    res, _ = run(engine, Request(prompt=PROMPTS[1], n=2, best_of=4, max_tokens=6, seed=7, logit_bias=NO_EOS))
    assert engine.prefill_calls == before + 1
    assert {tuple(c.token_ids) for c in res[0].choices} == best_two
    assert res[0].completion_tokens == 4 * 6  # every candidate's tokens count


def test_stop_strings_across_and_inside_tokens_and_streaming(engine):
    tok = engine.tokenizer
    base, _ = run(engine, Request(prompt=PROMPTS[2], max_tokens=20, temperature=0.0, logit_bias=NO_EOS))
    ids = base[0].choices[0].token_ids
    text = base[0].choices[0].text
    pieces = [tok.decode([t]) for t in ids]
    # A stop string that spans the boundary between tokens 3 and 4.
    a, b = pieces[3], pieces[4]
    across = (a[-2:] if len(a) >= 2 else a) + b[:1]
    # One that lies strictly inside a single token (at least 3 characters long).
    k = next(i for i, p in enumerate(pieces) if len(p) >= 3 and "\ufffd" not in p)
    inside = pieces[k][1:-1]
    for stop in (across, inside):
        cut = text.index(stop)
        req = Request(prompt=PROMPTS[2], max_tokens=20, temperature=0.0, logit_bias=NO_EOS,
                      stop=[stop, "zzzzqqqq"], stream=True, logprobs=1)
        res, deltas = run(engine, req)
        choice = res[0].choices[0]
        assert choice.text == text[:cut] and choice.finish_reason == "stop"
        streamed = "".join(d.text for d in deltas[0])
        assert streamed == choice.text
        assert deltas[0][-1].finish_reason == "stop"
        assert all(stop not in d.text for d in deltas[0])
        assert sum(len(d.logprobs.tokens) for d in deltas[0] if d.logprobs) == len(choice.token_ids)


def test_streamed_deltas_concatenate_to_final_text(engine):
    req = Request(prompt=PROMPTS[0], max_tokens=15, temperature=1.0, seed=3, n=2, stream=True, echo=True)
    res, deltas = run(engine, req)
    prompt_text = engine.tokenizer.decode(PROMPTS[0])
    for c in res[0].choices:
        mine = [d for d in deltas[0] if d.index == c.index]
        assert "".join(d.text for d in mine) == c.text
        assert mine[0].text.startswith(prompt_text)  # echo goes out first, once
        assert [d.finish_reason for d in mine].count(c.finish_reason) == 1 and mine[-1].finish_reason
        assert len(mine) > 2  # streamed as it was made, not in one piece


def test_echo_logprobs_with_max_tokens_zero_match_forward(engine, tiny_model):
    prompt = PROMPTS[1]
    res, _ = run(engine, Request(prompt=prompt, max_tokens=0, echo=True, logprobs=3))
    c = res[0].choices[0]
    tok = engine.tokenizer
    assert c.text == tok.decode(prompt) and c.finish_reason == "length"
    assert res[0].completion_tokens == 0
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens == [tok.token_str(t) for t in prompt]
    cfg = tiny_model.config
    logits, _ = forward(tiny_model, np.array([prompt]), np.arange(len(prompt))[None], init_cache(cfg, 1, len(prompt)))
    ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        top = np.argsort(ref[i - 1])[::-1][:3]
        for t in top:
            assert lp.top_logprobs[i][tok.token_str(int(t))] == pytest.approx(float(ref[i - 1, t]), abs=1e-4)
    assert lp.text_offset == [len(tok.decode(prompt[:i])) for i in range(len(prompt))]


def same_logprobs(a, b, tol=1e-5):
    if a is None or b is None:
        assert a is b
        return
    assert (a.tokens, a.text_offset) == (b.tokens, b.text_offset)
    assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=tol)
    assert [t and sorted(t) for t in a.top_logprobs] == [t and sorted(t) for t in b.top_logprobs]
    for x, y in zip(a.top_logprobs, b.top_logprobs):
        assert x is None or x == pytest.approx(y, abs=tol)


def test_scoring_requests_share_prefill_calls_and_keep_nothing(engine):
    # Prompt-logprob prefills batch like the others (rows of 4 at bucket 16): six prompts
    # scored only (max_tokens 0) in two calls, each answer the same as when it runs alone,
    # whatever the others ask (top 1, top 3, 0, prompt_logprobs with ranks); no KV kept.
    prompts = [[100 + i, 7 * i + 1, 3, 900 + i] + [5] * i for i in range(6)]
    asks = [dict(echo=True, logprobs=1), dict(echo=True, logprobs=3), dict(echo=True, logprobs=0),
            dict(prompt_logprobs=2), dict(echo=True, logprobs=1, prompt_logprobs=0), dict(echo=True, logprobs=5)]
    reqs = [Request(prompt=p, max_tokens=0, **a) for p, a in zip(prompts, asks)]
    alone = [run(engine, r)[0][0] for r in reqs]
    before = engine.prefill_calls
    together, _ = run(engine, *reqs)
    assert engine.prefill_calls - before == 2
    for a, t, r in zip(alone, together, reqs):
        assert t.prompt_logprobs == a.prompt_logprobs
        # Top 1 alone goes straight from the LM head, the mixed call through written-out logits:
        # the same numbers up to float rounding.
        same_logprobs(t.choices[0].logprobs, a.choices[0].logprobs)
        if r.echo:
            k = r.logprobs
            assert all(len(top) == k or len(top) == k + 1 for top in t.choices[0].logprobs.top_logprobs[1:])
    assert together[3].prompt_logprobs[1][str(prompts[3][1])]["rank"] >= 1  # ranks were computed
    assert not engine.executor.prefills  # scored prompts keep no KV, and nothing was left behind


def test_a_scoring_job_runs_beside_generation(engine):
    # Scoring takes one prefill call an iteration, next to the decode of a generating request.
    gen = Request(prompt=PROMPTS[0], max_tokens=12, temperature=0.0, logit_bias=NO_EOS)
    scoring = [Request(prompt=[200 + i] * 20, max_tokens=0, echo=True, logprobs=1) for i in range(9)]
    results, _ = run(engine, gen, *scoring)
    assert results[0].choices[0].token_ids == argmax_loop(engine.model, PROMPTS[0], 12)
    assert all(len(r.choices[0].logprobs.tokens) == 20 for r in results[1:])
    assert not engine.planner.scoring and not engine.executor.prefills


def test_completion_text_offsets_start_after_prompt(engine):
    tok = engine.tokenizer
    res, _ = run(engine, Request(prompt=PROMPTS[0], max_tokens=5, temperature=0.0, logprobs=2, logit_bias=NO_EOS))
    lp = res[0].choices[0].logprobs
    base = len(tok.decode(PROMPTS[0]))
    assert lp.text_offset[0] == base
    assert all(len(d) <= 3 for d in lp.top_logprobs)
    assert "".join(lp.tokens) == res[0].choices[0].text


def test_logit_bias_forces_and_bans(engine):
    res, _ = run(engine, Request(prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=0, logit_bias={262: 100.0}))
    assert res[0].choices[0].token_ids == [262] * 6
    greedy, _ = run(engine, Request(prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logit_bias=NO_EOS))
    first = greedy[0].choices[0].token_ids[0]
    banned, _ = run(engine, Request(prompt=PROMPTS[0], max_tokens=6, temperature=0.0,
                                    logit_bias={first: -100.0, **NO_EOS}))
    assert first not in banned[0].choices[0].token_ids


def test_context_limit_rejected_before_device(engine):
    before = engine.prefill_calls
    L = engine.context_length
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1] * (L - 3), max_tokens=10), lambda ev: None)
    assert e.value.code == "context_length_exceeded"
    assert f"maximum context length is {L} tokens" in e.value.message
    assert f"{L + 7} tokens ({L - 3} in your prompt; 10 for the completion)" in e.value.message
    assert engine.prefill_calls == before
    # max_tokens=None runs to the context: a 'length' finish exactly at L tokens.
    res, _ = run(engine, Request(prompt=[1] * (L - 4), max_tokens=None, temperature=0.0, logit_bias=NO_EOS))
    assert res[0].choices[0].finish_reason == "length"
    assert res[0].completion_tokens == 4


def test_abort_frees_slots_in_threaded_loop(engine):
    engine.start()
    try:
        got_first = threading.Event()
        final = []

        def cb(ev):
            if isinstance(ev, Delta):
                got_first.set()
            else:
                final.append(ev)

        handles = [engine.submit(Request(prompt=PROMPTS[0], max_tokens=100, stream=True, n=2,
                                         logit_bias=NO_EOS), cb) for _ in range(2)]
        assert got_first.wait(60)
        assert engine.active_slots > 0
        for h in handles:
            h.abort()
        for _ in range(200):
            if engine.active_slots == 0:
                break
            threading.Event().wait(0.05)
        assert engine.active_slots == 0
        done = threading.Event()
        out = []
        engine.submit(Request(prompt=PROMPTS[0], max_tokens=4, temperature=0.0),
                      lambda ev: (out.append(ev), done.set()))
        assert done.wait(60) and isinstance(out[0], Result)
    finally:
        engine.stop(reopen=True)  # the module engine goes on under run_until_idle


@pytest.fixture(scope="module")
def chunked(tiny_model, engine):
    """The engine's shapes with chunked prefill (prompts over 32 tokens in chunks of 32):
    warm-up compiles only the chunks' programs after `engine`'s."""
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=Limits(max_logprobs=5),
                 prefill_chunk=32)
    eng.warmup()
    return eng


def mixed_requests(L: int) -> list:
    """Requests of every kind (buckets, sampling parameters, n/best_of, logprobs, echo, stop,
    scoring only, a constraint): together they run every program shape warm-up compiles."""
    mixed = [
        Request(prompt=[5] * n_prompt, max_tokens=mt, temperature=t, top_p=p, n=n, best_of=bo, logprobs=lp,
                echo=echo, stop=stop, presence_penalty=pp, frequency_penalty=fp, logit_bias=bias, seed=s)
        for n_prompt, mt, t, p, n, bo, lp, echo, stop, pp, fp, bias, s in [
            (1, 5, 0.0, 1.0, 1, None, None, False, (), 0.0, 0.0, None, None),
            (17, 9, 0.7, 0.9, 2, 3, 2, True, ("a",), 0.5, 0.3, {11: 5.0}, 1),
            (40, 3, 1.3, 0.5, 1, None, 5, True, (), -1.0, 2.0, None, 2),
            (L - 20, 20, 1.0, 1.0, 3, None, 0, False, ("the", "of"), 0.0, 0.0, {50256: -100.0}, 3),
            (70, 0, 1.0, 1.0, 1, None, 3, True, (), 0.0, 0.0, None, None),
        ]]
    # Chunked (on `chunked`): prompts of 33..128 tokens, in both buckets past the chunk.
    mixed.append(Request(prompt=[7] * 50, max_tokens=4, temperature=0.9, n=2, seed=6, logprobs=1))
    # A constrained request decodes one step a call: those programs are warmed up too.
    mixed.append(Request(prompt=[5] * 3, max_tokens=6, n=2, seed=4,
                         constraint=Constraint("regex", "[ab]{1,5}", "structured_outputs.regex")))
    return mixed


@pytest.mark.parametrize("which", ["engine", "chunked"])
def test_no_recompile_after_warmup(which, request):
    engine = request.getfixturevalue(which)
    count = engine.compile_count
    results, _ = run(engine, *mixed_requests(engine.context_length))
    assert all(isinstance(r, Result) for r in results)
    assert all(c.text.strip("ab") == "" for c in results[-1].choices)
    assert engine.compile_count == count


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
def test_rows_read_by_position_decode_at_one_window(monkeypatch, kernel):
    """On CPU, "auto" attention reads only what the rows' positions need for every decode call
    in float32 when the native kernel is built, and else in blocks for calls of 8 rows or more
    (attention.py), so those calls take the context as their window: 8 rows decoding from
    position 100 past 128 run one decode shape, (8 rows, 256), their span growing, and warm-up
    compiles that one shape for those buckets (every window for the others). (The module's
    tiny model has a single window; this one has two. No warm-up: compiles only what the
    requests run; test_scheduler.py checks every shape a decode call can take is among those
    warm-up compiles.)"""
    from pgpt_jax import cpu_kernels
    from pgpt_jax.config import GPTConfig

    if not kernel:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # no compiler: XLA's paths
    model = init_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=256, name="tiny-256"))
    eng = Engine(model, get_tokenizer(), slots=8, decode_steps=1, min_bucket=128)
    sched = eng.scheduler
    if kernel:
        assert sched.windows == (128, 256) and sched.context_window_rows == {1, 4, 8}
        assert sched.decode_shapes() == [(1, 256), (4, 256), (8, 256)]
    else:
        assert sched.windows == (128, 256) and sched.context_window_rows == {8}
        assert sched.decode_shapes() == [(1, 128), (1, 256), (4, 128), (4, 256), (8, 256)]
    decodes, real = [], eng.executor.run

    def recording(op):
        if isinstance(op, Decode):
            decodes.append(op)
        return real(op)

    monkeypatch.setattr(eng.executor, "run", recording)
    results, _ = run(eng, *[Request(prompt=[5 + i] * 100, max_tokens=40, temperature=0.0, logit_bias=NO_EOS)
                            for i in range(8)])
    assert all(isinstance(r, Result) and len(r.choices[0].token_ids) == 40 for r in results)
    assert {(op.rows, op.window) for op in decodes} == {(8, 256)}
    assert min(op.span for op in decodes) <= 128 < max(op.span for op in decodes)


def test_no_recompile_after_warmup_with_speculation(tiny_model):
    """Speculative decoding's verify (K proposals, every decode shape) is warmed up too; the
    engine's other programs are the module engine's (the same shapes: compiled once)."""
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=Limits(max_logprobs=5),
                 speculative="ngram:3")
    eng.warmup()
    eng.planner.speculation.verify_cost = None  # verify whenever a row proposes
    count = eng.compile_count
    loop = Request(prompt=[7] * 12, max_tokens=40, temperature=0.0, logit_bias={7: 50.0})
    results, _ = run(eng, *mixed_requests(eng.context_length), loop)
    assert all(isinstance(r, Result) for r in results)
    assert eng.spec_accepted_tokens > 0 and eng.compile_count == count


def test_seeds_use_all_64_bits(engine):
    kw = dict(prompt=PROMPTS[1], max_tokens=8, temperature=1.0, logit_bias=NO_EOS)
    tokens = {}
    for seed in (5, 5 + 2**32, 2**32, 0, -5, 2**63 - 1, -(2**63)):
        res, _ = run(engine, Request(seed=seed, **kw))
        tokens[seed] = res[0].choices[0].token_ids
    assert tokens[5] != tokens[5 + 2**32] and tokens[0] != tokens[2**32]
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)
    again, _ = run(engine, Request(seed=5 + 2**32, **kw))
    assert again[0].choices[0].token_ids == tokens[5 + 2**32]
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1, 2], seed=2**63), lambda ev: None)
    assert e.value.param == "seed"


def test_engine_survives_a_device_call_that_fails_after_consuming_its_state(engine, monkeypatch):
    # The failing call really runs (so the donated state is consumed), then raises: the
    # requests it touched get the exception, and the engine serves the next request on a
    # fresh state rather than on deleted buffers.
    real, calls = programs.decode, {"n": 0}

    def failing_once(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device failure")
        return out

    monkeypatch.setattr(programs, "decode", failing_once)
    engine.start()
    try:
        events = []
        first, second = threading.Event(), threading.Event()
        engine.submit(Request(prompt=PROMPTS[0], max_tokens=8), lambda ev: (events.append(ev), first.set()))
        assert first.wait(60) and isinstance(events[0], RuntimeError)
        engine.submit(Request(prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logit_bias=NO_EOS),
                      lambda ev: (events.append(ev), second.set()))
        assert second.wait(60) and isinstance(events[1], Result)
        assert events[1].choices[0].token_ids == argmax_loop(engine.model, PROMPTS[0], 6)
        assert engine.active_slots == 0 and calls["n"] >= 2
    finally:
        engine.stop(reopen=True)


# ----------------------------------------------------------------------------- request lifecycle

POISON = 4242  # a prompt that starts with this token makes the patched prefill raise


def poisoned_prefill(monkeypatch):
    real = programs.prefill

    def prefill(graphdef, params, head, tokens, *args, **kwargs):
        if (np.asarray(tokens)[:, 0] == POISON).any():
            raise RuntimeError("injected prefill failure")
        return real(graphdef, params, head, tokens, *args, **kwargs)

    monkeypatch.setattr(programs, "prefill", prefill)


def test_a_prefill_that_raises_fails_only_its_request(engine, monkeypatch):
    poisoned_prefill(monkeypatch)
    good = Request(prompt=[11, 12, 13], max_tokens=5, temperature=0.0, logit_bias=NO_EOS)
    bad = Request(prompt=[POISON, 12, 13], max_tokens=5, temperature=0.0, logit_bias=NO_EOS)
    # Same bucket, same iteration: they share a prefill call, which raises; each is retried alone.
    results, _ = run(engine, good, bad, Request(prompt=[POISON, 1], max_tokens=0, echo=True, logprobs=1))
    assert isinstance(results[0], Result) and len(results[0].choices[0].token_ids) == 5
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)
    assert engine.active_slots == 0 and engine.queue_depth == 0 and not engine.registry.entries
    assert run(engine, good)[0][0].choices[0].token_ids == results[0].choices[0].token_ids


def test_queued_requests_hold_only_their_budget_and_a_request_is_taken_whole(tiny_model):
    limits = Limits(max_logprobs=5, max_queued_tokens=200)
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=limits)
    first = eng.submit(Request(prompt=[1] * 10, max_tokens=40, n=2), lambda ev: None)  # 2 x 50 tokens
    assert (eng.queue_depth, eng.registry.queued_tokens) == (2, 100)
    with pytest.raises(QueueFull, match="token budget"):  # 3 x 50 more would pass 200: none is taken
        eng.submit_all([Request(prompt=[1] * 10, max_tokens=40)] * 3, [lambda ev: None] * 3)
    assert (eng.queue_depth, eng.registry.queued_tokens) == (2, 100)
    eng.submit(Request(prompt=[1] * 10, max_tokens=40), lambda ev: None)
    eng.run_until_idle()  # prefilled only now, when they get slots; the budget comes back
    assert first.done and (eng.queue_depth, eng.registry.queued_tokens) == (0, 0)


def threaded(eng, request):
    """Submits on a started engine; returns (event holder, done Event)."""
    out, done = [], threading.Event()
    eng.submit(request, lambda ev: (out.append(ev), done.set()) if not isinstance(ev, Delta) else None)
    return out, done


def test_deadlines_end_requests_and_free_their_slots(tiny_model):
    limits = Limits(max_logprobs=5, request_timeout=0.5, queue_timeout=0.3)
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=limits)
    eng.start()
    try:
        # 64 choices of 124 tokens on 8 slots: far more than 0.5 s of work.
        hog, hog_done = threaded(eng, Request(prompt=[5] * 4, max_tokens=None, n=64, logit_bias=NO_EOS))
        assert wait_for(lambda: eng.active_slots == 8)
        late, late_done = threaded(eng, Request(prompt=[6] * 4, max_tokens=3))
        assert late_done.wait(10) and isinstance(late[0], RequestTimeout) and late[0].where == "queue"
        assert hog_done.wait(10) and isinstance(hog[0], RequestTimeout) and hog[0].where == "request"
        assert wait_for(lambda: eng.active_slots == 0 and eng.queue_depth == 0)
    finally:
        eng.stop()


class _Kill(BaseException):
    """What no `except Exception` catches: the engine loop itself dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop dies on purpose
def test_when_the_loop_dies_every_request_is_answered_at_once(tiny_model):
    eng = Engine(tiny_model, get_tokenizer(), slots=8, decode_steps=3, limits=Limits(max_logprobs=5))
    eng.start()
    waiting = [threaded(eng, Request(prompt=[7] * 4, max_tokens=None, n=4, logit_bias=NO_EOS)) for _ in range(4)]
    assert wait_for(lambda: eng.active_slots == 8) and eng.alive
    real = eng.step

    def dying_step():
        real()
        raise _Kill("injected")

    eng.step = dying_step
    t0 = time.monotonic()
    for out, done in waiting:
        assert done.wait(5) and isinstance(out[0], EngineUnavailable)
    assert time.monotonic() - t0 < 1.0 + 0.5  # at once (allowing one iteration in flight)
    assert not eng.alive and isinstance(eng.dead, _Kill)
    with pytest.raises(EngineUnavailable):
        eng.submit(Request(prompt=[1], max_tokens=1), lambda ev: None)
    eng.stop()


def test_control_tokens_are_refused_as_logit_bias_keys():
    from pgpt_jax.config import FIM_SUFFIX
    from pgpt_jax.request import validate

    limits = Limits()
    validate(Request(prompt=[1], logit_bias={FIM_SUFFIX: 1.0}), limits, 50260, 128)  # a plain model's vocab
    with pytest.raises(RequestError) as e:
        validate(Request(prompt=[1], logit_bias={FIM_SUFFIX: 1.0}), limits, 50260, 128, never=(FIM_SUFFIX,))
    assert e.value.param == "logit_bias"


def test_no_recompile_after_warmup_with_params_already_placed():
    """A model whose params are already committed to a device (as a restored checkpoint's
    are) warms up the same programs that serving then calls: warm-up's placeholders and the
    fresh decode state must match serving's arguments in committed-ness, a part of the jit
    cache key (the embedded model compiled insert, start_row and decode again on its first
    request when they did not)."""
    from flax import nnx

    model = init_model("tiny", seed=1)
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    eng = Engine(model, get_tokenizer(), slots=2, decode_steps=2, min_bucket=model.config.n_positions)
    eng.warmup()
    count = eng.compile_count
    for _ in range(2):  # the second runs on the state after a first request
        results, _ = run(eng, Request(prompt=[5, 6, 7], max_tokens=4, temperature=0.7, seed=1))
        assert isinstance(results[0], Result)
    assert eng.compile_count == count


def test_decode_calls_stop_at_max_tokens_and_shorten_near_the_end(engine, monkeypatch):
    """The planner sends no decode call once every row's last token (max_tokens) is in flight,
    and a 1-step call when a row is closer to its end than `decode_steps` (3 here) or a
    choice waits for a slot; steady rows run 3 steps a call."""
    calls = []
    real = engine.executor.run
    monkeypatch.setattr(engine.executor, "run",
                        lambda op: (calls.append(op.steps) if isinstance(op, Decode) else None, real(op))[1])
    kw = dict(prompt=PROMPTS[0], temperature=0.0, logit_bias={50256: -100.0})
    (r,), _ = run(engine, Request(max_tokens=9, **kw))
    assert len(r.choices[0].token_ids) == 9
    assert calls == [3, 3, 1, 1]  # 1 (the prefill's) + 3 + 3, then 1 at a time: 9, none past it
    calls.clear()
    run(engine, Request(max_tokens=1, **kw))
    assert calls == []  # the first token, sampled with the prefill, was all it needed
    calls.clear()
    # 9 choices for 8 slots: while one waits, calls are 1 step, so that its slot comes soonest.
    (r,), _ = run(engine, Request(max_tokens=7, n=9, seed=1, **{**kw, "temperature": 1.0}))
    assert all(len(c.token_ids) == 7 for c in r.choices)
    first_wave = calls[: calls.index(3)] if 3 in calls else calls
    assert first_wave and set(first_wave) == {1}
