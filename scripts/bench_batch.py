"""Batch work benchmarks (issue 17): offline throughput and interactive latency under a batch.

    python scripts/bench_batch.py --model random:gpt2 --slots 32

1. `run-batch` throughput: 512 requests (32-token prompts, 64 new tokens, EOS banned) through
   `server.batch.offline.run_batch` (line parsing, background requests, response bodies, the
   output file), against the engine's own bench figure (`pgpt_jax.bench._run_batch`: every
   slot filled with one request of the same shape) on the same engine, measured before and
   after in the same run. Target: at least 0.9x.
2. Interactive TTFT under a batch: an in-process server; `--clients` closed-loop streaming
   clients (32-token prompts, 16 new tokens, `--think` seconds between requests) for
   `--seconds` with no batch, then with a large batch running under each `--slacks` value
   of --batch-slack, then with the slack unbounded (batch work keeps every slot but one
   while interactive work is about). Target: p50 TTFT with the batch within 1.5x of its
   value without one.

Prints a JSON line per figure and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from pgpt_jax import bench  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402
from server.app import create_app  # noqa: E402
from server.batch.offline import run_batch  # noqa: E402
from server.http import HTTPSettings, uvicorn_config  # noqa: E402
from server.protocol import ModelInfo  # noqa: E402
from server.serve import load_model_for_serving  # noqa: E402

NAME = "bench"
NO_EOS = {"50256": -100}


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def batch_lines(n: int, prompt_len: int, new_tokens: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": NAME, "prompt": rng.integers(0, 50000, prompt_len).tolist(),
                                 "max_tokens": new_tokens, "seed": i, "logit_bias": NO_EOS}})
            for i in range(n)]


def throughput(engine: Engine, args, tmp: Path) -> dict:
    info = ModelInfo(NAME, engine.config.vocab_size, engine.context_length, False, engine.limits, engine.tokenizer)
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    inp.write_text("\n".join(batch_lines(args.requests, 32, 64)) + "\n")
    engine_figures = [bench._run_batch(engine, args.slots, 32, 64)]
    emit(what="engine bench", tokens_per_s=round(engine_figures[-1], 1))
    stats = run_batch(engine, info, str(inp), str(out), progress=False)
    engine.stop(reopen=True)
    emit(what="run-batch", requests=args.requests, tokens=stats["tokens"], tokens_per_s=round(stats["tokens_per_s"], 1))
    engine_figures.append(bench._run_batch(engine, args.slots, 32, 64))
    emit(what="engine bench", tokens_per_s=round(engine_figures[-1], 1))
    ratio = stats["tokens_per_s"] / statistics.mean(engine_figures)
    return emit(what="run-batch / engine bench", ratio=round(ratio, 3), target=0.9)


class Server:
    def __init__(self, app):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.sock.getsockname()[1], HTTPSettings(),
                                                    log_level="warning"))
        threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True


def interactive(url: str, clients: int, seconds: float, think: float) -> list[float]:
    """TTFTs of `clients` closed-loop streaming clients over `seconds`."""
    ttfts: list[float] = []
    stop = time.monotonic() + seconds
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50000, 32).tolist() for _ in range(64)]

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = k
            while time.monotonic() < stop:
                body = {"model": NAME, "prompt": prompts[i % len(prompts)], "max_tokens": 16, "stream": True,
                        "logit_bias": NO_EOS}
                t0 = time.perf_counter()
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    first = None
                    for line in r.iter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.perf_counter() - t0
                ttfts.append(first)
                i += clients
                time.sleep(think)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttfts


def latency(engine: Engine, args, tmp: Path) -> dict:
    app = create_app(engine, served_model_name=NAME, batch_dir=str(tmp / "batches"))
    srv = Server(app)
    st = app.state.pgpt
    try:
        interactive(srv.url, args.clients, 5, args.think)  # settle
        alone = interactive(srv.url, args.clients, args.seconds, args.think)
        p50 = statistics.median(alone)
        emit(what="interactive TTFT, no batch", n=len(alone), p50_s=round(p50, 4),
             p90_s=round(float(np.percentile(alone, 90)), 4))
        http = httpx.Client(base_url=srv.url, timeout=60)
        fid = http.post("/v1/files", files={"file": ("in.jsonl", "\n".join(batch_lines(4096, 32, 64)).encode())},
                        data={"purpose": "batch"}).json()["id"]
        batch = http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions",
                                               "completion_window": "24h"}).json()
        while engine.active_slots < args.slots:
            time.sleep(0.1)
        out = {}
        for label, slack in [(f"slack {x:g}", x) for x in args.slacks] + [("slack unbounded", float("inf"))]:
            engine.scheduler.batch_slack = slack
            done0, gen0, yields0 = (http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"],
                                    engine.generated_tokens, engine.batch_yields)
            under = interactive(srv.url, args.clients, args.seconds, args.think)
            done1 = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"]
            out[label] = emit(what=f"interactive TTFT under a batch, {label}", n=len(under),
                              p50_s=round(statistics.median(under), 4),
                              p90_s=round(float(np.percentile(under, 90)), 4),
                              ratio_p50=round(statistics.median(under) / p50, 3), target=1.5,
                              batch_lines_done=done1 - done0, yields=engine.batch_yields - yields0,
                              tokens_per_s_all=round((engine.generated_tokens - gen0) / args.seconds, 1))
        http.post(f"/v1/batches/{batch['id']}/cancel")
        return out
    finally:
        srv.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--think", type=float, default=0.25)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--slacks", default="1.25,1", help="--batch-slack values to measure (then unbounded)")
    p.add_argument("--no-compile-cache", action="store_true")
    p.add_argument("--part", choices=["all", "throughput", "latency"], default="all")
    args = p.parse_args()
    args.slacks = [float(x) for x in args.slacks.split(",")]
    if not args.no_compile_cache:
        from pgpt_jax import xla_options

        xla_options.use_compile_cache(xla_options.default_compile_cache_dir())
    model, what = load_model_for_serving(args.model, None)
    engine = Engine(model, get_tokenizer(), slots=args.slots, decode_steps=args.decode_steps,
                    batch_slack=args.slacks[0])
    t0 = time.perf_counter()
    engine.warmup()
    emit(what="warm-up", model=what, seconds=round(time.perf_counter() - t0, 1),
         decode_cost_s={r: round(t, 4) for r, t in engine.scheduler.decode_cost.items()},
         cpu=os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip())
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "throughput"):
            throughput(engine, args, Path(tmp))
        if args.part in ("all", "latency"):
            latency(engine, args, Path(tmp))
    engine.stop()  # before the interpreter exits under a running engine thread


if __name__ == "__main__":
    main()
