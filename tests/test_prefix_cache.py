"""Prefix cache: the same tokens and logprobs with and without it (greedy, seeded sampling,
n/best_of, echo), hits within one plan and across plans, eviction in a tiny pool, the
counters, faults that fail only their requests, and nothing compiled after warm-up."""

import numpy as np
import pytest

from pgpt_jax import pool_programs
from pgpt_jax.engine import Engine
from pgpt_jax.prefix_cache import BLOCK_TOKENS, PrefixIndex, chain
from pgpt_jax.request import Delta, Limits, Request, Result
from pgpt_jax.tokenizer import get_tokenizer

NO_EOS = {50256: -100.0}
Q = BLOCK_TOKENS
rng = np.random.default_rng(0)
BASE = [int(t) for t in rng.integers(100, 5000, size=100)]  # a shared prefix: 3 whole blocks and more


def make(model, blocks: int, **kw) -> Engine:
    # Few shapes (buckets 32, 64, 128; up to 4 prompts of 64 a call): a quick warm-up.
    eng = Engine(model, get_tokenizer(), slots=4, decode_steps=3, limits=Limits(max_logprobs=3), min_bucket=32,
                 max_prefill_tokens=256, prefix_cache_blocks=blocks, **kw)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def engines(tiny_model):
    return make(tiny_model, 0), make(tiny_model, 64)


def run(engine, *requests):
    results = [None] * len(requests)

    def cb(i):
        def f(ev):
            if not isinstance(ev, Delta):
                results[i] = ev
        return f

    for i, r in enumerate(requests):
        engine.submit(r, cb(i))
    engine.run_until_idle()
    return results


def choices(result):
    assert isinstance(result, Result), result
    return [(c.token_ids, c.logprobs.token_logprobs if c.logprobs else None, c.finish_reason)
            for c in result.choices]


def same(a, b):
    """Tokens and finish reasons equal; logprobs equal up to float rounding (the cached
    prefix's KV came from another call shape: the same sums, maybe in another order)."""
    assert len(a) == len(b)
    for (ta, la, fa), (tb, lb, fb) in zip(a, b):
        assert ta == tb and fa == fb
        if la is not None:
            np.testing.assert_allclose(np.array(la, dtype=float), np.array(lb, dtype=float), atol=1e-5)


def requests():
    """Prompts that share prefixes (with each other and across calls), one a whole number of
    blocks long, one shorter than a block; greedy, seeded, n/best_of, echo + logprobs."""
    kw = dict(max_tokens=6, logit_bias=NO_EOS, logprobs=2)
    return [
        Request(prompt=BASE + [7, 8, 9], temperature=0.0, **kw),
        Request(prompt=BASE + [11] * 20, temperature=1.0, seed=3, **kw),
        Request(prompt=BASE[:2 * Q], temperature=0.0, **kw),  # exactly two blocks
        Request(prompt=BASE[:Q + 5], temperature=0.8, seed=5, n=2, best_of=3, **kw),
        Request(prompt=BASE[:10], temperature=0.0, **kw),  # shorter than a block
        Request(prompt=BASE + [7, 8], temperature=1.0, seed=9, echo=True, **kw),  # prompt logprobs: bypass
        Request(prompt=BASE + [1, 2, 3, 4], temperature=0.7, seed=1, n=3, **kw),
    ]


def test_same_outputs_and_logprobs_with_and_without_the_cache(engines):
    off, on = engines
    want = [choices(r) for r in run(off, *requests())]
    # Once all together (hits inside one plan: the first of a prefix prefills it, the
    # others read its blocks), then once more (hits across plans), then one by one.
    for got in (run(on, *requests()), run(on, *requests()), [run(on, r)[0] for r in requests()]):
        for w, g in zip(want, got):
            same(w, choices(g))
    assert on.prefix_cache.hit_blocks > 0 and on.prefix_cache_hit_rate > 0
    assert on.prefix_cache_blocks_used > 0 and off.prefix_cache_blocks_used == 0


def test_no_recompile_after_warmup_with_the_cache(engines):
    _, on = engines
    count = on.compile_count
    rs = requests() + [Request(prompt=[5] * (on.context_length - 8), max_tokens=8, logit_bias=NO_EOS),
                       Request(prompt=[5] * (on.context_length - 40), max_tokens=8, logit_bias=NO_EOS)]
    run(on, *rs)
    run(on, *rs)
    assert on.compile_count == count


def test_index_lru_eviction_and_pinning():
    idx = PrefixIndex(3, block_tokens=4)
    a, b = list(range(13)), [50] * 9
    assert idx.allocate(a) == {0: 0, 1: 1, 2: 2}
    assert idx.match(a) == [0, 1, 2] and idx.match(a[:12]) == [0, 1]  # not the block of the last token
    assert idx.allocate(b) == {}  # everything pinned by this plan: no room
    idx.unpin_all()
    assert idx.allocate(b) == {0: 2, 1: 1}  # a chain's last blocks go first
    assert idx.match(a) == [0] and idx.used == 3
    idx.forget([0])
    assert idx.match(a) == [] and idx.used == 2
    idx.clear()
    assert idx.used == 0 and idx.match(b) == []
    assert len(chain(a, 4)) == 3 and chain(a, 4)[0][0] != chain(b, 4)[0][0]


