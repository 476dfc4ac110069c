"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices.

Prints one JSON object: for a single-device engine and for each mesh, the greedy and
seeded tokens, the logprobs, and the sharding specs of params, cache and sampling rows.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from pgpt_jax import sharding  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Request  # noqa: E402
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
    return out


meshes = [(8, 1), (4, 2), (2, 4), (1, 4)]
report = {"devices": len(jax.devices()), "single": run(None)}
for d, m in meshes:
    devices = jax.devices()[: d * m]
    report[f"{d}x{m}"] = run(sharding.make_mesh(data=d, model=m, devices=devices))
json.dump(report, sys.stdout)
