"""PGPT_TIMELINE (pgpt_jax/timeline.py): a streamed request through the real server and engine is
stamped at every step, in causal order, and its SSE writes add up to its tokens; off, nothing is
recorded and no request carries marks."""

import json
import time

import httpx
import pytest

from pgpt_jax import timeline
from pgpt_jax.engine import Engine
from pgpt_jax.request import Limits
from pgpt_jax.tokenizer import get_tokenizer
from server.app import create_app
from test_server_helpers import ServerThread

CONTEXT = 128  # the tiny preset's n_positions
# Each mark is at or after the one before it (the others: prefill_done after prefill_dispatch,
# first_sampled after place_dispatch; accepted and taken race).
CAUSAL = ["arrive", "body", "parsed", "queued", "taken", "placed", "prefill_dispatch", "prefill_return",
          "place_dispatch", "place_return", "first_read", "delivered", "on_loop", "first_write"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine(tiny_model, get_tokenizer(), slots=2, decode_steps=4, min_bucket=CONTEXT, limits=Limits())
    e.warmup()
    return e


def stream(engine, max_tokens: int, seed: int) -> None:
    with ServerThread(create_app(engine, served_model_name="m")) as s:
        body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": max_tokens, "stream": True,
                "logit_bias": {"50256": -100}, "seed": seed}
        with httpx.stream("POST", s.base_url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            assert [x for x in r.iter_lines() if x.startswith("data: ")][-1] == "data: [DONE]"


def test_a_streamed_request_is_stamped_in_order(engine, tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setattr(timeline, "PATH", str(path))
    monkeypatch.setattr(timeline, "ON", True)
    stream(engine, max_tokens=9, seed=77)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the decode watchers write from their own threads
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        if sum(x["kind"] == "decode" for x in lines) >= 2:
            break
        time.sleep(0.05)
    (req,) = [x for x in lines if x["kind"] == "request"]
    assert req["seed"] == 77
    marks = {**req["server"], **req["engine"]}
    assert set(CAUSAL) | {"accepted", "prefill_done", "first_sampled", "decode_dispatch"} <= set(marks)
    times = [marks[k] for k in CAUSAL]
    assert times == sorted(times), [k for k, a, b in zip(CAUSAL[1:], times, times[1:]) if b < a]
    assert marks["prefill_done"] >= marks["prefill_dispatch"] and marks["first_sampled"] >= marks["place_dispatch"]
    # The read waits for the program. Both stamps follow the program's end: the engine's read and
    # the watcher thread's wake-up, in whichever order the OS runs the two threads (a CI run saw
    # the watcher 1.2 ms late), so only a gap larger than a thread wake-up would be a bug.
    assert marks["first_read"] >= marks["first_sampled"] - 0.05
    assert sum(n for _, n in req["writes"]) == 9 and req["writes"][0][0] == marks["first_write"]
    decodes = [x for x in lines if x["kind"] == "decode"]
    assert all(d["dispatch"] <= d["return"] <= d["done"] and d["rows"] >= 1 for d in decodes)


def test_off_records_nothing(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(timeline, "PATH", None)
    monkeypatch.setattr(timeline, "ON", False)
    seen = []
    monkeypatch.setattr(timeline, "write", seen.append)
    stream(engine, max_tokens=3, seed=1)
    assert seen == [] and timeline.marks() is None
