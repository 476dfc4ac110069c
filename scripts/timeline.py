"""Where one streamed request's time goes in `pgpt-jax serve`, from the client's send to its tokens.

    python scripts/timeline.py                        # 1 and 8 streams, gpt2 random weights
    python scripts/timeline.py --streams 1,8,32 --requests-per-stream 4 --json out.jsonl

Starts `pgpt-jax serve --model random:gpt2` on 127.0.0.1 with PGPT_TIMELINE set (pgpt_jax/timeline.py:
the server and the engine then stamp each streamed request at every step), sends C concurrent
streaming requests in a closed loop (--prompt-tokens random token ids, --output-tokens new
tokens, EOS banned by logit_bias, --temperature), untimed warm-up first, and joins the client's
times (send, each SSE chunk) with the server's marks by the request's seed. Printed, per C:

  TTFT, step by step   the median over requests of each mark's time since the client sent the
                       request, and of the time from the mark before it (the chain's order);
  per token            the client's TPOT, the gaps between SSE chunks and the tokens in each,
                       and the server's SSE writes;
  decode programs      the device's time per decode call (from the later of its dispatch and the
                       previous call's end, to its outputs being ready) against the host's gaps
                       (the device idle, waiting for the next dispatch), by rows.

Times are time.perf_counter() in both processes (CLOCK_MONOTONIC on Linux, one clock). The
server is stopped however the script ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]

import bench_serving  # noqa: E402
from compare.phases import wait_http  # noqa: E402

# The request's marks in the order they are met; prefill/insert dispatch returns before the device
# has finished them, so *_done and first_sampled come after the host's marks of the same plan.
CHAIN = [
    ("send", "client sent the request"),
    ("arrive", "handler entered (HTTP parsed by uvicorn)"),
    ("body", "body read"),
    ("parsed", "JSON validated + tokenised (worker thread)"),
    ("queued", "engine.submit took it (registry inbox)"),
    ("accepted", "submit returned to the handler"),
    ("taken", "engine loop took it from the inbox"),
    ("placed", "planned into a slot"),
    ("prefill_dispatch", "prefill dispatched"),
    ("prefill_return", "prefill dispatch returned (host)"),
    ("prefill_timed", "the timeline's own bookkeeping done"),
    ("place_dispatch", "insert+start_row dispatched"),
    ("place_return", "insert+start_row dispatch returned (host)"),
    ("decode_dispatch", "first decode program dispatched"),
    ("prefill_done", "prefill done on the device"),
    ("first_sampled", "first token sampled (device)"),
    ("first_read", "first token read by the host"),
    ("delivered", "first delta to the callback (detokenised)"),
    ("on_loop", "first delta on the event loop"),
    ("first_write", "first SSE write handed to uvicorn"),
    ("client_first", "client read the first token"),
]


async def one(client, url: str, body: dict) -> dict:
    """One streamed request: the client's send time and each data chunk's arrival (with text)."""
    rec = {"seed": body["seed"], "send": time.perf_counter(), "chunks": [], "tokens": 0, "error": None}
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            rec["error"] = f"HTTP {resp.status_code}"
            return rec
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                rec["tokens"] = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                rec["chunks"].append(now)
    return rec


async def closed_loop(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    import httpx

    todo, out = iter(bodies), []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        async def worker() -> None:
            for body in todo:
                out.append(await one(client, url, body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def med(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(x) -> str:
    return "-" if x is None else f"{x * 1000:8.1f}"


def summarize(c: int, recs: list[dict], rows: list[dict], decodes: list[dict]) -> dict:
    by_seed = {r["seed"]: r for r in rows}
    joined = []
    for rec in recs:
        row = by_seed.get(rec["seed"])
        if rec["error"] or row is None or not rec["chunks"]:
            continue
        marks = {"send": rec["send"], **row["server"], **row["engine"], "client_first": rec["chunks"][0]}
        joined.append((rec, row, marks))
    out = {"streams": c, "requests": len(joined), "marks": {}, "steps": {}}
    for i, (name, _) in enumerate(CHAIN):
        out["marks"][name] = med([m[name] - m["send"] for _, _, m in joined if name in m])
        if i:
            prev = CHAIN[i - 1][0]
            out["steps"][name] = med([m[name] - m[prev] for _, _, m in joined if name in m and prev in m])
    out["ttft"] = med([rec["chunks"][0] - rec["send"] for rec, _, _ in joined])
    out["tpot"] = med([(rec["chunks"][-1] - rec["chunks"][0]) / (rec["tokens"] - 1)
                       for rec, _, _ in joined if rec["tokens"] > 1])
    gaps = [b - a for rec, _, _ in joined for a, b in zip(rec["chunks"], rec["chunks"][1:])]
    out["chunk_gap"] = med(gaps)
    out["chunk_gap_p90"] = sorted(gaps)[int(0.9 * (len(gaps) - 1))] if gaps else None
    writes = [w for _, row, _ in joined for w in row["writes"]]
    out["tokens_per_write"] = med([n for _, n in writes if n])
    out["write_gap"] = med([b[0] - a[0] for _, row, _ in joined for a, b in zip(row["writes"], row["writes"][1:])])
    out["first_write_tokens"] = med([row["writes"][0][1] for _, row, _ in joined if row["writes"]])
    # Decode programs of this stretch: device busy from max(dispatch, previous done) to done;
    # idle between the previous done and a later dispatch.
    decodes = sorted(decodes, key=lambda d: d["dispatch"])
    busy, idle, prev_done = [], [], None
    for d in decodes:
        start = d["dispatch"] if prev_done is None else max(d["dispatch"], prev_done)
        busy.append((d["rows"], d["steps"], d["window"], d["done"] - start))
        if prev_done is not None:
            idle.append(max(0.0, d["dispatch"] - prev_done))
        prev_done = max(prev_done or 0.0, d["done"])
    shapes = sorted({(r, s, w) for r, s, w, _ in busy})
    out["decode_calls"] = len(decodes)
    out["decode_shapes"] = {f"rows={r} steps={s} window={w}": {
        "calls": sum(1 for b in busy if b[:3] == (r, s, w)),
        "device_s_median": med([t for rr, ss, ww, t in busy if (rr, ss, ww) == (r, s, w)]),
        "dispatch_return_s_median": med([d["return"] - d["dispatch"] for d in decodes
                                         if (d["rows"], d["steps"], d["window"]) == (r, s, w)])}
        for r, s, w in shapes}
    out["device_idle_share"] = (sum(idle) / (decodes[-1]["done"] - decodes[0]["dispatch"])) if len(decodes) > 1 else None
    out["device_idle_gap_median"] = med(idle)
    return out


def print_summary(s: dict) -> None:
    print(f"\n=== {s['streams']} stream(s), {s['requests']} requests joined: TTFT p50 {ms(s['ttft'])} ms, "
          f"TPOT p50 {ms(s['tpot'])} ms")
    print(f"{'mark':<18}{'since send':>11}{'step':>10}  what")
    for name, what in CHAIN:
        print(f"{name:<18}{ms(s['marks'].get(name)):>11}{ms(s['steps'].get(name)):>10}  {what}")
    print(f"per token: client chunk gap p50 {ms(s['chunk_gap'])} ms (p90 {ms(s['chunk_gap_p90'])}), "
          f"server SSE write gap p50 {ms(s['write_gap'])} ms, tokens a write p50 {s['tokens_per_write']}, "
          f"tokens in the first write p50 {s['first_write_tokens']}")
    print(f"decode programs: {s['decode_calls']} calls, device idle {100 * (s['device_idle_share'] or 0):.1f}% "
          f"of the stretch (median gap {ms(s['device_idle_gap_median'])} ms)")
    for shape, d in s["decode_shapes"].items():
        print(f"  {shape}: {d['calls']} calls, device {ms(d['device_s_median'])} ms a call, "
              f"dispatch returns in {ms(d['dispatch_return_s_median'])} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--port", type=int, default=8795)
    p.add_argument("--serve-args", default="", help="more `pgpt-jax serve` flags, e.g. '--decode-steps 1'")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the server may take to get ready")
    p.add_argument("--json", default=None, help="append each summary (and the raw rows) to this file")
    a = p.parse_args(argv)
    streams = [int(x) for x in a.streams.split(",") if x]
    tl = Path(tempfile.mkdtemp(prefix="pgpt-timeline-")) / "timeline.jsonl"
    env = {**os.environ, "PGPT_TIMELINE": str(tl)}
    cmd = [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", a.model, "--host", "127.0.0.1",
           "--port", str(a.port), "--slots", str(a.slots), "--served-model-name", "m", *a.serve_args.split()]
    log = open(tl.with_name("server.log"), "w")
    print(f"starting: {' '.join(cmd)} (log {log.name})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{a.port}/v1/completions"
    summaries = []
    try:
        t0 = time.time()
        wait_http(f"http://127.0.0.1:{a.port}/health", proc, a.timeout)
        print(f"ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

        def bodies(n: int, base: int) -> list[dict]:
            prompts = bench_serving.make_prompts(n, a.prompt_tokens, seed=base)
            return [{"model": "m", "prompt": pr, "max_tokens": a.output_tokens, "temperature": a.temperature,
                     "stream": True, "stream_options": {"include_usage": True},
                     "logit_bias": {str(bench_serving.EOS): -100}, "seed": base + i} for i, pr in enumerate(prompts)]

        for c in sorted(set(streams)):  # untimed: first-request costs and every decode shape these reach
            asyncio.run(closed_loop(url, bodies(c, 900_000 + c * 1000), c))
        for c in streams:
            start = tl.stat().st_size if tl.exists() else 0
            recs = asyncio.run(closed_loop(url, bodies(c * a.requests_per_stream, c * 10_000), c))
            time.sleep(0.5)  # the last decode's watcher thread writes its line
            lines = [json.loads(x) for x in tl.read_text()[start:].splitlines() if x.strip()]
            rows = [x for x in lines if x["kind"] == "request"]
            decodes = [x for x in lines if x["kind"] == "decode"]
            s = summarize(c, recs, rows, decodes)
            s["failed"] = sum(1 for r in recs if r["error"])
            print_summary(s)
            summaries.append(s)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"kind": "timeline", "cmd": cmd, **s}) + "\n")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


if __name__ == "__main__":
    main()
