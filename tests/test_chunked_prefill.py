"""Chunked prefill (`Engine(prefill_chunk=C)`, planner.py): the same tokens and logprobs with
and without it (greedy, seeded, n/best_of, echo's bypass, with the prefix cache), one chunk a
plan beside the running streams' decode, reserved slots, an abort, a deadline and a stop
mid-prefill, a failing chunk, the prefix cache saving a chunked prompt's blocks, and nothing
compiled after warm-up."""

import time

import numpy as np
import pytest

from pgpt_jax import pool_programs
from pgpt_jax.engine import Engine
from pgpt_jax.executor import Decode, Drop, Extend, Prefill
from pgpt_jax.request import Delta, EngineUnavailable, Limits, Request, RequestTimeout, Result
from pgpt_jax.scheduler import Scheduler
from pgpt_jax.tokenizer import get_tokenizer

from test_prefix_cache import same  # tokens equal, logprobs up to rounding (other call shapes)

NO_EOS = {50256: -100.0}
C = 32  # the chunk: prompts of 33..128 tokens (buckets 64, 128) prefill in chunks
rng = np.random.default_rng(7)
LONG = [int(t) for t in rng.integers(100, 5000, size=120)]


def make(model, **kw) -> Engine:
    # The shapes of test_prefix_cache.py's engines (buckets 32, 64, 128): compiled once a session.
    eng = Engine(model, get_tokenizer(), slots=4, decode_steps=3, limits=Limits(max_logprobs=3), min_bucket=32,
                 max_prefill_tokens=256, **kw)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def engines(tiny_model):
    """Off, chunked, chunked with the prefix cache."""
    return make(tiny_model), make(tiny_model, prefill_chunk=C), make(tiny_model, prefill_chunk=C,
                                                                        prefix_cache_blocks=64)


class Outcome:
    def __init__(self):
        self.result, self.deltas = None, []

    def __call__(self, ev):
        if isinstance(ev, Delta):
            self.deltas.append(ev)
        else:
            self.result = ev


def submit(engine, *requests) -> list[Outcome]:
    outs = [Outcome() for _ in requests]
    for r, o in zip(requests, outs):
        o.handle = engine.submit(r, o)
    return outs


def run(engine, *requests) -> list:
    outs = submit(engine, *requests)
    engine.run_until_idle()
    return [o.result for o in outs]


def choices(result):
    assert isinstance(result, Result), result
    return [(c.token_ids, c.logprobs.token_logprobs if c.logprobs else None, c.finish_reason)
            for c in result.choices]


def requests():
    """Prompts in one chunk and in several (C + 1, a whole number of chunks, the context's
    bucket), greedy, seeded, n/best_of (more choices than slots: some wait for a slot and are
    placed from the kept prefill later), a short one, and echo with logprobs (not chunked)."""
    kw = dict(max_tokens=6, logit_bias=NO_EOS, logprobs=2)
    return [
        Request(prompt=LONG[:100], temperature=0.0, **kw),
        Request(prompt=LONG[:C + 1], temperature=1.0, seed=3, **kw),
        Request(prompt=LONG[:64], temperature=0.8, seed=5, n=2, best_of=3, **kw),
        Request(prompt=LONG[:10], temperature=0.0, **kw),
        Request(prompt=LONG[:90], temperature=1.0, seed=9, echo=True, **kw),  # prompt logprobs: prefilled whole
        Request(prompt=LONG[20:120], temperature=0.7, seed=1, n=3, **kw),
    ]


def test_same_outputs_and_logprobs_with_and_without_chunking(engines):
    off, on, cached = engines
    want = [choices(r) for r in run(off, *requests())]
    counts = on.compile_count, cached.compile_count
    for eng in (on, cached):
        # All together (chunked jobs queue up, one chunk a plan), again (the cache's hits),
        # then one by one.
        for got in (run(eng, *requests()), run(eng, *requests()), [run(eng, r)[0] for r in requests()]):
            for w, g in zip(want, got):
                same(w, choices(g))
        assert not eng.planner.chunking and not eng.executor.prefills and not any(eng.scheduler.reserved)
    assert cached.prefix_cache.hit_blocks > 0
    assert (on.compile_count, cached.compile_count) == counts


def plans(engine, monkeypatch) -> list:
    """Records each plan's ops."""
    seen, real = [], engine.planner.plan

    def spy():
        ops, meta = real()
        seen.append(list(ops))
        return ops, meta

    monkeypatch.setattr(engine.planner, "plan", spy)
    return seen


