"""Average two checkpoints of one shape, weight by weight (a "model soup"), into a third.

    python training/average.py pgpt_jax/assets/pgpt-code training/work/cpu6/out \
        --weight 0.5 --out training/work/soup50

(1 - weight) x the first + weight x the second, in float32, saved in the first's parameter
dtype. It makes sense for runs that share an ancestor (a run continued from the other), so
that their weights lie near each other; docs/model_card.md ("Weight averages") has what it
did for pgpt-code.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from pgpt_jax.checkpoint import load_model, save_checkpoint  # noqa: E402


def average(first, second, weight: float):
    """-> a model like `first` whose params are (1 - weight) * first + weight * second."""
    if first.config.replace(param_dtype="float32", dtype="float32") != \
            second.config.replace(param_dtype="float32", dtype="float32"):
        raise ValueError(f"the checkpoints differ in shape: {first.config} against {second.config}")
    graphdef, a = nnx.split(first)
    b = nnx.state(second)
    mixed = jax.tree.map(
        lambda x, y: ((1 - weight) * x.astype(jnp.float32) + weight * y.astype(jnp.float32)).astype(x.dtype), a, b)
    return nnx.merge(graphdef, mixed)


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--weight", type=float, default=0.5, help="the second checkpoint's share")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = save_checkpoint(average(load_model(args.first), load_model(args.second), args.weight), args.out,
                          overwrite=True)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
