"""Reproducibility as a contract (docs/api.md, "Reproducibility"): a seeded request returns the
same tokens and logprobs whatever runs beside it.

One 32-slot engine on the tiny model serves the whole grid, so each program shape compiles
once: prompts of one bucket (16) prefilled alone or 4 to a call, decodes of 1, 4, 8, 16 and
32 rows. Five target requests (sampled with top_p and n=2, best_of, greedy, penalties,
logit_bias; all with logprobs) are run alone first: that is the reference. Then each
situation of the grid runs them again and compares: beside neighbours whose every parameter
differs (temperature, top_p, penalties, logit_bias, n, logprobs, stop, max_tokens), in low
and high slots (the last two rows of a 32-row decode included), before and behind the
neighbours, submitted together or one by one into a running batch, with a neighbour that is
aborted mid-way, streamed, through generate(), and through the HTTP server streamed and not.

What is compared: token ids, text, finish reasons, text offsets and the top-logprobs' tokens
exactly; logprob values to ATOL. The values are not bit-exact in every situation: XLA:CPU's
matmuls round a row differently depending on how many rows the call has and where the row
sits in it. On this tiny model (2 layers of 64), on the AVX2 machine this was written on,
only the last two rows of a 32-row call differ, by one ulp, and every other cell of the grid
is bit-exact; on wider models (the embedded model, GPT-2) nearly every change of the row
count moves a logprob by a few 1e-6.
Sampling adds nothing to that: a row's draw is computed from that row alone
(`test_cumulative_sums_do_not_depend_on_the_batch` covers the one place that once used a
matmul), and the same situation replayed is bit-exact (`test_the_same_run_again_is_bit_exact`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import pytest

from pgpt_jax import draws
from pgpt_jax.engine import Engine
from pgpt_jax.executor import Decode, Place, Prefill
from pgpt_jax.generate import engine_for, generate
from pgpt_jax.request import Delta, Limits, Request, Result
from pgpt_jax.tokenizer import get_tokenizer
from server.app import create_app
from test_server_helpers import ServerThread

SLOTS = 32
EOS = 50256
# Logprobs within float rounding: measured differences are one or two ulps of values near
# -11 (about 1e-6) where a row's rounding changed; 1e-5 leaves a margin and is still far
# below any change of a logit a neighbour could cause.
ATOL = 1e-5
MODEL = "tiny-repro"

TARGETS = {
    "sampled_n2": Request(prompt=[464, 2068, 7586, 21831], max_tokens=10, temperature=1.0, top_p=0.9, n=2,
                          seed=1001, logprobs=3),
    "best_of": Request(prompt=[15496, 11, 616, 1438, 318, 1757], max_tokens=8, temperature=1.0, top_p=0.9, n=2,
                       best_of=3, seed=-77, logprobs=2),
    "greedy": Request(prompt=[40, 1101, 257, 1332, 13, 632, 318], max_tokens=10, temperature=0.0, logprobs=5),
    # A bias that makes token 262 likely, and penalties that push it back down once it is
    # generated: the tokens depend on this row's own counts.
    "penalties": Request(prompt=[1212, 318, 257], max_tokens=10, temperature=0.8, presence_penalty=1.5,
                         frequency_penalty=2.0, logit_bias={262: 9.0}, seed=2**40 + 3, logprobs=1),
    "logit_bias": Request(prompt=[3666, 1545, 286, 1204, 11, 290, 262, 995, 13, 383, 10], max_tokens=10,
                          temperature=1.0, logit_bias={11: 8.0, 13: 8.0, EOS: -100.0}, seed=5, logprobs=0),
}
ORDER = list(TARGETS)


def neighbour(i: int, max_tokens: int | None = None) -> Request:
    """The i-th neighbour: every sampling parameter differs from the targets' and from the
    other neighbours'. Prompts stay in the targets' bucket (<= 16 tokens)."""
    kinds = [
        dict(temperature=0.0, logprobs=20),
        dict(temperature=1.5, top_p=0.5, logprobs=0),
        dict(temperature=0.7, presence_penalty=-2.0, frequency_penalty=2.0),
        dict(temperature=1.0, logit_bias={262: 100.0, 11: -100.0}),  # emits 262 every step
        dict(temperature=1.0, top_p=0.95, stop=[" ", "e", "a"], logprobs=5),  # likely ends on a stop
        dict(temperature=1.2, n=2, logit_bias={13: 5.0}, presence_penalty=2.0),
        dict(temperature=0.3, top_p=0.2, frequency_penalty=-1.0, logprobs=1),
    ]
    kw = kinds[i % len(kinds)]
    prompt = [(100 + 37 * i + 5 * j) % 50000 for j in range(1 + i % 16)]
    return Request(prompt=prompt, max_tokens=max_tokens or 1 + (3 * i) % 14, seed=10_000 + i, **kw)


def fillers(count: int, start: int = 0, max_tokens: int | None = None) -> list[Request]:
    """Neighbours taking exactly `count` slots."""
    out, taken, i = [], 0, start
    while taken < count:
        r = neighbour(i, max_tokens)
        if taken + r.candidates > count:
            r = dataclasses.replace(r, n=1)
        out.append(r)
        taken += r.candidates
        i += 1
    return out


def target(name: str, **changes) -> Request:
    return dataclasses.replace(TARGETS[name], **changes)


# --------------------------------------------------------------------------- running requests


class Outcome:
    """A request's callback: collects its Deltas and its Result (None while running or when aborted)."""

    def __init__(self):
        self.result, self.deltas = None, []

    def __call__(self, event):
        if isinstance(event, Delta):
            self.deltas.append(event)
        else:
            self.result = event


