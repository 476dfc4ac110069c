"""Speculative decoding (n-gram proposals, `--speculative`): the proposer, the verify program's
acceptance rule against plain decoding, and the engine with speculation on: greedy and seeded
outputs identical to plain decoding, the sampled law exact (a statistical check on the first
tokens), every request feature (logprobs, stop, n/best_of, echo, streaming, aborts) intact,
no compile after warm-up, the per-request opt-out and the counters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpt_jax import ngram, programs
from pgpt_jax.engine import Engine
from pgpt_jax.executor import Decode, Executor, Place, Prefill, Verify, row_args
from pgpt_jax.request import Limits, Request, Result
from pgpt_jax.tokenizer import get_tokenizer

from test_engine import run

NO_EOS = {50256: -100.0}
K = 3


def test_proposals_follow_the_latest_longest_match():
    ids = np.array([1, 2, 3, 4, 1, 2, 3, 4, 1, 2], np.int32)
    assert ngram.propose(ids, 4, 1, 3).tolist() == [3, 4, 1, 2]
    # The longest n first: "9 5" matches at 2, though "5" alone matches later (at 3).
    assert ngram.propose(np.array([5, 1, 9, 5, 2, 9, 5], np.int32), 2, 1, 3).tolist() == [2, 9]
    assert ngram.propose(np.array([5, 1, 9, 5, 2, 9, 5], np.int32), 2, 1, 1).tolist() == [2, 9]
    assert ngram.propose(np.array([7, 7, 7], np.int32), 4, 1, 3).tolist() == [7, 7, 7, 7]  # a copy that overlaps
    assert ngram.propose(np.array([1, 2, 3], np.int32), 4, 1, 3).size == 0
    assert ngram.propose(np.array([4, 1, 2, 3, 1, 2], np.int32), 3, 3, 3).size == 0  # min_n=3: no 3-gram repeats
    assert ngram.parse("ngram:4") == ngram.Speculative(4, 1, 3)
    assert ngram.parse("ngram:5:2-4") == ngram.Speculative(5, 2, 4)
    assert ngram.parse(None) is None and ngram.parse("off") is None
    for bad in ("ngram", "ngram:0", "eagle:3", "ngram:3:3-1", "ngram:x"):
        with pytest.raises(ValueError):
            ngram.parse(bad)


@pytest.fixture(scope="module")
def placed(tiny_model):
    """An executor with two rows placed (slot 0 greedy, slot 1 sampled under top_p, penalties
    and a bias), and a copy of its state to start each case from."""
    ex = Executor(tiny_model, slots=4, decode_steps=1, top_k=3)
    prompts = np.zeros((4, 16), np.int32)
    prompts[0, :5], prompts[1, :7] = [464, 2068, 7586, 21831, 11], [15496, 11, 616, 1438, 318, 1757, 290]
    ex.run(Prefill(1, prompts, np.array([5, 7, 1, 1], np.int32)))
    greedy = Request(prompt=[0] * 5, temperature=0.0, logprobs=2)
    sampled = Request(prompt=[0] * 7, temperature=1.0, top_p=0.9, presence_penalty=0.4, frequency_penalty=0.3,
                      logit_bias={11: 2.0}, logprobs=3, logprobs_mode="processed_logprobs")
    for slot, (r, length) in enumerate([(greedy, 5), (sampled, 7)]):
        jax.block_until_ready(ex.run(Place(1, slot, slot, length, row_args(r, 1234 + slot, 0))))
    return ex, jax.tree.map(jnp.copy, ex.state)


def _plain(ex, start, steps):
    ex.state = jax.tree.map(jnp.copy, start)
    outs = [ex.run(Decode(128, 4, 1)) for _ in range(steps)]
    return [np.concatenate([np.asarray(o[i]) for o in outs]) for i in range(4)]  # tokens [steps, 4], ...


def _verify(ex, start, proposals, lengths):
    ex.state = jax.tree.map(jnp.copy, start)
    return [np.asarray(a) for a in ex.run(Verify(128, 4, np.asarray(proposals, np.int32),
                                                 np.asarray(lengths, np.int32)))]


def test_verify_takes_what_plain_decoding_samples(placed):
    ex, start = placed
    plain = _plain(ex, start, K + 2)
    toks = plain[0]
    # Every proposal right: K + 1 tokens for both rows, the same tokens and logprobs.
    proposals = np.zeros((4, K), np.int32)
    proposals[:2] = toks[:K, :2].T
    out = _verify(ex, start, proposals, [K, K, 0, 0])
    assert out[4][:2].tolist() == [K + 1, K + 1] and out[4][2:].tolist() == [1, 1]
    np.testing.assert_array_equal(out[0][:, :2], toks[:K + 1, :2])
    np.testing.assert_allclose(out[1][:, :2], plain[1][:K + 1, :2], atol=1e-5)
    np.testing.assert_array_equal(out[2][:, :2], plain[2][:K + 1, :2])
    # The state goes on as plain decoding's: the next decode step gives plain token K+1.
    nxt = np.asarray(ex.run(Decode(128, 4, 1))[0])[0]
    assert nxt[:2].tolist() == toks[K + 1, :2].tolist()

    # Row 0's second proposal wrong: it takes two tokens (the second is plain's, not the
    # proposal); row 1 proposes nothing and takes one. Then plain decoding goes on from there.
    proposals[0, 1] = (toks[1, 0] + 1) % 50000
    out = _verify(ex, start, proposals, [K, 0, 0, 0])
    assert out[4][:2].tolist() == [2, 1]
    assert out[0][:2, 0].tolist() == toks[:2, 0].tolist() and out[0][0, 1] == toks[0, 1]
    nxt = np.asarray(ex.run(Decode(128, 4, 1))[0])[0]
    assert nxt[:2].tolist() == [toks[2, 0], toks[1, 1]]


def _engine(model, speculative, slots=8):
    return Engine(model, get_tokenizer(), slots=slots, decode_steps=1, limits=Limits(max_logprobs=5),
                  speculative=speculative)


@pytest.fixture(scope="module")
def engines(tiny_model):
    """The same engine shape with and without speculation (ngram:3, n-grams of 1..3). The
    speculating one verifies whenever a row proposes (no cost model): these tests are about
    what a Verify gives, `test_verify_goes_out_only_when_it_pays` about when it goes out."""
    plain, spec = _engine(tiny_model, None), _engine(tiny_model, f"ngram:{K}")
    plain.warmup()
    spec.warmup()
    assert set(spec.planner.speculation.verify_cost) == set(spec.scheduler.row_buckets)  # measured at warm-up
    spec.planner.speculation.verify_cost = None
    return plain, spec


LOOP = [464, 2068, 7586, 21831, 11, 464, 2068, 7586, 21831, 11, 464, 2068]  # repeats: proposals come at once


def _summary(res):
    return [(c.token_ids, c.text, c.finish_reason, c.logprobs and c.logprobs.tokens,
             c.logprobs and [sorted(t or {}) for t in c.logprobs.top_logprobs]) for c in res.choices]


def test_outputs_are_plain_decodings(engines):
    """Greedy rows, seeded sampled rows (top_p, penalties, bias, processed logprobs), n/best_of,
    stop strings, echo, and streaming: the same tokens, text and logprobs with speculation on,
    and speculation accepted tokens on the way."""
    plain, spec = engines
    reqs = [
        Request(prompt=LOOP, max_tokens=40, temperature=0.0, logprobs=3, logit_bias=NO_EOS),
        Request(prompt=LOOP[:7], max_tokens=30, temperature=0.0, echo=True, logprobs=1, stream=True),
        Request(prompt=LOOP, max_tokens=25, temperature=0.8, top_p=0.9, seed=7, n=2, best_of=3, logprobs=2,
                presence_penalty=0.3, frequency_penalty=0.2, logit_bias={11: 4.0, 50256: -100.0}),
        Request(prompt=LOOP, max_tokens=20, temperature=1.0, seed=8, logprobs=2, logprobs_mode="processed_logprobs",
                logit_bias={464: 6.0, 2068: 6.0}),
        Request(prompt=LOOP, max_tokens=30, temperature=0.0, stop=[" the", "ing"], stream=True),
    ]
    before = spec.spec_accepted_tokens
    a, da = run(plain, *reqs)
    b, db = run(spec, *reqs)
    for x, y in zip(a, b):
        assert isinstance(x, Result) and isinstance(y, Result)
        assert _summary(x) == _summary(y)
        for cx, cy in zip(x.choices, y.choices):
            if cx.logprobs:
                np.testing.assert_allclose([v for v in cx.logprobs.token_logprobs if v is not None],
                                           [v for v in cy.logprobs.token_logprobs if v is not None], atol=1e-4)
    assert "".join(d.text for d in db[1]) == b[1].choices[0].text
    assert "".join(d.text for d in db[4]) == b[4].choices[0].text
    assert spec.spec_accepted_tokens > before and spec.spec_proposed_tokens >= spec.spec_accepted_tokens


def test_the_sampled_law_is_exact(engines):
    """Tokens 2..6 of a T=1 row whose logit_bias makes three tokens likely (about 0.3 each, so
    that proposals are often right and often wrong), over 200 seeds: the law of each position
    over those three and "other" with speculation is plain decoding's within a total-variation
    bound of 0.1. The stronger check follows it: the rule is plain decoding's own draw at that
    position compared with the proposal, so the 200 seeded completions are the very same
    token for token (a rule that drew otherwise, exact in law or not, would change some)."""
    plain, spec = engines
    likely = (464, 2068, 7586)
    reqs = [Request(prompt=[464, 2068, 464, 2068, 7586, 464], max_tokens=6, temperature=1.0, seed=s,
                    logit_bias={t: 12.0 for t in likely}) for s in range(200)]
    a, _ = run(plain, *reqs)
    before = (spec.spec_proposed_tokens, spec.spec_accepted_tokens)
    b, _ = run(spec, *reqs)
    proposed, accepted = spec.spec_proposed_tokens - before[0], spec.spec_accepted_tokens - before[1]
    assert accepted > 50 and proposed - accepted > 50  # both branches of the rule ran, many times
    for t in range(1, 6):
        law = [np.bincount([likely.index(r.choices[0].token_ids[t]) if r.choices[0].token_ids[t] in likely else 3
                            for r in res], minlength=4) / len(res) for res in (a, b)]
        assert 0.5 * np.abs(law[0] - law[1]).sum() <= 0.1, (t, law)
    assert [r.choices[0].token_ids for r in a] == [r.choices[0].token_ids for r in b]


def test_rows_that_opt_out_or_are_constrained_take_one_token_a_call(engines):
    from pgpt_jax.request import Constraint

    _, spec = engines
    before = spec.spec_proposed_tokens
    res, _ = run(spec, Request(prompt=LOOP, max_tokens=12, temperature=0.0, speculative=False))
    assert isinstance(res[0], Result) and spec.spec_proposed_tokens == before
    res, _ = run(spec, Request(prompt=LOOP, max_tokens=6, seed=3,
                               constraint=Constraint("regex", "[ab]{1,5}", "structured_outputs.regex")))
    assert res[0].choices[0].text.strip("ab") == "" and spec.spec_proposed_tokens == before


def test_verify_goes_out_only_when_it_pays(engines):
    _, spec = engines
    loop = Request(prompt=[7] * 12, max_tokens=30, temperature=0.0, logit_bias={7: 50.0})  # 7 forever: every guess hits
    try:
        spec.planner.speculation.verify_cost = {r: 50.0 for r in spec.scheduler.row_buckets}  # never pays
        before = (spec.spec_proposed_tokens, spec.decode_calls)
        (res,), _ = run(spec, loop)
        assert spec.spec_proposed_tokens == before[0] and spec.decode_calls - before[1] == 29
        spec.planner.speculation.verify_cost = {r: 2.0 for r in spec.scheduler.row_buckets}  # a sure hit pays
        before = (spec.spec_proposed_tokens, spec.decode_calls)
        (again,), _ = run(spec, loop)
        assert spec.spec_proposed_tokens > before[0] and spec.decode_calls - before[1] <= 12
        assert again.choices[0].token_ids == res.choices[0].token_ids == [7] * 30
    finally:
        spec.planner.speculation.verify_cost = None


def test_no_compile_after_warmup_with_speculation(engines):
    _, spec = engines
    count = spec.compile_count
    L = spec.context_length
    reqs = [Request(prompt=LOOP * 2, max_tokens=30, temperature=0.0, n=3),
            Request(prompt=[5] * (L - 20), max_tokens=20, temperature=0.0),
            Request(prompt=LOOP, max_tokens=9, temperature=0.7, top_p=0.9, seed=1, logprobs=2, echo=True)]
    res, _ = run(spec, *reqs)
    assert all(isinstance(r, Result) for r in res)
    assert res[1].choices[0].finish_reason == "length" and len(res[1].choices[0].token_ids) <= 20
    assert spec.compile_count == count


def test_the_flag_and_the_request_field():
    from pgpt_jax.cli import build_parser, limits_from_args
    from server.chat_protocol import parse_chat
    from server.protocol import APIError, ModelInfo, parse_completion

    assert build_parser().parse_args(["serve", "--speculative", "ngram:4"]).speculative == ngram.Speculative(4)
    assert build_parser().parse_args(["run-batch", "-i", "a", "-o", "b", "--speculative", "ngram:2:2-3"]
                                     ).speculative == ngram.Speculative(2, 2, 3)
    assert build_parser().parse_args(["serve"]).speculative is None  # off by default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative", "draft:4"])
    info = ModelInfo("m", 50257, 128, False, limits_from_args(build_parser().parse_args(["serve"])), get_tokenizer())
    assert parse_completion({"model": "m", "prompt": "a"}, info).requests[0].speculative
    assert not parse_completion({"model": "m", "prompt": "a", "speculative": False}, info).requests[0].speculative
    chat = {"model": "m", "messages": [{"role": "user", "content": "a"}], "speculative": False}
    assert not parse_chat(chat, info).requests[0].speculative
    with pytest.raises(APIError) as e:
        parse_completion({"model": "m", "prompt": "a", "speculative": "no"}, info)
    assert e.value.param == "speculative" and e.value.status == 400


def test_an_abort_mid_speculation_ends_the_request_once(engines):
    _, spec = engines
    seen, accepted = [], spec.spec_accepted_tokens
    loop = Request(prompt=[7] * 12, max_tokens=60, temperature=0.0, logit_bias={7: 50.0}, stream=True)
    handle = spec.submit(loop, seen.append)
    for _ in range(4):
        spec.step()
    assert spec.spec_accepted_tokens > accepted and not handle.done  # verified calls ran
    handle.abort()
    spec.run_until_idle()
    assert handle.done and not any(isinstance(e, Result) for e in seen)  # aborted: nothing more is sent
    assert spec.active_slots == 0
    (res,), _ = run(spec, Request(prompt=LOOP, max_tokens=5, temperature=0.0))
    assert len(res.choices[0].token_ids) == 5


def test_a_verify_that_fails_fails_only_its_rows_once(engines, monkeypatch):
    _, spec = engines

    def broken(*args, **kwargs):
        raise RuntimeError("verify broke")

    monkeypatch.setattr(programs, "verify", broken)
    res, _ = run(spec, Request(prompt=[7] * 12, max_tokens=20, temperature=0.0, logit_bias={7: 50.0}))
    assert isinstance(res[0], RuntimeError) and "verify broke" in str(res[0])
    monkeypatch.undo()
    res, _ = run(spec, Request(prompt=[7] * 12, max_tokens=20, temperature=0.0, logit_bias={7: 50.0}))
    assert res[0].choices[0].token_ids == [7] * 20 and spec.active_slots == 0


def test_generate_takes_speculative(tiny_model):
    """`generate(..., speculative=...)`: its own engine (the plain one is not reused), the
    verify/decode cost timed before the first request, the same tokens as plain decoding."""
    from pgpt_jax.generate import engine_for, generate

    kw = dict(max_tokens=24, temperature=0.0, logit_bias=NO_EOS, slots=1)
    plain = generate(tiny_model, LOOP, **kw)
    spec = generate(tiny_model, LOOP, speculative=f"ngram:{K}", **kw)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    engine = engine_for(tiny_model, 1, speculative=f"ngram:{K}")
    assert engine is not engine_for(tiny_model, 1) and engine.speculative.k == K
    assert set(engine.planner.speculation.verify_cost) == set(engine.scheduler.row_buckets)
    with pytest.raises(ValueError):
        generate(tiny_model, LOOP, speculative="eagle:3", **kw)
