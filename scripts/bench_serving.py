"""Serving benchmark: an OpenAI-compatible load generator, and the server-vs-engine comparison.

`load` drives any OpenAI-compatible Completions endpoint (ours, vLLM, llama.cpp, OpenAI)
with streaming requests, either at a fixed concurrency (closed loop: each of C workers
sends its next request when the last one ends) or with Poisson arrivals at a given
rate (open loop), and reports request throughput, output tokens/s, time to first token
(TTFT), time per output token (TPOT, after the first) and end-to-end latency
(p50/p90/p99) as JSON:

    python scripts/bench_serving.py load --base-url http://127.0.0.1:8000/v1 --model pgpt-code \\
        --concurrency 8 --num-requests 32 --prompt-tokens 32 --output-tokens 128

`compare` answers "what does HTTP cost?": it builds one Engine (random weights of a
preset), runs the same workload straight through `engine.submit` (the engine's own
rate) and through our server (uvicorn in this process, the load generator in a child
process so that it does not share the server's GIL), interleaved per concurrency:

    python scripts/bench_serving.py compare --preset gpt2 --slots 32 --concurrency 1,8,32

Prompts are random token ids (exact lengths); EOS is banned with logit_bias so every
request generates exactly --output-tokens tokens. All figures are wall-clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Iterable, Optional

EOS = 50256


# ----------------------------------------------------------------------------- workload and report


def make_prompts(n: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, EOS) for _ in range(prompt_tokens)] for _ in range(n)]


def percentiles_ms(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs = sorted(xs)

    def q(p: float) -> float:  # nearest-rank percentile
        return round(xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))] * 1000, 2)

    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": round(sum(xs) / len(xs) * 1000, 2)}


class Record:
    """One request's timeline: start, first text, last text, tokens, error."""

    __slots__ = ("start", "first", "last", "tokens", "error")

    def __init__(self, start: float):
        self.start, self.first, self.last, self.tokens, self.error = start, None, None, 0, None

    def text(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now


def report(records: list[Record], duration: float, **meta) -> dict:
    ok = [r for r in records if r.error is None and r.first is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        **meta,
        "completed": len(ok), "failed": len(records) - len(ok),
        "errors": sorted({str(r.error)[:200] for r in records if r.error is not None})[:5],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 4),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / duration, 2),
        "ttft_ms": percentiles_ms([r.first - r.start for r in ok]),
        "tpot_ms": percentiles_ms([(r.last - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]),
        "e2e_ms": percentiles_ms([r.last - r.start for r in ok]),
    }


# ----------------------------------------------------------------------------- HTTP load generator


