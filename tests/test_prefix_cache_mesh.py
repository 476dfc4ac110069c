"""The prefix cache on a 4-device CPU mesh (data=2, model=2): in one process, and in two processes
over gloo where process 0 decides every hit and the other replays its ops. Tokens and logprobs
equal those without the cache, and the two-process run equals the one-process run. Chunked
prefill (with the cache) on the same mesh: the same tokens, and the followers replay its chunks.

Slow (minutes on 2 cores: every process compiles the tiny model's programs for the mesh),
so apart from tests/test_prefix_cache.py, which stays quick."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_server_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests/workers/prefix_cache_mesh.py")


@pytest.fixture(scope="module")
def one_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, WORKER, "single"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_engine_gives_the_same_with_and_without_the_cache(one_process):
    r = one_process
    assert r["off"] == r["on"] == r["on_again"]  # tokens and logprobs, exactly
    assert all(isinstance(x, list) for x in r["off"])  # results, not errors
    assert r["hit_blocks"] > 0 and r["compiles_after_warmup"] == 0


def test_sharded_engine_gives_the_same_with_chunked_prefill(one_process):
    r = one_process
    for want, got in zip(r["off"], r["chunked"]):  # tokens exactly, logprobs to rounding
        assert [t for t, _ in want] == [t for t, _ in got]
        for (_, a), (_, b) in zip(want, got):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert r["chunked_compiles_after_warmup"] == 0


def test_two_processes_replay_process_0s_hits(one_process):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, port, str(i), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    got = outs[0]
    assert got["off"] == got["on"] == got["on_again"] == one_process["on"]
    assert got["chunked"] == one_process["chunked"]  # the followers replayed every Extend
    assert got["hit_blocks"] == one_process["hit_blocks"]
    assert outs[1] == {"follower": "stopped"}