def test_one_chunk_a_plan_beside_the_running_decode(engines, monkeypatch):
    off, on, _ = engines
    stream = Request(prompt=LONG[:5], max_tokens=30, temperature=0.0, logit_bias=NO_EOS)
    long = Request(prompt=LONG[:120], max_tokens=4, temperature=0.0, logit_bias=NO_EOS)
    want = [choices(r) for r in run(off, stream, long)]
    seen = plans(on, monkeypatch)
    outs = submit(on, stream)
    on.step()
    outs += submit(on, long)
    on.run_until_idle()
    for w, o in zip(want, outs):
        same(w, choices(o.result))
    extends = [(i, op) for i, ops in enumerate(seen) for op in ops if isinstance(op, Extend)]
    assert all(sum(isinstance(op, Extend) for op in ops) <= 1 for ops in seen)
    assert len(extends) == 4  # 120 tokens in chunks of 32: [0, 32), [32, 64), [64, 96), [96, 120)
    assert [int(op.start[0]) for _, op in extends] == [0, 32, 64, 96] and int(extends[-1][1].lengths[0]) == 120
    assert extends[0][1].first and not any(op.first for _, op in extends[1:])
    assert all(op.tokens.shape == (1, C) and op.length == 128 for _, op in extends)
    assert not any(isinstance(op, Prefill) and op.tokens.shape[1] == 128 for ops in seen for op in ops)
    # The stream decodes in every plan that runs a chunk: it keeps its pace.
    assert all(any(isinstance(op, Decode) for op in seen[i]) for i, _ in extends)


def test_a_chunk_that_would_pad_past_its_cache_starts_earlier(tiny_model, engines, monkeypatch):
    """Chunks of 64 after a cached prefix of one 32-token block: the second chunk would pad
    past the 128-token cache, so it starts at T - C = 64 (computing 32 cached positions again)."""
    off = engines[0]
    eng = make(tiny_model, prefill_chunk=64, prefix_cache_blocks=64)
    p = LONG[:2] + LONG[:118]
    run(eng, Request(prompt=p[:40], max_tokens=1))  # prefilled whole: saves its one block
    seen = plans(eng, monkeypatch)
    r = Request(prompt=p, max_tokens=5, temperature=0.0, logprobs=1, logit_bias=NO_EOS)
    (got,) = run(eng, r)
    same(choices(run(off, r)[0]), choices(got))
    extends = [op for ops in seen for op in ops if isinstance(op, Extend)]
    assert extends[0].first and extends[0].reads is not None
    assert [int(op.start[0]) for op in extends] == [32, 64] and [int(op.lengths[0]) for op in extends] == [96, 120]
    assert extends[-1].writes is not None


def test_reserved_slots_neither_decode_nor_free():
    s = Scheduler(4, 128)
    s.place(0, "a", 5)
    s.reserve(2, "b")
    assert s.occupied == [0] and s.active == 1 and s.decode_shape(1) == (128, 1, 7)
    assert s.advance(1) == {0: "a"}
    s.waiting.extend([("e", 1), ("e", 2), ("e", 3)])
    assert [slot for _, _, slot in s.admissions()] == [1, 3]
    s.place(2, "b", 100)
    assert s.occupied == [0, 2]
    s.release(2)
    assert not any(s.reserved)


def test_abort_mid_prefill_frees_its_slot_and_drops_its_cache(engines):
    _, on, _ = engines
    (out,) = submit(on, Request(prompt=LONG[:120], max_tokens=4))
    for _ in range(3):  # admission (a reserved slot), then two chunks
        on.step()
    pid = out.handle._entry.prefix[0]
    assert pid in on.executor.prefills and pid in on.planner.chunking
    assert on.scheduler.reserved.count(True) == 1 and on.scheduler.active == 0
    out.handle.abort()
    on.step()
    assert out.handle.done and out.result is None
    assert not on.planner.chunking and not any(on.scheduler.reserved) and on.scheduler.owner == [None] * 4
    on.run_until_idle()
    assert pid not in on.executor.prefills


def test_a_deadline_mid_prefill_ends_it(engines):
    _, on, _ = engines
    (out,) = submit(on, Request(prompt=LONG[:120], max_tokens=4))
    on.step()
    on.step()
    out.handle._entry.deadline = time.monotonic() - 1  # as if --request-timeout had passed
    on.run_until_idle()
    assert isinstance(out.result, RequestTimeout)
    assert not on.planner.chunking and on.scheduler.owner == [None] * 4
    on.step()  # the next plan drops what it held
    assert not on.executor.prefills


def test_stopping_mid_prefill_answers_it(engines):
    _, on, _ = engines
    (out,) = submit(on, Request(prompt=LONG[:120], max_tokens=4))
    on.step()
    on.step()
    on.stop("bye", reopen=True)
    assert isinstance(out.result, EngineUnavailable)
    assert not on.planner.chunking and not any(on.scheduler.reserved)
    (r,) = run(on, Request(prompt=LONG[:100], max_tokens=2))  # and it serves again
    assert isinstance(r, Result) and not on.executor.prefills