async def _one_http(client, url: str, body: dict, headers: dict) -> Record:
    import httpx

    rec = Record(time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            counted = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = chunk["error"].get("message")
                    break
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        rec.text(time.perf_counter())
                        counted += 1
            rec.tokens = rec.tokens or counted  # servers without include_usage: chunks ~ tokens
    except (httpx.HTTPError, OSError, ValueError) as exc:
        rec.error = repr(exc)
    return rec


async def closed_loop(client, url: str, bodies: Iterable[dict], concurrency: int,
                      headers: Optional[dict] = None) -> tuple[list[Record], float]:
    """Closed loop: each of `concurrency` workers sends the next body as soon as its last request
    ends. Returns every request's Record and the wall time of the whole loop in seconds."""
    records: list[Record] = []
    todo = iter(bodies)  # shared: each body goes to whichever worker is free first

    async def worker() -> None:
        for body in todo:
            records.append(await _one_http(client, url, body, headers or {}))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - t0


async def run_load(args) -> dict:
    import httpx

    url = args.base_url.rstrip("/") + ("/chat/completions" if args.chat else "/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = make_prompts(args.num_requests, args.prompt_tokens, args.seed)

    def body(i: int) -> dict:
        b = {"model": args.model, "max_tokens": args.output_tokens, "temperature": args.temperature,
             "stream": True, "stream_options": {"include_usage": True}, "seed": args.seed + i}
        if args.ignore_eos:
            b["logit_bias"] = {str(EOS): -100}
        if args.chat:
            b["messages"] = [{"role": "user", "content": " ".join(map(str, prompts[i]))}]
        else:
            b["prompt"] = prompts[i]
        return b

    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 64) + 8, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        for i in range(args.warmup):
            await _one_http(client, url, {**body(i), "max_tokens": 4}, headers)
        if args.request_rate:
            # Open loop: Poisson arrivals, optionally capped by --concurrency.
            records: list[Record] = []
            t0 = time.perf_counter()
            rng = random.Random(args.seed)
            cap = asyncio.Semaphore(args.concurrency) if args.concurrency else None

            async def arrive(i: int) -> None:
                if cap is None:
                    records.append(await _one_http(client, url, body(i), headers))
                    return
                async with cap:
                    records.append(await _one_http(client, url, body(i), headers))

            tasks = []
            for i in range(args.num_requests):
                tasks.append(asyncio.create_task(arrive(i)))
                await asyncio.sleep(rng.expovariate(args.request_rate))
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
        else:
            bodies = (body(i) for i in range(args.num_requests))
            records, duration = await closed_loop(client, url, bodies, args.concurrency, headers)
    return report(records, duration, mode="server", base_url=args.base_url, model=args.model,
                  concurrency=args.concurrency, request_rate=args.request_rate, num_requests=args.num_requests,
                  prompt_tokens=args.prompt_tokens, output_tokens_per_request=args.output_tokens)


# ----------------------------------------------------------------------------- the engine's own rate


def run_engine(engine, *, concurrency: int, num_requests: int, prompt_tokens: int, output_tokens: int,
               temperature: float, seed: int) -> dict:
    """The same closed-loop workload straight through engine.submit (streaming, as the server uses it)."""
    from pgpt_jax.request import Delta, Request

    prompts = make_prompts(num_requests, prompt_tokens, seed)
    records: list[Record] = []
    lock = threading.Lock()
    next_i = iter(range(num_requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            done = threading.Event()
            rec = Record(time.perf_counter())

            def callback(event, rec=rec, done=done) -> None:
                if isinstance(event, Delta):
                    if event.text:
                        rec.text(time.perf_counter())
                    return
                if isinstance(event, Exception):
                    rec.error = event
                else:
                    rec.tokens = event.completion_tokens
                done.set()

            engine.submit(Request(prompt=prompts[i], max_tokens=output_tokens, temperature=temperature,
                                  seed=seed + i, stream=True, logit_bias={EOS: -100.0}), callback)
            done.wait()
            with lock:
                records.append(rec)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report(records, time.perf_counter() - t0, mode="engine", concurrency=concurrency,
                  num_requests=num_requests, prompt_tokens=prompt_tokens, output_tokens_per_request=output_tokens)


def run_compare(args) -> list[dict]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from pgpt_jax.engine import Engine
    from pgpt_jax.request import Limits
    from pgpt_jax.model import init_model
    from pgpt_jax.tokenizer import get_tokenizer
    from server.app import create_app

    import uvicorn

    model = init_model(args.preset, dtype=args.dtype)
    engine = Engine(model, get_tokenizer(), slots=args.slots, decode_steps=args.decode_steps,
                    limits=Limits(max_queue=1024))
    print(f"warm-up of {args.preset} with {args.slots} slots ({args.warmup}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if args.warmup == "full":
        engine.warmup(progress=True)
    else:
        # Compile only what this workload runs (its prompt bucket, its decode windows): one
        # untimed request of the same lengths. Minutes less on a CPU; compiles_after_warmup
        # in the summary says whether the timed runs still compiled anything.
        engine.start()
        run_engine(engine, concurrency=1, num_requests=1, prompt_tokens=args.prompt_tokens,
                   output_tokens=args.output_tokens, temperature=args.temperature, seed=args.seed)
    print(f"warm-up {time.perf_counter() - t0:.1f} s, {engine.compile_count} programs", file=sys.stderr, flush=True)
    name = f"random:{args.preset}"
    app = create_app(engine, served_model_name=name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    compiles = engine.compile_count
    rows = []
    try:
        for rnd in range(args.rounds):
            for c in args.concurrency_list:
                n = args.num_requests or max(2, args.requests_per_stream * c)
                common = dict(concurrency=c, num_requests=n, prompt_tokens=args.prompt_tokens,
                              output_tokens=args.output_tokens, temperature=args.temperature, seed=args.seed)
                row = run_engine(engine, **common)
                rows.append({**row, "round": rnd, "preset": args.preset, "slots": args.slots})
                print(json.dumps(rows[-1]), flush=True)
                cmd = [sys.executable, os.path.abspath(__file__), "load", "--base-url",
                       f"http://127.0.0.1:{args.port}/v1", "--model", name, "--concurrency", str(c),
                       "--num-requests", str(n), "--prompt-tokens", str(args.prompt_tokens),
                       "--output-tokens", str(args.output_tokens), "--temperature", str(args.temperature),
                       "--seed", str(args.seed), "--warmup", "1"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append({**row, "round": rnd, "preset": args.preset, "slots": args.slots})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    summary = []
    for c in args.concurrency_list:
        eng = [r["output_tokens_per_s"] for r in rows if r["mode"] == "engine" and r["concurrency"] == c]
        srv = [r["output_tokens_per_s"] for r in rows if r["mode"] == "server" and r["concurrency"] == c]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        summary.append({"concurrency": c, "engine_tok_s": med(eng), "server_tok_s": med(srv),
                        "server_over_engine": round(med(srv) / med(eng), 3)})
    result = {"summary": summary, "compiles_after_warmup": engine.compile_count - compiles}
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps(result) + "\n")
    return rows


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def workload(q):
        q.add_argument("--num-requests", type=int, default=None, help="default: 32 (load), max(2, C * --requests-per-stream) (compare)")
        q.add_argument("--prompt-tokens", type=int, default=32)
        q.add_argument("--output-tokens", type=int, default=128)
        q.add_argument("--temperature", type=float, default=1.0)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json", default=None, help="append the JSON results to this file")

    q = sub.add_parser("load", help="drive an OpenAI-compatible endpoint")
    q.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    q.add_argument("--model", required=True)
    q.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    q.add_argument("--concurrency", type=int, default=None, help="closed loop with C workers (default 8)")
    q.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    q.add_argument("--chat", action="store_true", help="use /chat/completions (prompt ids become words)")
    q.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    q.add_argument("--warmup", type=int, default=1, help="short requests sent before timing")
    workload(q)

    q = sub.add_parser("compare", help="server vs the engine's own rate, same workload, same process")
    q.add_argument("--preset", default="gpt2")
    q.add_argument("--dtype", default=None)
    q.add_argument("--slots", type=int, default=32)
    q.add_argument("--decode-steps", type=int, default=4)
    q.add_argument("--concurrency", default="1,8,32")
    q.add_argument("--rounds", type=int, default=1)
    q.add_argument("--port", type=int, default=8765)
    q.add_argument("--requests-per-stream", type=int, default=2,
                   help="requests per concurrent stream when --num-requests is not given")
    q.add_argument("--warmup", choices=("full", "workload"), default="full",
                   help="full: Engine.warmup() (every program); workload: one untimed request of the same lengths")
    workload(q)

    args = p.parse_args(argv)
    if args.command == "load":
        if args.concurrency is None and args.request_rate is None:
            args.concurrency = 8
        args.num_requests = args.num_requests or 32
        row = asyncio.run(run_load(args))
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    else:
        args.concurrency_list = [int(c) for c in args.concurrency.split(",")]
        run_compare(args)


if __name__ == "__main__":
    main()
