"""Chunked prefill benchmark (issue 16): a long prompt arrives while 31 streams decode.

    python scripts/bench_long_prompt.py --chunks 0,16,64,256

GPT-2 124M's shape (random weights, a 1024-token context), 32 slots, one decode step a call
(`serve`'s CPU default). 31 streams (16-token prompts, greedy, a logit bias that makes every
token " the" so that each streams the moment it is read) decode steadily; once each has
`--steady` tokens, one `--long`-token prompt arrives (max_tokens 1). One run per chunk size
(`--chunks`, 0: off), each on a fresh Engine over the same model, in one process:

  steady TPOT   the streams' inter-token gaps from their `--skip`-th token to the long
                prompt's arrival (p50, p99)
  during TPOT   their gaps that overlap the long prompt's prefill, [arrival, its first
                token] (p50, p99, max), split into
    placing gap   the one gap per stream that spans the long prompt's first token: the last
                  chunk (or the whole prefill), the Place, and the first decode with the long
                  row in it, whose attention window is then 1024 for every row (p50)
    between       the others: the decode calls the chunks ran beside (p50, p99)
  TTFT          the long prompt's: arrival to its first token

and `during_p99_over_steady_p50`, the figure the target (at most 1.5) is about. Each run is
preceded by one untimed round of the same workload (it compiles what the run needs);
`compiles_during_run` says whether the timed run compiled anything anyway. `chunk_s` and
`decode_s` are one chunk's `extend` and one 32-row decode call timed alone, after the run
(`decode_1024_s` the same decode at a 1024-token window).
Prints a JSON line per run and a summary line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pgpt_jax import pool_programs  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Delta, Limits, Request  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

EOS, THE = 50256, 262


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


class Stream:
    """One request's token arrival times (a Delta of k tokens: k arrivals at that moment)."""

    def __init__(self):
        self.times: list[float] = []
        self.ended = threading.Event()

    def __call__(self, ev):
        now = time.perf_counter()
        if isinstance(ev, Delta):
            self.times += [now] * len(ev.token_ids)
        else:
            self.ended.set()


def round_of(engine: Engine, args, rng) -> dict:
    """The workload once: the streams, then the long prompt once each has `--steady` tokens."""
    streams = [Stream() for _ in range(args.streams)]
    handles = [engine.submit(Request(prompt=rng.integers(0, EOS, 16).tolist(), max_tokens=args.stream_tokens,
                                     temperature=0.0, logit_bias={THE: 100.0}, stream=True), s) for s in streams]
    while min(len(s.times) for s in streams) < args.steady:
        time.sleep(0.002)
    compiles = engine.compile_count
    long = Stream()
    t_arrive = time.perf_counter()
    engine.submit(Request(prompt=rng.integers(0, EOS, args.long).tolist(), max_tokens=1, temperature=0.0,
                          stream=True), long)
    long.ended.wait()
    t_first = long.times[0] if long.times else time.perf_counter()
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and not all(s.times and s.times[-1] > t_first for s in streams):
        time.sleep(0.01)  # every stream's gap that spans the long prompt's first token has ended
    for h in handles:
        h.abort()
    while engine.requests_running or engine.requests_waiting:
        time.sleep(0.01)
    steady, during, placing = [], [], []
    for s in streams:
        ts = s.times
        for a, b in zip(ts[args.skip:], ts[args.skip + 1:]):
            if b <= t_arrive:
                steady.append(b - a)
            elif a < t_first:  # the gap overlaps [arrival, first token]
                during.append(b - a)
                if b > t_first:  # ... and spans the first token: the last chunk (or the whole
                    placing.append(b - a)  # prefill), its placing, the first decode with its row
    between = sorted(during)
    for g in placing:
        between.remove(g)
    ms = lambda x: round(1e3 * x, 1)  # noqa: E731
    return {"ttft_long_s": round(t_first - t_arrive, 3),
            "steady_tpot_p50_ms": ms(pct(steady, 50)), "steady_tpot_p99_ms": ms(pct(steady, 99)),
            "during_tpot_p50_ms": ms(pct(during, 50)), "during_tpot_p99_ms": ms(pct(during, 99)),
            "during_tpot_max_ms": ms(max(during, default=float("nan"))), "during_gaps": len(during),
            "between_tpot_p50_ms": ms(pct(between, 50)), "between_tpot_p99_ms": ms(pct(between, 99)),
            "placing_gap_p50_ms": ms(pct(placing, 50)), "compiles_during_run": engine.compile_count - compiles}


def alone(engine: Engine, chunk: int, length: int, repeats: int = 3) -> dict:
    """Seconds of one chunk's extend ([1, chunk] over a `length` cache) and of one 32-row decode call, alone."""
    ex, best = engine.executor, float("inf")
    if chunk:
        for _ in range(repeats):
            cache = pool_programs.empty_cache(ex.config, 1, length)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            out = pool_programs.extend(ex.graphdef, ex.params, ex.head, cache, np.zeros((1, chunk), np.int32),
                                       np.zeros((1,), np.int32), np.full((1,), chunk, np.int32))
            jax.block_until_ready(out)
            best = min(best, time.perf_counter() - t0)
    decode, wide = (ex.time_decodes([(engine.slots, w)], repeats)[engine.slots]
                    for w in (engine.scheduler.windows[0], engine.scheduler.bucket(length)))
    return {"chunk_s": round(best, 4) if chunk else None, "decode_s": round(decode, 4), "decode_1024_s": round(wide, 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--streams", type=int, default=31)
    ap.add_argument("--long", type=int, default=1000)
    ap.add_argument("--chunks", default="0,16,64,256,512", help="prefill chunk sizes to run (0: off)")
    ap.add_argument("--steady", type=int, default=20, help="tokens each stream has before the long prompt")
    ap.add_argument("--skip", type=int, default=5, help="each stream's first gaps left out (admission)")
    ap.add_argument("--stream-tokens", type=int, default=105, help="max_tokens of the streams (window 128)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = init_model(args.preset)
    rows = {}
    for chunk in (int(c) for c in args.chunks.split(",")):
        engine = Engine(model, get_tokenizer(), slots=args.slots, decode_steps=1, limits=Limits(max_queue=4096),
                        prefill_chunk=chunk)
        engine.start()
        t0 = time.perf_counter()
        round_of(engine, args, np.random.default_rng(args.seed + 1))  # untimed: compiles what the run needs
        warm_s = time.perf_counter() - t0
        row = {"preset": args.preset, "slots": args.slots, "streams": args.streams, "long": args.long,
               "prefill_chunk": chunk, "warm_round_s": round(warm_s, 1),
               **round_of(engine, args, np.random.default_rng(args.seed))}
        engine.stop()
        row.update(alone(engine, chunk, engine.scheduler.bucket(args.long)))
        row["during_p99_over_steady_p50"] = round(row["during_tpot_p99_ms"] / row["steady_tpot_p50_ms"], 2)
        row["between_p99_over_steady_p50"] = round(row["between_tpot_p99_ms"] / row["steady_tpot_p50_ms"], 2)
        print(json.dumps(row), flush=True)
        rows[chunk] = row
        del engine
        gc.collect()
    print(json.dumps({"summary": {str(c): {"during_p99_over_steady_p50": r["during_p99_over_steady_p50"],
                                           "between_p99_over_steady_p50": r["between_p99_over_steady_p50"],
                                           "ttft_long_s": r["ttft_long_s"]} for c, r in rows.items()}}), flush=True)


if __name__ == "__main__":
    main()