def test_a_failing_chunk_fails_only_its_request(engines, monkeypatch):
    off, on, _ = engines
    short = Request(prompt=LONG[:10], max_tokens=8, temperature=0.0, logit_bias=NO_EOS)
    long = Request(prompt=LONG[:120], max_tokens=4, temperature=0.0, logit_bias=NO_EOS)
    want = choices(run(off, short)[0])
    real, calls = pool_programs.extend, {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("chunk boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(pool_programs, "extend", second_fails)
    got = run(on, short, long)
    same(want, choices(got[0]))
    assert isinstance(got[1], RuntimeError) and "chunk boom" in str(got[1])
    assert not on.planner.chunking and on.scheduler.owner == [None] * 4 and not on.executor.prefills
    monkeypatch.setattr(pool_programs, "extend", real)
    same(choices(run(off, long)[0]), choices(run(on, long)[0]))


def test_the_prefix_cache_saves_a_chunked_prompts_blocks(engines):
    off, _, cached = engines
    p = [int(t) for t in rng.integers(100, 5000, size=110)]
    r = lambda tail: Request(prompt=p + tail, max_tokens=5, temperature=0.0, logprobs=1, logit_bias=NO_EOS)  # noqa: E731
    run(cached, r([1]))  # chunked, from an empty cache: saves its 3 whole blocks
    hits = cached.prefix_cache.hit_blocks
    (got,) = run(cached, r([2, 3]))
    assert cached.prefix_cache.hit_blocks - hits == 3
    same(choices(run(off, r([2, 3]))[0]), choices(got))


def test_prefill_chunk_must_be_a_bucket(tiny_model):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny_model, get_tokenizer(), slots=2, min_bucket=32, prefill_chunk=48)
    # serve's default (256) on a model whose context is shorter: nothing to chunk
    assert Engine(tiny_model, get_tokenizer(), slots=2, prefill_chunk=256).prefill_chunk == 0


def test_drops_follow_a_finished_chunked_prefill(engines, monkeypatch):
    """The kept cache is dropped by the plan after the one that placed the last choice."""
    _, on, _ = engines
    seen = plans(on, monkeypatch)
    run(on, Request(prompt=LONG[:100], max_tokens=3))
    pids = {op.pid for ops in seen for op in ops if isinstance(op, Extend)}
    last = max(i for i, ops in enumerate(seen) if any(isinstance(op, Extend) for op in ops))
    assert len(pids) == 1 and any(isinstance(op, Drop) and op.pids == list(pids) for op in seen[last + 1])
    assert not on.executor.prefills


def test_timeline_marks_a_chunked_prefill(engines, tmp_path, monkeypatch):
    """PGPT_TIMELINE: a chunked prompt's prefill_dispatch is its first chunk's, prefill_return
    and prefill_done its last's."""
    from pgpt_jax import timeline

    monkeypatch.setattr(timeline, "PATH", str(tmp_path / "timeline.jsonl"))
    monkeypatch.setattr(timeline, "ON", True)
    _, on, _ = engines
    (out,) = submit(on, Request(prompt=LONG[:120], max_tokens=2))
    on.run_until_idle()
    deadline = time.monotonic() + 10
    while "prefill_done" not in out.handle.marks and time.monotonic() < deadline:  # a watcher thread sets it
        time.sleep(0.01)
    m = out.handle.marks
    assert m["placed"] <= m["prefill_dispatch"] <= m["prefill_return"] <= m["place_dispatch"]
    assert m["prefill_done"] >= m["prefill_dispatch"]


def test_a_batch_prompt_mid_prefill_gives_its_slot_back(engines):
    """A background (batch) request holding a reserved slot while its prompt is chunked gives
    it back to interactive work that lacks slots (its kept cache dropped); it starts over
    later and gives the answer it would have given."""
    off, on, _ = engines
    batch = Request(prompt=LONG[:120], max_tokens=4, temperature=0.0, logit_bias=NO_EOS, background=True)
    users = [Request(prompt=LONG[i:i + 8], max_tokens=6, temperature=0.0, logit_bias=NO_EOS) for i in range(4)]
    want = [choices(r) for r in run(off, batch, *users)]
    yielded = on.batch_yields
    (b,) = submit(on, batch)
    on.step()
    on.step()  # admitted (a reserved slot), then its first chunk
    assert on.scheduler.reserved.count(True) == 1
    outs = submit(on, *users)
    while not all(o.handle.done for o in [b, *outs]):
        on.run_until_idle()
    assert on.batch_yields > yielded
    for w, o in zip(want, [b, *outs]):
        same(w, choices(o.result))
    on.step()
    assert not on.planner.chunking and not on.executor.prefills and not any(on.scheduler.reserved)


def test_chunks_beside_a_speculating_row_change_no_output(tiny_model, engines):
    """Chunked prefill and speculative decoding together: a looping greedy row speculates while
    long prompts prefill in chunks and reserve slots (a Verify must neither decode nor read a
    reserved slot); every output is the one the plain engine gives."""
    off = engines[0]
    both = make(tiny_model, prefill_chunk=C, speculative="ngram:3")
    both.planner.speculation.verify_cost = None  # verify whenever a row proposes
    loop = Request(prompt=[7] * 12, max_tokens=40, temperature=0.0, logit_bias={7: 50.0})
    want = [choices(r) for r in run(off, loop, *requests())]
    count = both.compile_count
    got = submit(both, loop)
    for _ in range(3):  # the loop is running (and proposing) when the long prompts arrive
        both.step()
    got += submit(both, *requests())
    both.run_until_idle()
    for w, g in zip(want, got):
        same(w, choices(g.result))
    assert both.spec_accepted_tokens > 0 and both.compile_count == count
    assert not both.planner.chunking and not any(both.scheduler.reserved)
