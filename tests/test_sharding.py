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
