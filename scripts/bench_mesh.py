"""Decode tokens/s of the engine on 1, 2, 4, 8 forced CPU devices (data-parallel meshes).

On a 2-core CPU this shows the overhead of partitioning, not a speed-up: the forced
devices share the same two cores. Each device count runs in its own subprocess (XLA_FLAGS
must be set before jax starts).

    python scripts/bench_mesh.py --preset gpt2 --slots 8 --new-tokens 32 --devices 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(args) -> None:
    from pgpt_jax import sharding
    from pgpt_jax.bench import _run_batch
    from pgpt_jax.engine import Engine
    from pgpt_jax.model import init_model
    from pgpt_jax.tokenizer import get_tokenizer

    mesh = sharding.make_mesh(data=args.devices_n, model=1) if args.devices_n > 1 else None
    model = init_model(args.preset, mesh=mesh)
    eng = Engine(model, get_tokenizer(), slots=args.slots, decode_steps=8, mesh=mesh)
    _run_batch(eng, args.slots, 32, 8, temperature=0.0)  # compiles what the timed runs need
    t0 = time.perf_counter()
    rate = max(_run_batch(eng, args.slots, 32, args.new_tokens, temperature=0.0) for _ in range(2))
    print(json.dumps({"devices": args.devices_n, "slots": args.slots, "preset": args.preset,
                      "decode_tok_s": round(rate, 1), "timed_s": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--devices-n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.devices_n is not None:
        return child(args)
    for n in (int(d) for d in args.devices.split(",")):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, __file__, "--preset", args.preset, "--slots", str(args.slots),
               "--new-tokens", str(args.new_tokens), "--devices-n", str(n)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"devices={n} failed: {out.stderr[-500:]}",
              flush=True)


if __name__ == "__main__":
    main()
