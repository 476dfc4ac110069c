"""Sharding: the same engine on meshes of 8 forced CPU devices gives the single-device results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pgpt_jax import sharding
from pgpt_jax.config import GPTConfig
from test_server_helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/workers/sharded_engine.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


MESHES = ["8x1", "4x2", "2x4", "1x4"]


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(report, mesh):
    assert report["devices"] == 8
    single, got = report["single"], report[mesh]
    assert got["tokens"][:3] == single["tokens"][:3]  # greedy
    assert got["tokens"][3:] == single["tokens"][3:]  # seeded sampling with top_p and penalties
    np.testing.assert_allclose(np.array(got["logprobs"]), np.array(single["logprobs"]), atol=1e-4)


def _norm(spec, mesh):
    """JAX may drop mesh axes of size 1 from a spec: treat them as replicated on both sides."""
    data, model = (int(x) for x in mesh.split("x"))
    trivial = {a for a, n in (("data", data), ("model", model)) if n == 1}
    if isinstance(spec, dict):
        return {k: _norm(v, mesh) for k, v in spec.items()}
    return [None if a in trivial else a for a in spec]


@pytest.mark.parametrize("mesh", MESHES)
def test_shardings_follow_the_rules(report, mesh):
    got = {k: _norm(v, mesh) if k != "tokens" and k != "logprobs" else v for k, v in report[mesh].items()}
    specs = got["param_specs"]
    expect = lambda spec: _norm(spec, mesh)  # noqa: E731
    assert specs["wte/embedding"] == expect(["model", None])
    assert specs["wpe/embedding"] == expect([None, None])
    assert specs["h/0/attn/c_attn/kernel"] == expect([None, "model"])
    assert specs["h/0/attn/c_attn/bias"] == expect(["model"])
    assert specs["h/1/attn/c_proj/kernel"] == expect(["model", None])
    assert specs["h/0/mlp/c_fc/kernel"] == expect([None, "model"])
    assert specs["h/0/mlp/c_proj/kernel"] == expect(["model", None])
    assert specs["ln_f/scale"] == expect([None])
    assert got["head_spec"] == expect([None, "model"])  # the transposed LM head [D, V]: vocab over model
    assert got["cache_spec"] == expect(["data", "model", None, None])
    assert got["row_specs"] == expect({"temperature": ["data"], "bias": ["data", "model"],
                                "counts": ["data", "model"], "key": ["data", None]})
    assert got["token_spec"] == expect(["data"])


def test_mesh_validation_errors():
    cfg = GPTConfig.preset("tiny")  # 4 heads
    devices = list(range(8))  # make_mesh only reshapes them
    with pytest.raises(ValueError, match="differs from the 8 devices"):
        sharding.make_mesh(data=3, model=2, devices=devices)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.make_mesh(model=3, devices=devices)

    class FakeMesh:
        shape = {"data": 1, "model": 8}

    with pytest.raises(ValueError, match="must divide the head count"):
        sharding.check_mesh(FakeMesh(), cfg, slots=8)
    assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="--mesh expects"):
        sharding.parse_mesh("rows=2")


def test_two_processes_form_one_mesh_and_match_single_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests/workers/multihost_engine.py")
    single = subprocess.run([sys.executable, worker, "single"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, worker, port, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    expect = json.loads(single.stdout.strip().splitlines()[-1])
    got = json.loads(outs[0].strip().splitlines()[-1])
    assert [[c["tokens"] for c in r] for r in got] == [[c["tokens"] for c in r] for r in expect]
    np.testing.assert_allclose(got[0][0]["logprobs"], expect[0][0]["logprobs"], atol=1e-4)
    # Stopping process 0's engine ended process 1's loop too.
    assert json.loads(outs[1].strip().splitlines()[-1]) == {"follower": "stopped"}


def test_multihost_server_answers_like_one_process_and_stops_together(tiny_model):
    """Two `pgpt-jax serve` processes (2 CPU devices each) on one 4-device mesh: process 0
    serves HTTP; its answer equals the single-process one; stopping it ends both."""
    import signal

    import httpx

    from pgpt_jax.generate import generate

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    coord, port = free_port(), free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", "random:tiny", "--slots", "4",
         "--decode-steps", "2", "--port", str(port), "--coordinator", f"127.0.0.1:{coord}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, procs)
        body = {"model": "random:tiny", "prompt": [464, 2068, 7586], "max_tokens": 8, "temperature": 0,
                "logit_bias": {"50256": -100}}
        got = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        expect = generate(tiny_model, [464, 2068, 7586], max_tokens=8, temperature=0.0, logit_bias={50256: -100})
        assert got["choices"][0]["text"] == expect[0].text
        procs[0].send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=120)
        # SIGINT drains process 0 (nothing in flight) and it exits 0; process 1 leaves on its own.
        assert procs[0].returncode == 0
        assert procs[1].returncode == 0
    finally:
        for p in procs:
            p.kill()
