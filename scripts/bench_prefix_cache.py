"""Prefix cache benchmark (issue 16): many requests that share a long prefix, cache on vs off.

    python scripts/bench_prefix_cache.py --preset gpt2 --slots 32

64 requests (`--requests`) share a 768-token prefix (`--prefix`) and each has its own
32-token tail (`--tail`); all arrive at once and ask for 16 new tokens (`--new`, EOS banned,
greedy) through `Engine.submit` with streaming, on an engine of 32 slots. Measured: TTFT
(submit to the first streamed token) at p50/p90 and the wall time until the last request
ends, once with `--prefix-cache-blocks 0` and once with the cache on (a fresh engine each;
the same prompts). Random weights of the preset's shape.

Warm-up compiles exactly the programs this workload runs (its prefill bucket, the decode
row buckets at its window, and with the cache the hit's gather/extend shape), ahead of time
and without running them; `compiles_during_run` says whether the timed run compiled anything
anyway. Also checks that both runs produced the same tokens.

Prints a JSON line per run and a summary line with the ratios. `--save-cost` instead times
what the cache adds to a prefill that hits nothing: saving its blocks into the pool.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.prefix_cache import BLOCK_TOKENS  # noqa: E402
from pgpt_jax.request import Delta, Limits, Request  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

EOS = 50256


def prompts(n: int, prefix: int, tail: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, EOS, prefix).tolist()
    return [shared + rng.integers(0, EOS, tail).tolist() for _ in range(n)]


def warm(engine: Engine, length: int, new: int) -> None:
    """Compiles the programs a prompt of `length` tokens and `new` tokens runs (every decode row bucket)."""
    sched = engine.scheduler
    bucket = sched.bucket(length)
    need = min(length + new + engine.decode_steps + 1, engine.context_length)
    extends = []
    if engine.prefix_cache is not None:
        start = (length - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        shape = sched.extend_shape(length, start)
        extends = [(rows, *shape) for rows in sched.prefill_rows[shape[0]]] if shape else []
    engine.executor.warmup([(rows, bucket) for rows in sched.prefill_rows[bucket]],
                           [(rows, sched.decode_window(rows, need)) for rows in sched.row_buckets], extends=extends)
    # One untimed request of the same length (a prompt that shares nothing with the timed
    # ones): what the first request compiles besides the programs (small eager ops).
    rng = np.random.default_rng(12345)
    engine.submit(Request(prompt=rng.integers(0, EOS, length).tolist(), max_tokens=2), lambda ev: None)
    engine.run_until_idle()


def run(engine: Engine, ps: list[list[int]], new: int) -> tuple[dict, list]:
    """Submits every prompt at once; returns timings and each request's tokens."""
    n = len(ps)
    first, last, tokens = [None] * n, [None] * n, [None] * n
    done = threading.Semaphore(0)

    def callback(i):
        def f(ev):
            now = time.perf_counter()
            if isinstance(ev, Delta):
                if first[i] is None:
                    first[i] = now
                return
            last[i] = now
            tokens[i] = ev.choices[0].token_ids if hasattr(ev, "choices") else repr(ev)
            done.release()
        return f

    compiles = engine.compile_count
    t0 = time.perf_counter()
    for i, p in enumerate(ps):
        engine.submit(Request(prompt=p, max_tokens=new, temperature=0.0, stream=True, logit_bias={EOS: -100.0}),
                      callback(i))
    for _ in range(n):
        done.acquire()
    wall = time.perf_counter() - t0
    ttft = sorted(f - t0 for f in first if f is not None)
    return {"requests": n, "completed": sum(isinstance(t, list) for t in tokens),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 3),
            "ttft_min_s": round(ttft[0], 3), "wall_s": round(wall, 3),
            "compiles_during_run": engine.compile_count - compiles}, tokens


def save_cost(preset: str, length: int, repeats: int = 5) -> dict:
    """Seconds of a whole prefill of `length` tokens (one row) and of saving its whole blocks
    into the pool (what every prefill adds with the cache on), the fastest of `repeats`."""
    from pgpt_jax import pool_programs, programs

    model = init_model(preset)
    graphdef, params, head = programs.program_params(model)
    bucket = next(b for b in (16 * 2**i for i in range(12)) if b >= length)
    pool = pool_programs.init_pool(model.config, 256, BLOCK_TOKENS)
    tokens = np.random.default_rng(0).integers(0, EOS, (1, bucket)).astype(np.int32)
    writes = np.arange(bucket // BLOCK_TOKENS, dtype=np.int32)[None] % 256
    best = {"prefill_s": float("inf"), "save_blocks_s": float("inf")}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        cache, last, *_ = programs.prefill(graphdef, params, head, tokens, np.array([length], np.int32),
                                           np.zeros((2,), np.int32), want_logprobs=False, top_k=1)
        jax.block_until_ready(last)
        t1 = time.perf_counter()
        pool = pool_programs.save_blocks(pool, cache, writes)
        jax.block_until_ready(pool)
        t2 = time.perf_counter()
        if i:  # the first call compiles
            best = {"prefill_s": min(best["prefill_s"], t1 - t0), "save_blocks_s": min(best["save_blocks_s"], t2 - t1)}
    return {"preset": preset, "length": length, "bucket": bucket, **{k: round(v, 4) for k, v in best.items()},
            "save_over_prefill": round(best["save_blocks_s"] / best["prefill_s"], 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=768)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--prefix-cache-blocks", type=int, default=256, help="the cache-on run's pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-cost", action="store_true",
                    help="only time one whole prefill of prefix+tail tokens against saving its blocks")
    args = ap.parse_args(argv)
    if args.save_cost:
        print(json.dumps(save_cost(args.preset, args.prefix + args.tail)), flush=True)
        return

    model = init_model(args.preset)
    ps = prompts(args.requests, args.prefix, args.tail, args.seed)
    rows, outs = {}, {}
    for blocks in (0, args.prefix_cache_blocks):
        engine = Engine(model, get_tokenizer(), slots=args.slots, decode_steps=args.decode_steps,
                        limits=Limits(max_queue=4096), prefix_cache_blocks=blocks)
        t0 = time.perf_counter()
        warm(engine, args.prefix + args.tail, args.new)
        warmup_s = time.perf_counter() - t0
        engine.start()
        row, outs[blocks] = run(engine, ps, args.new)
        row = {"preset": args.preset, "slots": args.slots, "prefix": args.prefix, "tail": args.tail,
               "new_tokens": args.new, "prefix_cache_blocks": blocks, "warmup_s": round(warmup_s, 1), **row}
        if engine.prefix_cache is not None:
            row["hit_rate"] = round(engine.prefix_cache_hit_rate, 4)
            row["blocks_used"] = engine.prefix_cache_blocks_used
        print(json.dumps(row), flush=True)
        rows[blocks] = row
        engine.stop()
        del engine
        gc.collect()
    off, on = rows[0], rows[args.prefix_cache_blocks]
    print(json.dumps({"summary": {
        "ttft_p50_off_over_on": round(off["ttft_p50_s"] / on["ttft_p50_s"], 2),
        "wall_off_over_on": round(off["wall_s"] / on["wall_s"], 2),
        "same_tokens": outs[0] == outs[args.prefix_cache_blocks]}}), flush=True)


if __name__ == "__main__":
    main()
