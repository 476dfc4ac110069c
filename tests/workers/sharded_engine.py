"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices.

Prints one JSON object: for a single-device engine and for each mesh, the greedy and
seeded tokens, the logprobs, the sharding specs of params, cache and sampling rows, and
the collectives of the compiled decode program; and the sampling step alone on hand-made
logits, on one device and on three meshes.
"""

import json
import os
import sys

# Forced CPU devices, added to the suite's XLA_FLAGS (tests/conftest.py).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from pgpt_jax import programs, sampling, sharding  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Constraint, Request  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

PROMPTS = [[464, 2068, 7586], [15496, 11, 616, 1438, 318, 1757, 290], [40, 1101, 257, 1332, 13] * 3]  # one prompt bucket: fewer compiles


def spec_list(x):
    """An array's PartitionSpec as a list with one entry per dimension (None: replicated)."""
    spec = tuple(x.sharding.spec)
    return list(spec) + [None] * (x.ndim - len(spec))


def run(mesh):
    model = init_model("tiny", seed=0, mesh=mesh)
    eng = Engine(model, get_tokenizer(), slots=8, decode_steps=2, mesh=mesh)
    reqs = [Request(prompt=p, max_tokens=8, temperature=0.0, logprobs=2, logit_bias={50256: -100.0})
            for p in PROMPTS]
    reqs += [Request(prompt=p, max_tokens=8, temperature=1.0, top_p=0.9, seed=11, n=2,
                     presence_penalty=0.5, logit_bias={50256: -100.0}) for p in PROMPTS]
    # Constrained rows decode in two halves (programs.forward, programs.sample_next) on the mesh too.
    reqs += [Request(prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=3, n=2,
                     constraint=Constraint("regex", "[ab]{1,5}", "structured_outputs.regex"))]
    results = [None] * len(reqs)
    for i, r in enumerate(reqs):
        eng.submit(r, lambda ev, i=i: results.__setitem__(i, ev))
    eng.run_until_idle()
    out = {
        "tokens": [[c.token_ids for c in r.choices] for r in results],
        "logprobs": [r.choices[0].logprobs.token_logprobs for r in results[:3]],
    }
    if mesh is not None:
        # The engine's own arrays (what its programs read), not the model it was built from.
        specs = jax.tree_util.tree_map_with_path(
            lambda p, x: [sharding._path_str(p), spec_list(x)], eng.params)
        out["param_specs"] = dict(jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, list) and len(v) == 2
                                                  and isinstance(v[0], str)))
        out["head_spec"] = spec_list(eng.head)
        out["cache_spec"] = spec_list(eng.state.cache[0][0])
        out["row_specs"] = {name: spec_list(getattr(eng.state.rows, name))
                            for name in ("temperature", "bias", "counts", "key")}
        out["token_spec"] = spec_list(eng.state.tokens)
    if mesh is not None:
        # The decode program the engine ran (all 8 slots, the smallest window).
        hlo = programs.decode.lower(eng.graphdef, eng.params, eng.head, eng.state, np.int32(128), steps=eng.decode_steps,
                                    window=128, rows=8, top_k=eng.top_k, mesh=mesh).compile().as_text()
        out["collectives"] = [{k: c[k] for k in ("op", "shapes", "conditional", "where")}
                              for c in sharding.collectives(hlo)]
    return out


def speculate(mesh, speculative="ngram:3"):
    """Tokens of greedy rows that loop and seeded rows under top_p and penalties, with n-gram
    speculative decoding (programs.verify) on the mesh, and the proposed tokens it accepted."""
    model = init_model("tiny", seed=0, mesh=mesh)
    eng = Engine(model, get_tokenizer(), slots=8, decode_steps=2, mesh=mesh, speculative=speculative)
    loop = [464, 2068, 7586, 11] * 3
    reqs = [Request(prompt=loop, max_tokens=16, temperature=0.0, logit_bias={50256: -100.0}),
            Request(prompt=PROMPTS[2], max_tokens=16, temperature=0.0, logprobs=2, logit_bias={50256: -100.0}),
            Request(prompt=loop, max_tokens=16, temperature=1.0, top_p=0.9, seed=11, n=2, presence_penalty=0.3,
                    logit_bias={464: 9.0, 2068: 9.0, 50256: -100.0})]
    results = [None] * len(reqs)
    for i, r in enumerate(reqs):
        eng.submit(r, lambda ev, i=i: results.__setitem__(i, ev))
    eng.run_until_idle()
    return {"tokens": [[c.token_ids for c in r.choices] for r in results], "accepted": eng.spec_accepted_tokens}