def submit(engine: Engine, requests: list[Request]) -> list[Outcome]:
    outs = [Outcome() for _ in requests]
    handles = engine.submit_all(requests, outs)
    for out, handle in zip(outs, handles):
        out.handle = handle
    return outs


def run(engine: Engine, requests: list[Request]) -> list[Outcome]:
    """Submits `requests` together and runs the loop in this thread until idle."""
    outs = submit(engine, requests)
    engine.run_until_idle()
    return outs


class Trace:
    """What the executor ran while installed: the slots each target was placed in, the rows of
    the prefill calls that held its prompt, and the rows of every decode. The grid checks
    with it that each situation is the one it claims to be."""

    def __init__(self, engine: Engine, monkeypatch):
        self.slots, self.prefill_rows, self.decode_rows = defaultdict(set), defaultdict(set), set()
        prompts = {tuple(r.prompt): name for name, r in TARGETS.items()}
        held = {}  # prefill id -> the target name of each of its rows
        run_op = engine.executor.run

        def spy(op):
            if isinstance(op, Prefill):
                held[op.pid] = [prompts.get(tuple(t[:n])) for t, n in zip(op.tokens.tolist(), op.lengths)]
                for name in filter(None, held[op.pid]):
                    self.prefill_rows[name].add(len(op.lengths))
            elif isinstance(op, Place) and held[op.pid][op.index] is not None:
                self.slots[held[op.pid][op.index]].add(op.slot)
            elif isinstance(op, Decode):
                self.decode_rows.add(op.rows)
            return run_op(op)

        monkeypatch.setattr(engine.executor, "run", spy)


# --------------------------------------------------------------------------- comparing


def view_of_choice(choice) -> dict:
    lp = choice.logprobs
    return dict(token_ids=list(choice.token_ids), text=choice.text, finish_reason=choice.finish_reason,
                tokens=lp.tokens, token_logprobs=lp.token_logprobs, top_logprobs=lp.top_logprobs,
                text_offset=lp.text_offset)


def views_of_result(result) -> list[dict]:
    assert isinstance(result, Result), result
    return [view_of_choice(c) for c in result.choices]


def views_of_deltas(deltas: list[Delta]) -> list[dict]:
    """A streamed request's choices, put together from its Deltas."""
    views: dict[int, dict] = {}
    for d in deltas:
        v = views.setdefault(d.index, dict(token_ids=[], text="", finish_reason=None, tokens=[],
                                           token_logprobs=[], top_logprobs=[], text_offset=[]))
        v["token_ids"] += d.token_ids
        v["text"] += d.text
        if d.logprobs is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                v[key] += getattr(d.logprobs, key)
        if d.finish_reason is not None:
            assert v["finish_reason"] is None
            v["finish_reason"] = d.finish_reason
    return [views[i] for i in sorted(views)]


