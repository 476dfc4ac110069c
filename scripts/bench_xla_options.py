"""Decode tokens/s under each XLA:CPU option set (pgpt_jax.xla_options.CPU_OPTION_SETS), at batch
1, 8 and 32: what `--xla-options auto` measures at warm-up, as a table for docs/benchmarks.md.

    python scripts/bench_xla_options.py --preset gpt2 --rounds 3

Each (rows, set) is one decode program (`--steps` tokens a call, attention window 128,
32 slots of state); its time is the fastest call of `--calls` after the compiling one. The
sets are measured in `--rounds` interleaved rounds (the machine is shared: the median of
the rounds is reported, with the CPU's model name and instruction-set flags).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgpt_jax import precompile, programs, xla_options  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402


def cpu() -> str:
    info = open("/proc/cpuinfo").read()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = init_model(args.preset)
    graphdef, params, head = programs.program_params(model)
    rows_list = [int(r) for r in args.rows.split(",")]
    slots = max(rows_list)
    seconds: dict = {(r, n): [] for r in rows_list for n in xla_options.CPU_OPTION_SETS}
    for _ in range(args.rounds):
        for rows in rows_list:
            times = precompile.time_option_sets(graphdef, params, head, model.config, slots, rows=rows, window=128,
                                                steps=args.steps, top_k=5)
            for name, t in times.items():
                seconds[(rows, name)].append(t)
    print(f"CPU: {cpu()}; {args.preset}, {args.steps} decode steps a call, window 128")
    print(f"{'rows':>5} " + " ".join(f"{n:>16}" for n in xla_options.CPU_OPTION_SETS) + "   fastest")
    for rows in rows_list:
        rates = {n: rows * args.steps / statistics.median(seconds[(rows, n)]) for n in xla_options.CPU_OPTION_SETS}
        best = max(rates, key=rates.get)
        print(f"{rows:>5} " + " ".join(f"{rates[n]:>12.1f} t/s" for n in xla_options.CPU_OPTION_SETS) + f"   {best}")
        print(json.dumps({"rows": rows, "tokens_per_s": {n: round(v, 1) for n, v in rates.items()}, "fastest": best}))


if __name__ == "__main__":
    main()
