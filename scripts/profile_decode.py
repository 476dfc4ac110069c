"""Where a decode step goes: the engine's jitted `decode` with parts of it taken away.

For each slot count it times one decode program (`--steps` steps, window `--window`, every
row at position `--position`, by default window - steps so that the last step reads the
whole window, reset before each call) and
three ablations of it, each compiled separately and timed in the same process:

  full        the engine's decode step as it runs in serving
  no-sampler  sampling replaced by argmax (penalties, nucleus, logprobs gone)
  no-attn     attention over the cache replaced by a no-op (projections kept)
  matmuls     only the model's matmuls: 12 x (c_attn, c_proj, c_fc, mlp c_proj) + LM head

The params are the engine's (`programs.program_params`: on one CPU device in float32 the
dense weights packed for the native kernel, dense.py); PGPT_CPU_KERNELS=attention profiles
XLA's dots instead.

and reports ms per step, tokens/s, and the matmuls' achieved bandwidth (weight bytes read
per step / time) and FLOP/s, so the gap to the machine's roofline can be read off. With
--trace it also splits the full step by XLA op kind (dot, fusions, scatter) from a
jax.profiler trace:

    python scripts/profile_decode.py --preset gpt2 --slots 1,8,32 --trace

Every variant is compiled first, then all are timed in --rounds interleaved rounds and each
keeps its fastest call (a shared machine's noise only ever adds time).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpt_jax import dense, model as model_lib, programs, sampling, xla_options
from pgpt_jax.model import init_model


def _best(call, state, repeats: int):
    """Fastest of `repeats` timed calls (noise on a shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = call(state)
        jax.block_until_ready(state)
        best = min(best, time.perf_counter() - t0)
    return best, state


def _no_attention(self, x, positions, kv, window):
    qkv = dense.matmul(x, self.c_attn.kernel[...]) + self.c_attn.bias[...].reshape(-1)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return model_lib._linear(self.c_proj, q + k + v), kv


def _argmax_sampler(logits, rows, positions, *, top_k, mesh=None):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    zeros = jnp.zeros(tok.shape, jnp.float32)
    return (tok, zeros, jnp.zeros((*tok.shape, top_k), jnp.int32),
            jnp.zeros((*tok.shape, top_k), jnp.float32), rows)


def decode_program(model, slots: int, steps: int, window: int, variant: str, position: int):
    """programs.decode compiled with `variant` patched in; returns (call(state) -> state, state).
    Each call starts every row at `position` (the blocked decode attention reads as far as
    the furthest row, so where the rows are is part of what is timed)."""
    graphdef, params, head = programs.program_params(model)  # as the engine holds them (packed on CPU)
    patches = {"no-attn": (model_lib.Attention, "__call__", _no_attention),
               "no-sampler": (sampling, "sample", _argmax_sampler)}
    saved = None
    if variant in patches:
        owner, name, new = patches[variant]
        saved = (owner, name, getattr(owner, name))
        setattr(owner, name, new)
    try:
        # A fresh jit of a fresh function per variant, traced while the patch is in place: jax
        # caches traces by function, so re-jitting `programs.decode.__wrapped__` itself would
        # reuse the first variant's trace and every variant would compile the same program.
        @functools.wraps(programs.decode.__wrapped__)  # its signature, for the static names
        def step(*args, **kwargs):
            return programs.decode.__wrapped__(*args, **kwargs)

        fn = jax.jit(step, compiler_options=xla_options.compiler_options(),
                     static_argnames=("graphdef", "steps", "window", "rows", "top_k", "mesh"),
                     donate_argnums=(3,))
        state = programs.init_state(model.config, slots)
        compiled = fn.lower(graphdef, params, head, state, np.int32(window), steps=steps, window=window,
                            rows=slots, top_k=5).compile()
    finally:
        if saved is not None:
            setattr(*saved)

    def call(st):
        st = dataclasses.replace(st, positions=jnp.full_like(st.positions, position))
        return compiled(params, head, st, np.int32(window))[0]

    return call, state


def matmul_program(model, slots: int, steps: int):
    """The model's matmuls alone; returns (call, None, weight bytes a step, FLOPs a step)."""
    cfg = model.config
    graphdef, params, head = programs.program_params(model)  # packed where the engine packs them
    engine_model = nnx.merge(graphdef.graphdef, params)
    blocks = [(b.attn.c_attn.kernel[...], b.attn.c_proj.kernel[...], b.mlp.c_fc.kernel[...],
               b.mlp.c_proj.kernel[...]) for b in engine_model.h]
    mm = dense.matmul

    @functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
    def chain(x):
        for _ in range(steps):
            for wa, wp, wf, wo in blocks:
                qkv = mm(x, wa)
                x = x + mm(jnp.tanh(qkv[:, : cfg.n_embd]), wp)
                x = x + mm(jnp.tanh(mm(x, wf)), wo)
            x = x + 1e-3 * jnp.tanh(mm(x, head))[:, : cfg.n_embd]
        return x

    x = jnp.ones((slots, cfg.n_embd), jnp.float32)
    weights = sum(w.size for blk in blocks for w in blk) + head.size
    return (lambda _: chain(x)), None, 4.0 * weights, 2.0 * weights * slots


def op_breakdown(call, state, steps: int, calls: int = 3) -> dict:
    """ms a step per XLA op kind (dot, fusion kinds, scatter, ...) from a jax.profiler trace.

    XLA:CPU reports each thunk it runs as an event on its worker threads; events are summed
    over threads, so two ops running at once both count.
    """
    import collections
    import glob
    import re
    import tempfile

    from jax._src.lib import _profile_data

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(calls):
            state = call(state)
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
        data = _profile_data.ProfileData.from_file(path)
        total: collections.Counter = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for ev in line.events:
                    if "Execute" in ev.name or ev.name.startswith(("while", "end:")):
                        continue
                    total[re.sub(r"[.\d]+$", "", ev.name)] += ev.duration_ns
    return {k: round(v / 1e6 / (calls * steps), 2) for k, v in total.most_common(8)}


VARIANTS = ("full", "no-sampler", "no-attn", "matmuls")


def profile(model, slots: int, steps: int, window: int, rounds: int, trace: bool, position: int) -> dict:
    """ms a step per variant: every variant compiled first, then timed in interleaved rounds."""
    programs = {v: decode_program(model, slots, steps, window, v, position) for v in VARIANTS[:3]}
    call, state, nbytes, flops = matmul_program(model, slots, steps)
    programs["matmuls"] = (call, state)
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(rounds):
        for v in VARIANTS:
            call, state = programs[v]
            seconds, state = _best(call, state, 2)
            programs[v] = (call, state)
            best[v] = min(best[v], seconds)
    row = {"slots": slots, "window": window, "position": position, **{v: round(1000 * best[v] / steps, 2) for v in VARIANTS}}
    if trace:
        call, state = programs["full"]
        row["ops_ms"] = op_breakdown(call, state, steps)
    mm = row["matmuls"]
    row.update(tok_s=round(1000 * slots / row["full"], 1), matmul_GB_s=round(nbytes / mm / 1e6, 1),
               matmul_GFLOP_s=round(flops / mm / 1e6, 1),
               attention=round(row["full"] - row["no-attn"], 2),
               sampler=round(row["full"] - row["no-sampler"], 2))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--slots", default="1,32")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--position", type=int, default=None,
                    help="where every row starts each call (default: window - steps, so the last step reads it all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--trace", action="store_true",
                    help="also break the full step down by XLA op kind (jax.profiler trace)")
    args = ap.parse_args()
    model = init_model(args.preset, dtype="float32")
    for slots in (int(s) for s in args.slots.split(",")):
        position = args.window - args.steps if args.position is None else args.position
        print(json.dumps(profile(model, slots, args.steps, args.window, args.rounds, args.trace, position)),
              flush=True)

if __name__ == "__main__":
    main()