def views_of_json(choices: list[dict]) -> list[dict]:
    """Choices of an HTTP answer (`return_token_ids`), streamed chunks' choices concatenated."""
    views: dict[int, dict] = {}
    for c in choices:
        v = views.setdefault(c["index"], dict(token_ids=[], text="", finish_reason=None, tokens=[],
                                              token_logprobs=[], top_logprobs=[], text_offset=[]))
        v["token_ids"] += c["token_ids"]
        v["text"] += c["text"]
        if c["logprobs"] is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                v[key] += c["logprobs"][key]
        if c["finish_reason"] is not None:
            v["finish_reason"] = c["finish_reason"]
    return [views[i] for i in sorted(views)]


def assert_reproduced(got: list[dict], ref: list[dict], where: str) -> None:
    """Exact tokens, text, finish reasons, top-logprob tokens and offsets; logprobs to ATOL."""
    assert len(got) == len(ref), where
    for i, (g, r) in enumerate(zip(got, ref)):
        at = f"{where}, choice {i}"
        for key in ("token_ids", "text", "finish_reason", "tokens", "text_offset"):
            assert g[key] == r[key], f"{at}: {key} differs"
        assert [list(d) for d in g["top_logprobs"]] == [list(d) for d in r["top_logprobs"]], at
        np.testing.assert_allclose(g["token_logprobs"], r["token_logprobs"], rtol=0, atol=ATOL, err_msg=at)
        np.testing.assert_allclose([list(d.values()) for d in g["top_logprobs"]],
                                   [list(d.values()) for d in r["top_logprobs"]], rtol=0, atol=ATOL, err_msg=at)


def bitwise(got: list[dict], ref: list[dict]) -> bool:
    return got == ref  # python floats compare exactly


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine(tiny_model):
    """generate(model, slots=32)'s engine, but for prefills of at most 4 prompts (one program
    fewer to compile): generate() then runs the very same programs."""
    return Engine(tiny_model, get_tokenizer(), slots=SLOTS, decode_steps=4, max_prefill_tokens=64,
                  limits=Limits(max_logprobs=20, max_queue=1 << 30))


@pytest.fixture(scope="module")
def reference(engine):
    """Each target alone on the engine: the run every situation must reproduce."""
    ref = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ORDER:
            seen = Trace(engine, mp)
            (out,) = run(engine, [target(name)])
            ref[name] = views_of_result(out.result)
            # Alone: a prefill of its own, the first slots, the fewest decode rows.
            assert seen.prefill_rows[name] == {1} and seen.slots[name] == set(range(TARGETS[name].candidates))
            assert seen.decode_rows == {1 if TARGETS[name].candidates == 1 else 4}
    # The grid must exercise what it claims: two sampled choices that differ, a best_of that
    # returns 2 of 3, sequences long enough to cross several decode calls, every logprobs width.
    assert ref["sampled_n2"][0]["token_ids"] != ref["sampled_n2"][1]["token_ids"]
    assert len(ref["best_of"]) == 2
    assert all(len(v["token_ids"]) >= 6 for vs in ref.values() for v in vs)
    assert {len(v["top_logprobs"][0]) for vs in ref.values() for v in vs} >= {1, 2, 3, 5}
    # The bias draws 262 and the penalties keep it from coming back (without them it comes
    # back again and again): this row's tokens depend on its own counts.
    assert ref["penalties"][0]["token_ids"].count(262) == 1
    return ref


@pytest.fixture
def trace(engine, reference, monkeypatch):
    return Trace(engine, monkeypatch)


# --------------------------------------------------------------------------- the grid (engine)


def test_the_same_run_again_is_bit_exact(engine, reference):
    # Same request, same situation: every float identical (the programs are deterministic).
    for name in ("sampled_n2", "best_of"):
        (out,) = run(engine, [target(name)])
        assert bitwise(views_of_result(out.result), reference[name]), name


@pytest.mark.parametrize("ahead", [3, 14, 24])
def test_targets_behind_neighbours(engine, reference, trace, ahead):
    # `ahead` slots of neighbours first, then the 8 slots of the targets: rows of 16 (3), 32
    # with the targets in slots 14..21, and 32 with them in the last slots 24..31 (the rows
    # whose rounding differs on XLA:CPU). All prompts arrive together: prefills of 4 rows.
    order = ORDER if ahead != 24 else ORDER[::-1]  # another target in the last two rows
    outs = run(engine, fillers(ahead) + [target(n) for n in order])
    got = dict(zip(order, outs[-len(order):]))
    assert min(min(trace.slots[n]) for n in ORDER) == ahead and max(trace.decode_rows) == (16 if ahead == 3 else 32)
    assert {r for n in ORDER for r in trace.prefill_rows[n]} == {4}
    if ahead == 24:
        assert trace.slots[order[-1]] == {SLOTS - 2, SLOTS - 1}
    for name in ORDER:
        assert_reproduced(views_of_result(got[name].result), reference[name], f"{ahead} slots ahead, {name}")
    assert all(isinstance(o.result, Result) for o in outs)


