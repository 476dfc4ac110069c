"""Speculative decoding benchmark (issue 16): n-gram proposals on vs off, the same engine shape.

    python scripts/bench_speculative.py --preset gpt2 --speculative ngram:4 --new 128

Two workloads at batch 1 and batch 8 (`--batches`), `--new` tokens a request (EOS banned),
each request its own 32-token random prompt (`--prompt`):
  greedy   temperature 0: GPT-2's shape with random weights falls into loops within a few
           dozen tokens, which n-gram lookup then proposes (the repeating case);
  sampled  temperature 1, seeded: near-uniform over 50k tokens, nothing repeats, so
           proposals are rare and almost never accepted (the case where speculation can
           only cost).
For each, one engine without speculation and one with (`--speculative`), both warmed up
ahead of time for exactly this workload's shapes, run one after the other in this process,
`--repeats` times alternately (the best of each is kept: the machine may be shared). Reported: generated tokens per
second of wall time (submit to the last request's end), the ratio with/without, the
ratio of the mean time to a request's end (`latency_ratio`: at batch 8 the wall time is the
slowest row's, while rows that accept end sooner), decode calls, and with speculation the
proposed and accepted tokens and the tokens a row takes per call.
Also checks that both engines gave the same tokens (they must: seeded and greedy rows take
plain decoding's tokens). Random weights of the preset's shape; the CPU from `lscpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Limits, Request, Result  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

EOS = 50256


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return "unknown"


def warm(engine: Engine, prompt: int, new: int) -> None:
    """Compiles what this workload runs: its prefill bucket, and decode (and verify) for every
    row bucket at every window its rows pass through."""
    sched = engine.scheduler
    bucket = sched.bucket(prompt)
    top = min(prompt + new + (engine.speculative.k if engine.speculative else 0) + 2, engine.context_length)
    engine.executor.warmup([(rows, bucket) for rows in sched.prefill_rows[bucket]], sched.decode_shapes(top),
                           verifies=[(rows, w) for rows in sched.row_buckets for w in sched.windows
                                     if w <= sched.window(top)])
    engine.measure_costs()  # as Engine.warmup does: when a Verify pays
    engine.submit(Request(prompt=[11] * prompt, max_tokens=4), lambda ev: None)  # small eager ops
    engine.run_until_idle()


def run(engine: Engine, requests: list[Request]) -> tuple[float, float, list]:
    """(wall time, mean time to each request's end, each request's tokens)."""
    results, ends = [None] * len(requests), [0.0] * len(requests)

    def done(i):
        def cb(ev):
            results[i], ends[i] = ev, time.perf_counter()
        return cb

    t0 = time.perf_counter()
    engine.submit_all(requests, [done(i) for i in range(len(requests))])
    engine.run_until_idle()
    wall = time.perf_counter() - t0
    assert all(isinstance(r, Result) for r in results), results
    return wall, sum(e - t0 for e in ends) / len(ends), [r.choices[0].token_ids for r in results]


def workload(kind: str, batch: int, prompt: int, new: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(prompt=rng.integers(0, EOS, prompt).tolist(), max_tokens=new,
                    temperature=0.0 if kind == "greedy" else 1.0, seed=seed * 1000 + i, logit_bias={EOS: -100.0})
            for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--speculative", default="ngram:4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()

    model = init_model(args.preset, seed=0)
    tok = get_tokenizer()
    engines = {}
    for name, spec in (("plain", None), ("spec", args.speculative)):
        t0 = time.perf_counter()
        engines[name] = Engine(model, tok, slots=args.slots, decode_steps=1, limits=Limits(max_logprobs=5),
                               speculative=spec)
        warm(engines[name], args.prompt, args.new)
        print(f"# warm-up {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary = {"cpu": cpu_model(), "preset": args.preset, "speculative": args.speculative, "new": args.new,
               "prompt": args.prompt, "verify_cost": engines["spec"].planner.speculation.verify_cost, "cases": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        for kind in ("greedy", "sampled"):
            reqs = workload(kind, batch, args.prompt, args.new, seed=batch)
            best, latency, tokens, stats = {}, {}, {}, {}
            for _ in range(args.repeats):
                for name, eng in engines.items():
                    before = (eng.decode_calls, eng.spec_proposed_tokens, eng.spec_accepted_tokens)
                    wall, mean, tokens[name] = run(eng, reqs)
                    best[name] = min(best.get(name, wall), wall)
                    latency[name] = min(latency.get(name, mean), mean)
                    stats[name] = (eng.decode_calls - before[0], eng.spec_proposed_tokens - before[1],
                                   eng.spec_accepted_tokens - before[2])
            made = sum(len(t) for t in tokens["plain"])
            case = {"kind": kind, "batch": batch, "tokens": made, "same_tokens": tokens["plain"] == tokens["spec"],
                    "plain_tok_s": round(made / best["plain"], 1), "spec_tok_s": round(made / best["spec"], 1),
                    "ratio": round(best["plain"] / best["spec"], 3),
                    "latency_ratio": round(latency["plain"] / latency["spec"], 3),
                    "plain_calls": stats["plain"][0], "spec_calls": stats["spec"][0],
                    "proposed": stats["spec"][1], "accepted": stats["spec"][2],
                    "tokens_per_call": round(made / batch / max(stats["spec"][0], 1), 2)}
            summary["cases"].append(case)
            print(json.dumps(case), flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
