"""Where a decode step goes: the engine's jitted `decode` with parts of it taken away.

For each slot count it times one decode program (`--steps` steps, window `--window`) and
three ablations of it, each compiled separately and timed in the same process:

  full        the engine's decode step as it runs in serving
  no-sampler  sampling replaced by argmax (penalties, nucleus, logprobs gone)
  no-attn     attention over the cache replaced by a no-op (projections kept)
  matmuls     only the model's matmuls: 12 x (c_attn, c_proj, c_fc, mlp c_proj) + LM head

and reports ms per step, tokens/s, and the matmuls' achieved bandwidth (weight bytes read
per step / time) and FLOP/s, so the gap to the machine's roofline can be read off:

    python scripts/profile_decode.py --preset gpt2 --slots 1,32

Figures are medians of --repeats timed calls after one warm call; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpt_jax import engine, model as model_lib, sampling
from pgpt_jax.model import init_model, lm_head


def _time(call, state, repeats: int) -> tuple[float, object]:
    state = call(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = call(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def _no_attention(self, x, positions, kv, window):
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    return self.c_proj(q + k + v), kv


def _argmax_sampler(logits, rows, positions, top_k):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    zeros = jnp.zeros(tok.shape, jnp.float32)
    return (tok, zeros, jnp.zeros((*tok.shape, top_k), jnp.int32),
            jnp.zeros((*tok.shape, top_k), jnp.float32), rows)


def decode_ms(model, slots: int, steps: int, window: int, repeats: int, variant: str) -> float:
    """ms per step of engine.decode with `variant` patched in (jit traces see the patch)."""
    graphdef, params = nnx.split(model)
    head = lm_head(model)
    patches = {"no-attn": (model_lib.Attention, "__call__", _no_attention),
               "no-sampler": (sampling, "sample", _argmax_sampler)}
    saved = None
    if variant in patches:
        owner, name, new = patches[variant]
        saved = (owner, name, getattr(owner, name))
        setattr(owner, name, new)
    try:
        # A fresh jit per variant: the module-level `decode` caches traces by its arguments.
        fn = jax.jit(engine.decode.__wrapped__,
                     static_argnames=("graphdef", "steps", "window", "rows", "top_k", "mesh"),
                     donate_argnums=(3,))
        state = engine.init_state(model.config, slots)

        def call(st):
            return fn(graphdef, params, head, st, steps=steps, window=window, rows=slots, top_k=5)[0]

        seconds, _ = _time(call, state, repeats)
    finally:
        if saved is not None:
            setattr(*saved)
    return 1000 * seconds / steps


def matmul_ms(model, slots: int, steps: int, repeats: int) -> tuple[float, float, float]:
    """ms per step of the model's matmuls alone, and the weight bytes and FLOPs per step."""
    cfg = model.config
    _, params = nnx.split(model)
    blocks = [(b.attn.c_attn.kernel[...], b.attn.c_proj.kernel[...], b.mlp.c_fc.kernel[...],
               b.mlp.c_proj.kernel[...]) for b in model.h]
    head = lm_head(model)

    @jax.jit
    def chain(x):
        for _ in range(steps):
            for wa, wp, wf, wo in blocks:
                qkv = x @ wa
                x = x + jnp.tanh(qkv[:, : cfg.n_embd]) @ wp
                x = x + jnp.tanh(x @ wf) @ wo
            x = x + 1e-3 * jnp.tanh(x @ head)[:, : cfg.n_embd]
        return x

    x = jnp.ones((slots, cfg.n_embd), jnp.float32)
    seconds, _ = _time(lambda _: chain(x), None, repeats)
    weights = sum(w.size for blk in blocks for w in blk) + head.size
    return 1000 * seconds / steps, 4.0 * weights, 2.0 * weights * slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--slots", default="1,32")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = init_model(args.preset, dtype="float32")
    for slots in (int(s) for s in args.slots.split(",")):
        row = {"slots": slots}
        for variant in ("full", "no-sampler", "no-attn"):
            row[variant] = round(decode_ms(model, slots, args.steps, args.window, args.repeats, variant), 2)
        mm, nbytes, flops = matmul_ms(model, slots, args.steps, args.repeats)
        row.update(matmuls=round(mm, 2), tok_s=round(1000 * slots / row["full"], 1),
                   matmul_GB_s=round(nbytes / mm / 1e6, 1), matmul_GFLOP_s=round(flops / mm / 1e6, 1),
                   attention=round(row["full"] - row["no-attn"], 2),
                   sampler=round(row["full"] - row["no-sampler"], 2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