def test_single_choice_targets_in_a_four_row_decode(engine, reference, trace):
    # Two neighbours, then a target: slot 2 of a 4-row decode (the n=1 targets' reference ran
    # in a 1-row decode).
    for i, name in enumerate(n for n in ORDER if TARGETS[n].candidates == 1):
        outs = run(engine, fillers(2, start=20 + 2 * i, max_tokens=12) + [target(name)])
        assert_reproduced(views_of_result(outs[-1].result), reference[name], f"4-row decode, {name}")
        assert trace.slots[name] == {2}
    # 4 rows while the target runs (a 1-row call may follow when only a neighbour is left).
    assert max(trace.decode_rows) == 4


def test_targets_ahead_of_neighbours_that_finish_first(engine, reference, trace):
    # Targets in slots 0..7, then 8 neighbours that run as long as they do and 16 that end
    # within 2 tokens (or sooner, on a stop string): the decode's rows go from 32 down to 16
    # while the targets run.
    neighbours = fillers(8, start=7, max_tokens=14) + fillers(16, start=15, max_tokens=2)
    outs = run(engine, [target(n) for n in ORDER] + neighbours)
    assert max(max(trace.slots[n]) for n in ORDER) == 7 and {32, 16} <= trace.decode_rows
    for name, out in zip(ORDER, outs):
        assert_reproduced(views_of_result(out.result), reference[name], f"ahead of neighbours, {name}")
    stopped = [o.result for o, r in zip(outs[len(ORDER):], neighbours) if r.stop]
    assert any(c.finish_reason == "stop" for res in stopped for c in res.choices)  # a stop string did end one


def test_targets_one_by_one_into_a_running_batch(engine, reference, trace):
    # Neighbours start; each target arrives on its own while they decode, is prefilled alone
    # and takes whichever slot is free (some neighbours have finished by then).
    neighbours = submit(engine, fillers(20, start=3))
    outs = {}
    for name in ORDER:
        engine.step()
        engine.step()
        (outs[name],) = submit(engine, [target(name)])
    engine.run_until_idle()
    assert all(trace.prefill_rows[n] == {1} for n in ORDER)
    assert any(min(trace.slots[n]) > 0 for n in ORDER) and 32 in trace.decode_rows
    for name in ORDER:
        assert_reproduced(views_of_result(outs[name].result), reference[name], f"one by one, {name}")
    assert all(isinstance(o.result, Result) for o in neighbours)


def test_each_target_alone_vs_all_together(engine, reference, trace):
    # The five prompts share two prefill calls (4 rows and 1) and one decode of their 8
    # choices (the 8-row bucket); nothing else runs.
    outs = run(engine, [target(n) for n in ORDER])
    assert [trace.prefill_rows[n] for n in ORDER] == [{4}] * 4 + [{1}] and trace.decode_rows == {8}
    for name, out in zip(ORDER, outs):
        assert_reproduced(views_of_result(out.result), reference[name], f"together, {name}")


@pytest.fixture(scope="module")
def speculating(tiny_model):
    """The engine's shape with n-gram speculative decoding on (ngram:3)."""
    return Engine(tiny_model, get_tokenizer(), slots=SLOTS, decode_steps=4, max_prefill_tokens=64,
                  limits=Limits(max_logprobs=20, max_queue=1 << 30), speculative="ngram:3")


def test_speculation_alone_and_in_a_batch(speculating, reference):
    # Speculative decoding on: each target alone, then all of them among neighbours that
    # speculate (neighbour 3 emits token 262 every step, so its proposals are accepted):
    # the reference's tokens, made without speculation. A row's draws depend only on its key
    # and position, and a verified row takes plain decoding's own draw.
    for name in ORDER:
        (out,) = run(speculating, [target(name)])
        assert_reproduced(views_of_result(out.result), reference[name], f"speculating alone, {name}")
    accepted = speculating.spec_accepted_tokens
    ahead = fillers(10)
    outs = run(speculating, ahead + [target(n) for n in ORDER] + [neighbour(3, max_tokens=30)])
    for name, out in zip(ORDER, outs[len(ahead):]):
        assert_reproduced(views_of_result(out.result), reference[name], f"speculating in a batch, {name}")
    assert speculating.spec_accepted_tokens > accepted