def sample_on(mesh, steps=6):
    """sampling.sample on hand-made logits [8, 1536] for `steps` positions: per row a different
    way to the token (greedy, no nucleus, the prefilter, rejection, the bisection: the
    prefilter is 1 wide and rejection has 2 tries), ties across a shard boundary, a banned
    token, penalties, logprobs. Returns what the test compares with one device's."""
    S, V = 8, 1536  # 12 blocks of 128; over 8 shards, 192 columns each: shards end mid-block
    rng = np.random.default_rng(0)
    scale = np.array([3, 1, 0.3, 1, 3, 0.5, 0.2, 1], np.float32)[:, None]
    logits = (rng.normal(size=(S, V)) * scale).astype(np.float32)
    logits[:, V - 40:] = -np.inf  # padded vocabulary
    logits[3, 188:197] = logits[3].max() + 1  # a tie across the 1x8 mesh's boundary at 192
    logits[4, 700] = logits[4].max() + 6  # one dominant token: the prefilter settles the row
    bias = np.zeros((S, V), np.float32)
    bias[:, 5] = -np.inf  # banned: never in top_logprobs
    bias[1, 7] = 3.0
    counts = np.zeros((S, V), np.int32)
    counts[:, [9, 10, V - 3]] = 2
    # Structured output on rows 1 and 6: a random tenth of the tokens allowed, and tokens on
    # both sides of the 1x8 mesh's shard boundary at 192 (mask words split with the columns).
    allowed = rng.random((S, V)) < 0.1
    allowed[:, 188:197] = True
    mask = np.packbits(allowed, axis=1, bitorder="little").view(np.uint32)  # [S, V/32]
    constrained = np.zeros((S,), bool)
    constrained[[1, 6]] = True
    rows = dataclasses.replace(
        sampling.init_rows(S, V), mask=jnp.asarray(mask), constrained=jnp.asarray(constrained))
    rows = dataclasses.replace(
        rows, 
        bias=jnp.asarray(bias), counts=jnp.asarray(counts),
        temperature=jnp.asarray([0.0, 1.0, 0.7, 1.3, 1.0, 1.0, 0.9, 2.0]),
        top_p=jnp.asarray([1.0, 1.0, 0.5, 0.95, 0.3, 0.9, 0.99, 0.8]),
        presence=jnp.full((S,), 0.3), frequency=jnp.full((S,), 0.2),
        num_logprobs=jnp.asarray([2, 5, 0, 3, 0, 1, 0, 5], jnp.int32),
        key=jnp.asarray(np.stack([sampling.row_key(100 + i, 0) for i in range(S)])))
    logits = jnp.asarray(logits)
    if mesh is not None:  # placed as the step returns them: its second call compiles nothing new
        logits = jax.device_put(logits, NamedSharding(mesh, sharding.spec(("slots", "vocab"))))
        rows = jax.device_put(rows, sharding.state_shardings(rows, mesh))
    step = jax.jit(sampling.sample, static_argnames=("top_k", "nucleus_k", "rejection_tries", "mesh"))
    out = {"tokens": [], "logprobs": [], "top_ids": [], "top_logprobs": []}
    for t in range(steps):
        tok, lp, top_ids, top_lps, rows = step(logits, rows, jnp.full((S,), t, jnp.int32), top_k=5,
                                                nucleus_k=1, rejection_tries=2, mesh=mesh)
        for k, v in zip(out, (tok, lp, top_ids, top_lps)):
            out[k].append(np.asarray(v).tolist())
    out["counts"] = np.argwhere(np.asarray(rows.counts) != counts).tolist()
    out["masked_ok"] = all(bool(allowed[s, t[s]]) for t in out["tokens"] for s in (1, 6))
    return out


meshes = [(8, 1), (4, 2), (1, 4)]
report = {"devices": len(jax.devices()), "single": run(None)}
for d, m in meshes:
    devices = jax.devices()[: d * m]
    report[f"{d}x{m}"] = run(sharding.make_mesh(data=d, model=m, devices=devices))
report["speculative"] = {"plain": speculate(None, None), "single": speculate(None)}
for d, m in [(4, 2), (1, 4)]:
    report["speculative"][f"{d}x{m}"] = speculate(sharding.make_mesh(data=d, model=m, devices=jax.devices()[: d * m]))
report["sampling"] = {"single": sample_on(None)}
for d, m in [(1, 8), (4, 2), (8, 1)]:
    report["sampling"][f"{d}x{m}"] = sample_on(sharding.make_mesh(data=d, model=m))
json.dump(report, sys.stdout)
