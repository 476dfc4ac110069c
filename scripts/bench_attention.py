"""Decode step time under each attention implementation, interleaved in one process.

    python scripts/bench_attention.py --preset gpt2 --rows 8,32 --positions 100,150,230,500

For each (rows, position) it compiles the engine's decode program (`programs.decode`, one
step, a 32-slot state) once per implementation in `--attention`, with the static window the
scheduler would pick for that position (the smallest of its windows that holds it),
puts every row at that position before each call, and times all implementations in
`--rounds` interleaved rounds, keeping each one's fastest call (a shared machine's noise
only ever adds time). Prints one JSON row per (rows, position): ms a step per
implementation and each one's ratio to the first.

    python scripts/bench_attention.py --preset gpt2 --rows 32 --positions 100,150 --free-at 250

With `--free-at P`, every other row is a free slot that ran on to P (the window is still
the occupied rows'), and the blocked path is timed twice: with the call's span the whole
window (how far free rows past it made a call read before spans) and with the span the
scheduler passes, the occupied rows' need (position + 2).

    python scripts/bench_attention.py --preset gpt2 --rows 8,32 --positions 60,100,150,500 --context-window

With `--context-window`, the blocked path is timed with the window the scheduler's buckets
would give and with the whole context as the window (the span, position + 2, in both):
whether a call of blocked rows needs a program per window bucket. Each program's compile
time is printed too.

    python scripts/bench_attention.py --preset gpt2 --rows 1,8,32 --positions 60,500 --dense

With `--dense`, attention is "auto" in both arms and the dense layers are timed as XLA's
dots on HF's [K, N] weights ("dense=xla") and as the native kernel on packed panels
("dense=packed", pgpt_jax/dense.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pgpt_jax import programs
from pgpt_jax.model import init_model, set_attention
from pgpt_jax.scheduler import buckets


def decode_call(model, rows: int, slots: int, window: int, position: int, span: int = 0, free_at: int = 0,
                packed=None):
    """(call(state) -> state, state): one decode step of the first `rows` of `slots` slots, every
    row at `position` (with `free_at`, every other row at that position instead); `span` as
    the engine passes it (0: the window); `packed` as `programs.program_params` takes it."""
    graphdef, params, head = programs.program_params(model, packed=packed)
    state = programs.init_state(model.config, slots)
    where = np.full((slots,), position, np.int32)
    if free_at:
        where[1::2] = free_at

    def call(st):
        st = dataclasses.replace(st, positions=jnp.asarray(where))
        return programs.decode(graphdef, params, head, st, np.int32(span or window), steps=1, window=window,
                               rows=rows, top_k=5)[0]

    return call, call(state)  # the first call compiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--positions", default="100,150,230,500")
    ap.add_argument("--attention", default="einsum,blocked", help="implementations, the first is the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--free-at", type=int, default=0, help="free slots ran on to this position: span=window vs need")
    ap.add_argument("--context-window", action="store_true", help="blocked: the bucket's window vs the context's")
    ap.add_argument("--dense", action="store_true", help="dense layers: XLA's dots vs the packed kernel")
    args = ap.parse_args()
    impls = args.attention.split(",")
    packed = {}
    if args.dense:
        impls = ["dense=xla", "dense=packed"]
        packed = {"dense=xla": False, "dense=packed": True}
        models = dict.fromkeys(impls, init_model(args.preset, dtype="float32"))
    elif args.context_window:
        impls = ["window=bucket", "window=context"]
        blocked = set_attention(init_model(args.preset, dtype="float32"), "blocked")
        models = dict.fromkeys(impls, blocked)
    elif args.free_at:
        impls = ["span=window", "span=need"]
        blocked = set_attention(init_model(args.preset, dtype="float32"), "blocked")
        models = dict.fromkeys(impls, blocked)
    else:
        models = {impl: set_attention(init_model(args.preset, dtype="float32"), impl) for impl in impls}
    windows = buckets(models[impls[0]].config.n_positions, 128)  # the scheduler's default windows
    for rows in (int(r) for r in args.rows.split(",")):
        for position in (int(p) for p in args.positions.split(",")):
            window = next(w for w in windows if w > position)  # the occupied rows' (free ones are not in it)
            spans = {"span=need": position + 2} if args.free_at else {}
            shape = dict.fromkeys(impls, window)
            if args.context_window:
                spans, shape["window=context"] = dict.fromkeys(impls, position + 2), windows[-1]
            calls, compile_s = {}, {}
            for impl in impls:
                t0 = time.perf_counter()
                calls[impl] = decode_call(models[impl], rows, args.slots, shape[impl], position, spans.get(impl, 0),
                                          args.free_at, packed.get(impl))
                compile_s[impl] = round(time.perf_counter() - t0, 1)
            best = dict.fromkeys(impls, float("inf"))
            for _ in range(args.rounds):
                for impl in impls:
                    call, state = calls[impl]
                    for _ in range(2):
                        t0 = time.perf_counter()
                        state = jax.block_until_ready(call(state))
                        best[impl] = min(best[impl], time.perf_counter() - t0)
                    calls[impl] = (call, state)
            ms = {impl: round(1000 * t, 2) for impl, t in best.items()}
            print(json.dumps({"rows": rows, "slots": args.slots, "position": position, "free_at": args.free_at,
                              "window": window, "ms": ms, "first_call_s": compile_s,
                              "vs_" + impls[0]: {i: round(ms[i] / ms[impls[0]], 3) for i in impls}}), flush=True)
            del calls


if __name__ == "__main__":
    main()