def test_a_neighbour_aborted_midway(engine, reference):
    long_one = neighbour(3, max_tokens=100)  # emits token 262 until aborted
    (gone,) = submit(engine, [long_one])
    engine.step()
    outs = submit(engine, [target(n) for n in ORDER])
    engine.step()
    engine.step()
    gone.handle.abort()
    engine.run_until_idle()
    assert gone.handle.done and gone.result is None  # aborted: nothing is sent
    assert sum(len(d.token_ids) for d in gone.deltas) == 0
    for name, out in zip(ORDER, outs):
        assert_reproduced(views_of_result(out.result), reference[name], f"neighbour aborted, {name}")


def test_a_chunked_prompt_gives_what_a_whole_one_gives(tiny_model, engine, monkeypatch):
    # The same engine with chunked prefill (prompts over 16 tokens in chunks of 16): seeded
    # and greedy requests with prompts of 4 and 3 chunks give the tokens (and, to ATOL, the
    # logprobs) that their whole prefill gave, alone and among neighbours that decode while
    # the chunks run.
    chunked = Engine(tiny_model, get_tokenizer(), slots=SLOTS, decode_steps=4, max_prefill_tokens=64,
                     limits=Limits(max_logprobs=20, max_queue=1 << 30), prefill_chunk=16)
    long = {"sampled_long": Request(prompt=[(17 * j + 3) % 50000 for j in range(60)], max_tokens=10,
                                    temperature=1.0, top_p=0.9, n=2, seed=4242, logprobs=3),
            "greedy_long": Request(prompt=[(29 * j + 11) % 50000 for j in range(40)], max_tokens=10,
                                   temperature=0.0, logprobs=2)}
    ref = {name: views_of_result(run(engine, [r])[0].result) for name, r in long.items()}
    extends, run_op = [], chunked.executor.run
    monkeypatch.setattr(chunked.executor, "run", lambda op: (extends.append(op) if type(op).__name__ == "Extend"
                                                             else None, run_op(op))[1])
    for name, r in long.items():
        assert_reproduced(views_of_result(run(chunked, [r])[0].result), ref[name], f"chunked alone, {name}")
    assert len(extends) == 4 + 3
    neighbours = submit(chunked, fillers(6, start=5, max_tokens=12))
    chunked.step()
    outs = submit(chunked, list(long.values()))
    chunked.run_until_idle()
    for name, out in zip(long, outs):
        assert_reproduced(views_of_result(out.result), ref[name], f"chunked among neighbours, {name}")
    assert all(isinstance(o.result, Result) for o in neighbours)


def test_streamed_targets_among_neighbours(engine, reference):
    # best_of > n cannot stream (the ranking needs every candidate); it runs beside them unstreamed.
    streamed = [n for n in ORDER if n != "best_of"]
    requests = fillers(6, start=11) + [target(n, stream=True) for n in streamed] + [target("best_of")]
    outs = run(engine, requests)
    got = dict(zip(streamed + ["best_of"], outs[-len(ORDER):]))
    for name in streamed:
        assert_reproduced(views_of_deltas(got[name].deltas), reference[name], f"streamed, {name}")
        assert_reproduced(views_of_result(got[name].result), reference[name], f"streamed result, {name}")
    assert_reproduced(views_of_result(got["best_of"].result), reference["best_of"], "beside streams, best_of")


def test_generate_gives_what_the_engine_gives(tiny_model, engine, reference):
    for name in ORDER:
        r = TARGETS[name]
        choices = generate(tiny_model, r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                           n=r.n, best_of=r.best_of, logprobs=r.logprobs, presence_penalty=r.presence_penalty,
                           frequency_penalty=r.frequency_penalty, logit_bias=r.logit_bias, seed=r.seed,
                           slots=SLOTS)
        assert_reproduced([view_of_choice(c) for c in choices], reference[name], f"generate(), {name}")
    # Several prompts in one call run side by side: the seeded one still gives its reference.
    r = TARGETS["sampled_n2"]
    many = generate(tiny_model, [[7, 8, 9], r.prompt, [300] * 12], max_tokens=r.max_tokens, temperature=1.0,
                    top_p=0.9, n=2, logprobs=3, seed=r.seed, slots=SLOTS)
    assert_reproduced([view_of_choice(c) for c in many[1]], reference["sampled_n2"], "generate() of 3 prompts")


