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


MESHES = ["8x1", "4x2", "1x4"]  # rows alone, both axes, heads alone (one head a device at model=4)


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(report, mesh):
    assert report["devices"] == 8
    single, got = report["single"], report[mesh]
    assert got["tokens"][:3] == single["tokens"][:3]  # greedy
    assert got["tokens"][3:] == single["tokens"][3:]  # seeded sampling with top_p and penalties
    np.testing.assert_allclose(np.array(got["logprobs"]), np.array(single["logprobs"]), atol=1e-4)


@pytest.mark.parametrize("mesh", ["single", "4x2", "1x4"])
def test_speculative_decoding_on_a_mesh_gives_plain_decodings_tokens(report, mesh):
    """programs.verify on meshes that split the rows and the vocabulary: the tokens of plain
    decoding on one device, with proposals accepted on the way."""
    spec = report["speculative"]
    assert spec[mesh]["tokens"] == spec["plain"]["tokens"]
    assert spec[mesh]["accepted"] > 0 and spec["plain"]["accepted"] == 0


@pytest.mark.parametrize("mesh", MESHES)
def test_decode_moves_no_permutes_and_no_rows_of_logits(report, mesh):
    """The compiled decode program (8 rows): on a model axis each layer all-reduces its two
    output projections and nothing else (no collective-permute: q, k and v of a head share a
    shard), on data a layer moves nothing (each shard writes its own cache rows) but one
    scalar for the whole step (the blocked attention's block count, the furthest row's
    position over every shard); and sampling never gathers V-wide logits, not even a row's
    (the last resort's bisection adds one scalar per row a halving)."""
    cfg = GPTConfig.preset("tiny")
    data, model = (int(n) for n in mesh.split("x"))
    ops = report[mesh]["collectives"]
    assert not [c for c in ops if c["op"] == "collective-permute"]
    per_layer = ["all-reduce"] * 2 * cfg.n_layer if model > 1 else []
    block = [c for c in ops if "Block.__call__" in c["where"]]
    scalar = [c for c in block if c["op"] == "all-reduce" and all(np.prod(s) == 1 for s in c["shapes"])]
    assert len(scalar) == (1 if data > 1 else 0)
    assert [c["op"] for c in block if c not in scalar] == per_layer
    assert not [c for c in ops if any(s and s[-1] == cfg.padded_vocab for s in c["shapes"])]
    if model > 1:
        assert any(c["op"] == "all-gather" and "Vocab.top_k" in c["where"] for c in ops)  # sampling is split


@pytest.mark.parametrize("mesh", ["1x8", "4x2", "8x1"])
def test_split_vocabulary_samples_like_one_device(report, mesh):
    """Every way to a token on a vocabulary split 8 ways (shards end mid-block), 2 ways with
    rows split 4 ways, or rows alone split 8 ways: the same tokens, top ids and counts;
    logprobs to rounding."""
    single, got = report["sampling"]["single"], report["sampling"][mesh]
    assert got["tokens"] == single["tokens"]
    assert got["top_ids"] == single["top_ids"]
    assert got["counts"] == single["counts"]
    np.testing.assert_allclose(got["logprobs"], single["logprobs"], atol=1e-5)
    np.testing.assert_allclose(got["top_logprobs"], single["top_logprobs"], atol=1e-5)
    assert 5 not in np.array(single["top_ids"])  # the banned token is never listed
    assert single["masked_ok"] and got["masked_ok"]  # constrained rows sample only what their mask allows
    assert len({tuple(t) for t in np.array(single["tokens"]).T.tolist()}) == 8  # rows differ


def _norm(spec, mesh):
    """JAX may drop mesh axes of size 1 from a spec: treat them as replicated on both sides."""
    data, model = (int(x) for x in mesh.split("x"))
    trivial = {a for a, n in (("data", data), ("model", model)) if n == 1}
    if isinstance(spec, dict):
        return {k: _norm(v, mesh) for k, v in spec.items()}
    return [None if a in trivial else a for a in spec]


@pytest.mark.parametrize("mesh", MESHES)
def test_shardings_follow_the_rules(report, mesh):
    got = {k: _norm(v, mesh) for k, v in report[mesh].items() if k.endswith("spec") or k.endswith("specs")}
    specs = got["param_specs"]
    expect = lambda spec: _norm(spec, mesh)  # noqa: E731
    assert specs["wte/embedding"] == expect(["model", None])
    assert specs["wpe/embedding"] == expect([None, None])
    # c_attn as the programs hold it, [D, 3, N, H] and [3, N, H]: split by head.
    assert specs["h/0/attn/c_attn/kernel"] == expect([None, None, "model", None])
    assert specs["h/0/attn/c_attn/bias"] == expect([None, "model", None])
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
