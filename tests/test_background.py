"""Background (batch) requests: they take only the slots interactive work leaves free, give
them back when interactive work waits, and still answer exactly what they would alone."""

import pytest

from pgpt_jax.engine import Engine
from pgpt_jax.request import Limits, Request, RequestError, Result
from pgpt_jax.tokenizer import get_tokenizer

NO_EOS = {50256: -100.0}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, get_tokenizer(), slots=2, decode_steps=2, limits=Limits(max_queue=2))


def _submit(engine, request, results):
    i = len(results)
    results.append(None)

    def done(event):
        if not hasattr(event, "index"):  # the final event: a Result or an exception
            results[i] = event

    engine.submit(request, done)
    return i


def _sampled(prompt, background, **kw):
    kw.setdefault("max_tokens", 24)
    return Request(prompt=prompt, temperature=1.0, top_p=0.9, seed=7 + len(prompt), logit_bias=NO_EOS,
                   logprobs=2, background=background, **kw)


def _alone(engine, request) -> Result:
    out = []
    _submit(engine, request, out)
    engine.run_until_idle()
    return out[0]


def test_interactive_work_takes_its_slot_back_from_batch_work(engine):
    batch = [_sampled([464, 2068, 7586], True), _sampled([15496, 11, 616, 1438], True, n=2, best_of=2)]
    results = []
    for r in batch:
        _submit(engine, r, results)
    while not all(engine.scheduler.owner):  # both slots held by batch work...
        engine.step()
    for _ in range(3):  # ... which has generated a few tokens
        engine.step()
    assert all(run.entry.request.background for run in engine.scheduler.owner)
    yielded = engine.planner.yielded
    interactive = _sampled([40, 1101, 257], False, max_tokens=8)
    k = _submit(engine, interactive, results)
    engine.step()  # the very next plan places it
    assert any(run is not None and run.entry.request is interactive for run in engine.scheduler.owner)
    assert engine.planner.yielded > yielded
    engine.run_until_idle()
    assert all(isinstance(r, Result) for r in results), results
    # Each answer is the one it gives alone: a restart keeps the seed and drops what it made.
    for i, r in enumerate(batch + [interactive]):
        ref = _alone(engine, Request(**{**r.__dict__, "background": False}))
        got = results[i if i < len(batch) else k]
        assert [c.token_ids for c in got.choices] == [c.token_ids for c in ref.choices]
        for a, b in zip(got.choices, ref.choices):  # rows of another decode bucket: f32 rounding apart
            assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-5)
        assert got.completion_tokens == ref.completion_tokens  # dropped tokens are not counted twice


def test_batch_work_waits_behind_interactive_work(engine):
    results = []
    interactive = [_sampled([464, 2068], False, max_tokens=12), _sampled([318, 257], False, max_tokens=12)]
    _submit(engine, interactive[0], results)
    b = _submit(engine, _sampled([1757, 290], True, max_tokens=4), results)
    _submit(engine, interactive[1], results)  # submitted after the batch request, placed before it
    engine.step()
    placed = [run.entry.request for run in engine.scheduler.owner if run is not None]
    assert len(placed) == 2 and all(any(p is r for p in placed) for r in interactive)
    engine.run_until_idle()
    assert isinstance(results[b], Result) and len(results[b].choices[0].token_ids) == 4


def test_batch_work_is_outside_the_queue_budget_and_never_streams(engine):
    # max_queue=2: interactive work beyond it is refused, batch work (bounded by its runner) is not.
    results = []
    for _ in range(4):
        _submit(engine, _sampled([464], True, max_tokens=2), results)
    assert engine.queue_depth == 0
    with pytest.raises(RequestError) as err:
        engine.submit(_sampled([464], True, stream=True), lambda e: None)
    assert err.value.param == "stream"
    engine.run_until_idle()
    assert all(isinstance(r, Result) for r in results)