def test_generate_feeds_a_job_larger_than_the_queue_budget(tiny_model):
    """An offline job whose prompts together exceed the engine's queued-token budget (8 x slots x
    context) is fed as the engine takes it, not refused with QueueFull; each prompt's output is
    what it gets alone (greedy)."""
    engine = engine_for(tiny_model, 1)
    prompts = [[11 + i] * 60 for i in range(24)]  # 24 x 61 tokens > 8 x 1 x 128
    assert len(prompts) * 61 > engine.registry.max_queued_tokens
    many = generate(tiny_model, prompts, max_tokens=1, temperature=0.0, slots=1)
    alone = [generate(tiny_model, p, max_tokens=1, temperature=0.0, slots=1)[0] for p in prompts[:3]]
    assert len(many) == 24 and all(len(c) == 1 for c in many)
    assert [c[0].token_ids for c in many[:3]] == [c.token_ids for c in alone]


# --------------------------------------------------------------------------- sampling is row-local


def test_cumulative_sums_do_not_depend_on_the_batch():
    # The inverse-CDF draws cut cumulative sums of 64, 128 and V/128 = 393 weights: one row
    # must sum to the same bits alone, in a batch of 4 or 32, at its first or last row. (As a
    # triangular matmul it did not: 393 weights differed in any batch, 64 in rows 30-31 of 32.)
    rng = np.random.default_rng(1)
    cumsum = jax.jit(draws.cumsum)
    for n in (64, 393):
        w = rng.random(n).astype(np.float32)
        alone = np.asarray(cumsum(w[None]))[0]
        assert np.all(np.diff(alone) >= 0)  # non-negative weights: a non-decreasing sum
        np.testing.assert_allclose(alone, np.cumsum(w, dtype=np.float64), rtol=1e-5)
        for B in (4, 32):
            batch = rng.random((B, n)).astype(np.float32)
            batch[0] = batch[B - 1] = w
            out = np.asarray(cumsum(batch))
            for r in (0, B - 1):
                np.testing.assert_array_equal(out[r], alone, err_msg=f"n={n}, row {r} of {B}")


# --------------------------------------------------------------------------- the HTTP server


def body_of(r: Request, stream: bool) -> dict:
    body = dict(model=MODEL, prompt=r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                n=r.n, logprobs=r.logprobs, presence_penalty=r.presence_penalty,
                frequency_penalty=r.frequency_penalty, seed=r.seed, return_token_ids=True, stream=stream)
    if r.best_of is not None:
        body["best_of"] = r.best_of
    if r.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in r.logit_bias.items()}
    if r.stop:
        body["stop"] = list(r.stop)
    return body


def post(http: httpx.Client, body: dict) -> list[dict]:
    """The answer's choices; a stream's chunks' choices in order ([DONE] checked)."""
    if not body["stream"]:
        resp = http.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"]
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    return [c for e in events[:-1] for c in json.loads(e[len("data: "):])["choices"]]


def test_the_server_streamed_and_not_gives_what_the_engine_gives(engine, reference):
    # The targets and neighbours as concurrent HTTP requests on the same engine (its own
    # thread now): slots, rows and prefill groups fall as the requests happen to arrive.
    jobs = [(name, body_of(TARGETS[name], stream)) for name in ORDER for stream in (False, True)
            if not (stream and name == "best_of")]
    jobs += [(None, body_of(r, False)) for r in fillers(10, start=2)]
    with ServerThread(create_app(engine, served_model_name=MODEL)) as server:
        with httpx.Client(base_url=server.base_url, timeout=120) as http, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: post(http, job[1]), jobs))
    engine.stop(reopen=True)  # the server stopped the engine's thread; this test module goes on
    for (name, body), choices in zip(jobs, answers):
        if name is not None:
            where = f"HTTP {'streamed' if body['stream'] else 'JSON'}, {name}"
            assert_reproduced(views_of_json(choices), reference[name], where)
