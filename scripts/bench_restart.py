"""How long a server takes to become ready, with an empty compilation cache and then with the
cache the first start filled (`--compile-cache DIR`), and once with the cache off.

Each start is a fresh `pgpt-jax serve` on 127.0.0.1 and a free port. The script times the
process from spawn to the first 200 from /ready, reads the warm-up the server reports
("ready after X s of warm-up"), then stops it with SIGTERM. Starts run one after another
in the order none, cold, warm, ..., so that the machine's load drifts across all of them.

    python scripts/bench_restart.py --model random:gpt2 --slots 32
    python scripts/bench_restart.py --model random:tiny --slots 8 --warm 2 --json /tmp/restart.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready after ([\d.]+) s of warm-up \(compiled (\d+) programs\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(args, cache_flags: list[str], log: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-c", "from pgpt_jax.cli import main; main()", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--model", args.model, "--slots", str(args.slots), *cache_flags,
           *shlex.split(args.server_args)]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} before it was ready; see {log}")
            if time.perf_counter() - t0 > args.timeout:
                raise SystemExit(f"not ready after {args.timeout:.0f} s; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    hit = READY.search(log.read_text())
    return {"spawn_to_ready_s": round(ready_s, 2), "warmup_s": float(hit.group(1)) if hit else None,
            "compiled": int(hit.group(2)) if hit else None, "exit": proc.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--warm", type=int, default=1, help="starts that reuse the cache after the cold one")
    p.add_argument("--server-args", default="", help="more `pgpt-jax serve` flags, one string")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a start may take to be ready")
    p.add_argument("--json", default=None, help="append one JSON line with every start")
    args = p.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="pgpt-restart-cache-"))
    logs = Path(tempfile.mkdtemp(prefix="pgpt-restart-logs-"))
    runs = [("no cache", ["--no-compile-cache"]), ("cold cache", ["--compile-cache", str(cache)])]
    runs += [(f"warm cache {i + 1}", ["--compile-cache", str(cache)]) for i in range(args.warm)]
    results = []
    try:
        for i, (name, flags) in enumerate(runs):
            r = {"start": name, **one_start(args, flags, logs / f"{i}.log")}
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        shutil.rmtree(cache, ignore_errors=True)
    cold = results[1]["warmup_s"]
    print(f"\n{args.model}, {args.slots} slots {args.server_args}; the cache held {size / 2**20:.1f} MiB")
    print("| start | spawn to /ready s | warm-up s | programs | warm-up vs cold |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r['warmup_s'] / cold:.2f}" if r["warmup_s"] and cold else ""
        print(f"| {r['start']} | {r['spawn_to_ready_s']} | {r['warmup_s']} | {r['compiled']} | {ratio} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"model": args.model, "slots": args.slots, "server_args": args.server_args,
                                "cache_mib": round(size / 2**20, 1), "cpu": os.uname().machine,
                                "starts": results}) + "\n")


if __name__ == "__main__":
    main()