def test_tiny_pool_evicts_and_stays_exact(tiny_model, engines):
    off, _ = engines
    small = make(tiny_model, 3)  # room for one prompt's blocks
    prompts = [[int(t) for t in rng.integers(100, 5000, size=70)] + [i] for i in range(4)]
    rs = lambda: [Request(prompt=p, max_tokens=4, temperature=0.0, logprobs=1, logit_bias=NO_EOS)  # noqa: E731
                  for p in prompts]
    want = [choices(r) for r in run(off, *rs())]
    for _ in range(2):
        for w, g in zip(want, [run(small, r)[0] for r in rs()]):
            same(w, choices(g))
    assert small.prefix_cache_blocks_used <= 3
    for w, g in zip(want, [run(small, r)[0] for r in rs()[-1:]]):  # the last one is still cached
        same(want[-1], choices(g))
    assert small.prefix_cache.hit_blocks >= 2


def test_a_failing_cached_prefill_fails_only_its_requests(engines, monkeypatch):
    """A hit whose extend raises fails its request when it ran alone; a shared call that
    raises is retried prompt by prompt, whole, and each gets the uncached answer."""
    off, on = engines
    p = BASE + [42, 43]
    run(on, Request(prompt=p, max_tokens=2))  # its blocks are cached now
    real, calls = pool_programs.extend, []

    def first_fails(*a, **k):
        calls.append(1)
        if len(calls) in (1, 2):
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(pool_programs, "extend", first_fails)
    assert isinstance(run(on, Request(prompt=p, max_tokens=3))[0], RuntimeError)
    rs = lambda: [Request(prompt=BASE[:50] + [t], max_tokens=3, temperature=0.0, logit_bias=NO_EOS)  # noqa: E731
                  for t in (44, 45)]  # bucket 64: up to 4 rows a call
    got = run(on, *rs())  # one call of both: raises, then each is prefilled whole
    assert len(calls) == 2
    want = [choices(w) for w in run(off, *rs())]
    for w, g in zip(want, got):
        same(w, choices(g))
    again = run(on, *rs())  # one call of both, from the cache
    assert len(calls) == 3
    for w, g in zip(want, again):
        same(w, choices(g))


def test_a_failed_save_is_never_read(engines, monkeypatch):
    """Two prompts of one plan share a prefix nobody cached: the first is prefilled whole and
    saves its blocks, the second reads them. When the first fails, the second is prefilled
    whole instead (and equals the uncached answer); when a failed save consumed the pool, the
    pool and the index start again empty."""
    import jax

    from pgpt_jax import programs

    off, on = engines
    shared = [int(t) for t in rng.integers(100, 5000, size=70)]
    r = lambda tail: Request(prompt=shared + tail, max_tokens=3, temperature=0.0, logit_bias=NO_EOS)  # noqa: E731
    want = choices(run(off, r([1]), r([2]))[1])
    real, calls = programs.prefill, []

    def first_fails(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(programs, "prefill", first_fails)
    bad, good = run(on, r([1]), r([2]))
    assert isinstance(bad, RuntimeError) and len(calls) == 2  # the second was prefilled whole
    same(want, choices(good))
    monkeypatch.setattr(programs, "prefill", real)

    def consumes_the_pool(pool, *a, **k):
        for x in jax.tree.leaves(pool):
            x.delete()
        raise RuntimeError("injected")

    monkeypatch.setattr(pool_programs, "save_blocks", consumes_the_pool)
    assert isinstance(run(on, r([3]))[0], RuntimeError)
    assert on.prefix_cache_blocks_used == 0 and not on.executor.pool_lost()
    monkeypatch.undo()
    same(want, choices(run(on, r([2]))[0]))


def test_hit_shapes():
    """A hit computes the rest of its prompt into the whole prompt's bucket, only where the
    rest is at most half of it and its padding stays inside it; warm-up covers every such shape."""
    from pgpt_jax.scheduler import Scheduler

    s = Scheduler(4, 1024)
    assert s.extend_shape(800, 768) == (1024, 32)
    assert s.extend_shape(800, 0) is None
    assert s.extend_shape(100, 32) is None  # a rest of 68 tokens: bucket 128 > 64
    assert s.extend_shape(250, 160) is None  # 160 + a 128-token rest bucket runs past 256
    shapes = s.extend_shapes(Q)
    assert len(shapes) == 20
    assert all(s.extend_shape(n, m * Q) in shapes for n in range(2, 1025, 7) for m in range(1, (n - 1) // Q + 1)
               if s.extend_shape(n, m * Q))
