"""Multi-host lockstep on CPU with gloo: N processes form one mesh; process 0 decides everything
and the others replay its ops, so outputs equal one process's, and a dead follower fails
requests fast (an error, not a hang) and makes process 0 exit for the group to restart."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_server_helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def single_process_scenario():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tests/workers/multihost_engine.py"), "single"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_processes_in_lockstep_decide_nothing_and_match_one_process(single_process_scenario):
    """Four processes, one 4-device mesh (data=2, model=2): stop strings, an abort and a deadline
    mid-batch, sampling and logprobs all come out as in one process, since process 0 decides
    everything and the others only replay its ops. (Two processes: the server test below and
    tests/test_prefix_cache_mesh.py.)"""
    # The processes speculate (n-gram, Verify ops in the broadcast): the same outcomes as one
    # process that does not.
    processes = 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PGPT_TEST_SPECULATIVE": "ngram:2"}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/workers/multihost_engine.py"), port, str(i),
                               str(processes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    expect, got = single_process_scenario, outs[0]
    assert got["stop_string"] == expect["stop_string"] and got["stop"]["result"][0]["finish"] == "stop"
    assert all(c["finish"] == "stop" for c in got["regex"]["result"])  # the constraint ended them
    for name in ("base", "stop", "top_p", "logprobs", "regex", "loop"):
        assert [(c["tokens"], c["finish"]) for c in got[name]["result"]] == \
            [(c["tokens"], c["finish"]) for c in expect[name]["result"]], name
    np.testing.assert_allclose(got["logprobs"]["result"][0]["logprobs"], expect["logprobs"]["result"][0]["logprobs"],
                               atol=1e-4)
    assert got["abort"] == expect["abort"] == {"aborted": True}
    assert got["deadline"] == expect["deadline"] == {"error": "RequestTimeout", "where": "request"}
    assert got["speculated"][1] > 0 and expect["speculated"] == [0, 0]
    # Stopping process 0's engine ended every other process's loop too.
    assert outs[1:] == [{"follower": "stopped"}] * (processes - 1)


def test_multihost_server_answers_like_one_process_and_a_dead_follower_fails_fast(tiny_model):
    """Two `pgpt-jax serve` processes (2 CPU devices each) on one 4-device mesh: process 0
    serves HTTP and its answers equal one process's, stop strings and a client that leaves
    mid-stream included. Then a follower is killed mid-stream: the client gets an error event
    and [DONE] (not a hang) within the lockstep timeout, and process 0 exits non-zero so that
    the orchestrator restarts the group."""
    import signal
    import time

    import httpx

    from pgpt_jax.generate import generate

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    coord, port = free_port(), free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", "random:tiny", "--slots", "2",
         "--decode-steps", "1", "--port", str(port), "--coordinator", f"127.0.0.1:{coord}",
         "--num-processes", "2", "--process-id", str(i), "--mesh", "data=2,model=2", "--lockstep-timeout", "10"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, procs)
        http = httpx.Client(base_url=url, timeout=120)
        prompt, no_eos = [464, 2068, 7586], {"50256": -100}
        body = {"model": "random:tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logit_bias": no_eos}
        expect = generate(tiny_model, prompt, max_tokens=12, temperature=0.0, logit_bias={50256: -100})[0].text
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expect
        stop = expect[len(expect) // 2: len(expect) // 2 + 3]
        cut = http.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert cut["text"] == expect[:expect.index(stop)] and cut["finish_reason"] == "stop"
        long = {**body, "max_tokens": None, "n": 2, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as r:  # a client that leaves mid-stream
            assert next(r.iter_lines()).startswith("data: ")
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expect

        with http.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            procs[1].send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            rest = [line for line in lines if line]
        assert time.monotonic() - t0 < 30
        assert rest[-1] == "data: [DONE]" and "server_unavailable" in rest[-2], rest[-3:]
        assert procs[0].wait(timeout=30) != 0
    finally:
        for p in procs:
            p.kill()
