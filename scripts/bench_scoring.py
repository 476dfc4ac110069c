"""Scoring throughput: pgpt-jax's OpenAI server against HF transformers' forward pass, on the same
weights, on the same machine, in the same run.

    # the issue's benchmark (peers in their own venv: torch CPU wheel + transformers)
    python scripts/bench_scoring.py --hf-python /work/peers-venv/bin/python --json /tmp/scoring.jsonl
    # a smoke run: the tiny preset, no peer
    python scripts/bench_scoring.py --preset tiny --texts 6 --tokens 16 --rounds 2 --hf-python none

The job is scoring: for each of --texts texts of --tokens tokens, the logprob of every token
after the first and the most likely token at each position (top-1 id and logprob). pgpt-jax
gets it as OpenAI's scoring request, `echo: true, logprobs: 1, max_tokens: 0`, with
--prompts-per-request token-id prompts per POST to /v1/completions of `create_app` served by
uvicorn in this process (JSON both ways, parsed by the client, counted in its time; `--path
engine` submits the same Requests to the Engine directly instead). HF transformers runs in a
worker process of --hf-python: GPT2LMHeadModel.from_pretrained on the same HF dir, float32,
torch.inference_mode, then logsumexp, gather and max over its logits (the same outputs,
without materialising a log_softmax copy), in batches of the size that was fastest on a first
calibration chunk (--hf-batches; each size gets a warm-up call first).

Weights: random GPT-2 weights of --preset from the package's own init (seed 0), written once
by `checkpoint.save_hf` into --work-dir; both sides load that directory. Texts: random token
ids (EOS excluded), from a fixed seed. The run is interleaved: --rounds chunks of the texts,
each scored by both sides, in alternating order, so that both see the same load; tokens/s
is texts x tokens over the summed seconds of each side. The two sides' outputs are compared
(largest logprob difference; the share of positions whose top-1 token agrees). One JSON line
per round and one summary line go to --json.

`--profile` adds, on our side, the device time of the prefill programs at the shape the
engine used (without prompt logprobs, with them, and the LM head matmul alone), to say
where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

EOS = 50256
PROTO = "@@"  # worker -> driver lines start with this; whatever libraries print goes elsewhere


# ----------------------------------------------------------------------------- HF worker


def hf_worker(weights: str, threads: int) -> None:
    """Runs in the peer venv: answers one JSON command per stdin line with one PROTO line."""
    import torch
    from transformers import GPT2LMHeadModel

    out, sys.stdout = sys.stdout, sys.stderr  # library prints must not mix with the protocol
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(weights, dtype=torch.float32).eval()

    def score(ids):
        with torch.inference_mode():
            logits = model(ids).logits[:, :-1]  # [B, T-1, V]: position i predicts token i+1
            lse = torch.logsumexp(logits, dim=-1)
            lp = logits.gather(-1, ids[:, 1:, None])[..., 0] - lse
            top, top_ids = logits.max(dim=-1)
            return lp, top_ids, top - lse

    out.write(PROTO + json.dumps({"ok": True, "torch": torch.__version__,
                                  "transformers": __import__("transformers").__version__}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        texts, batch = torch.tensor(cmd["texts"]), cmd["batch"]
        results = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            results.append(score(texts[i:i + batch]))
        seconds = time.perf_counter() - t0
        lp, ids, top = (torch.cat(r).tolist() for r in zip(*results))
        out.write(PROTO + json.dumps({"seconds": seconds, "logprobs": lp, "top_ids": ids, "top_logprobs": top})
                  + "\n")
        out.flush()


class HF:
    """The driver's side of the worker: score(texts, batch) -> (seconds, outputs)."""

    def __init__(self, python: str, weights: Path, threads: int):
        self.proc = subprocess.Popen([python, __file__, "--worker", "--weights", str(weights),
                                      "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.versions = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
        raise RuntimeError(f"the HF worker exited with code {self.proc.wait()}")

    def score(self, texts: list, batch: int) -> tuple[float, dict]:
        self.proc.stdin.write(json.dumps({"texts": texts, "batch": batch}) + "\n")
        self.proc.stdin.flush()
        out = self._answer()
        return out.pop("seconds"), out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- our side


class Ours:
    """pgpt-jax scoring through the server (or the engine): score(texts) -> (seconds, outputs)."""

    def __init__(self, weights: Path, a):
        from pgpt_jax.checkpoint import load_model
        from pgpt_jax.engine import Engine
        from pgpt_jax.request import Limits
        from pgpt_jax.tokenizer import get_tokenizer

        self.a, self.tok = a, get_tokenizer()
        model = load_model(str(weights))
        limits = Limits(max_logprobs=1, max_prompts=max(a.prompts_per_request, 1),
                        max_queue=2 * a.texts, max_queued_tokens=4 * a.texts * model.config.n_positions)
        # Slots only bound the prefill rows (1, 4, 16 within max_prefill_tokens); scoring holds none.
        self.engine = Engine(model, self.tok, slots=16, decode_steps=1, limits=limits,
                             min_bucket=a.tokens, max_prefill_tokens=a.max_prefill_tokens)
        self.warmup_s = self.engine.warmup() if a.warmup else 0.0  # without: compiled on first use
        self.compiled = self.engine.compile_count
        self.server = self.http = None
        if a.path == "http":
            self._serve()
        else:
            self.engine.start()

    def _serve(self) -> None:
        import httpx
        import uvicorn

        from server.app import create_app

        app = create_app(self.engine, served_model_name="bench", max_body_bytes=256 * 1024 * 1024)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=None)

    def score(self, texts: list) -> tuple[float, dict]:
        n = self.a.prompts_per_request
        parts = [texts[i:i + n] for i in range(0, len(texts), n)]
        answers: list = [None] * len(parts)
        t0 = time.perf_counter()
        # Two requests in flight: the server parses the next while the engine runs one.
        threads = [threading.Thread(target=self._one, args=(parts, answers, k)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        choices = [c for a in answers for c in a]
        lp, top_ids, top = [], [], []
        for c in choices:
            entries = c["logprobs"]
            lp.append(entries["token_logprobs"][1:])
            best = [max(d.items(), key=lambda kv: kv[1]) for d in entries["top_logprobs"][1:]]
            top_ids.append([t for t, _ in best])  # token strings: compared through the tokenizer
            top.append([v for _, v in best])
        return seconds, {"logprobs": lp, "top_tokens": top_ids, "top_logprobs": top}

    def _one(self, parts: list, answers: list, k: int) -> None:
        for i in range(k, len(parts), 2):
            answers[i] = self._request(parts[i])

    def _request(self, prompts: list) -> list:
        if self.http is None:
            return self._submit(prompts)
        r = self.http.post("/v1/completions", json={"model": "bench", "prompt": prompts, "echo": True,
                                                    "logprobs": 1, "max_tokens": 0})
        r.raise_for_status()
        return sorted(r.json()["choices"], key=lambda c: c["index"])

    def _submit(self, prompts: list) -> list:
        from pgpt_jax.request import Request

        done, results = threading.Event(), [None] * len(prompts)

        def callback(i):
            def f(event):
                results[i] = event
                if all(r is not None for r in results):
                    done.set()
            return f

        reqs = [Request(prompt=p, max_tokens=0, echo=True, logprobs=1) for p in prompts]
        self.engine.submit_all(reqs, [callback(i) for i in range(len(reqs))])
        done.wait()
        return [{"logprobs": r.choices[0].logprobs.to_dict()} for r in results]

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        else:
            self.engine.stop()


def profile(ours: Ours, a) -> dict:
    """Device ms per call of the prefill programs at the scoring shape (best of 3)."""
    import jax

    from pgpt_jax import programs, xla_options

    e = ours.engine
    bucket = e.scheduler.bucket(a.tokens)
    rows = e.scheduler.prefill_rows[bucket][-1]
    tokens = np.random.default_rng(1).integers(0, EOS, (rows, bucket)).astype(np.int32)
    lengths = np.full((rows,), a.tokens, np.int32)
    head_t = jax.jit(lambda h, w: h @ w, compiler_options=xla_options.compiler_options())
    hidden = jax.numpy.zeros((rows * (bucket - 1), e.config.n_embd), jax.numpy.float32)
    calls = {
        "prefill, no logprobs": lambda: programs.prefill(e.graphdef, e.params, e.head, tokens, lengths,
                                                         np.zeros((2,), np.int32), want_logprobs=False,
                                                         top_k=e.top_k),
        "prefill, prompt logprobs top 1": lambda: programs.prefill(
            e.graphdef, e.params, e.head, tokens, lengths, np.array([1, 0], np.int32), want_logprobs=True,
            top_k=e.top_k),
        "LM head matmul alone": lambda: head_t(hidden, e.head),
    }
    out = {"rows": rows, "bucket": bucket}
    for name, f in calls.items():
        jax.block_until_ready(f())
        best = min(_timed(lambda: jax.block_until_ready(f())) for _ in range(3))
        out[name] = round(1000 * best, 1)
    return out


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the run


def machine() -> dict:
    flags, model = set(), platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd, "load": os.getloadavg()[0]}


def compare(ours: dict, hf: dict, tok) -> dict:
    """Largest |logprob difference| over every position, and the share of positions whose top-1
    token agrees (the top-1 logprobs' largest difference too)."""
    diff = float(np.max(np.abs(np.asarray(ours["logprobs"]) - np.asarray(hf["logprobs"]))))
    top_diff = float(np.max(np.abs(np.asarray(ours["top_logprobs"]) - np.asarray(hf["top_logprobs"]))))
    agree = [o == tok.token_str(int(h)) for orow, hrow in zip(ours["top_tokens"], hf["top_ids"])
             for o, h in zip(orow, hrow)]
    return {"max_abs_logprob_diff": diff, "max_abs_top1_logprob_diff": top_diff,
            "top1_agree": sum(agree) / len(agree)}


def emit(path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def weights_dir(work: Path, preset: str) -> Path:
    from pgpt_jax.checkpoint import save_hf
    from pgpt_jax.model import init_model

    d = work / f"{preset}-seed0"
    if not (d / "model.safetensors").exists():
        tmp = d.with_name(d.name + ".tmp")
        save_hf(init_model(preset, seed=0), tmp)
        tmp.rename(d)
    return d


def run(a) -> dict:
    if a.compile_cache:
        from pgpt_jax import xla_options

        xla_options.use_compile_cache(os.path.expanduser(a.compile_cache))
    work = Path(a.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    weights = weights_dir(work, a.preset)
    texts = np.random.default_rng(a.seed).integers(0, EOS, (a.texts, a.tokens)).tolist()
    hf = None if a.hf_python == "none" else HF(a.hf_python, weights, a.threads)
    ours = Ours(weights, a)
    info = {"what": "setup", **machine(), "preset": a.preset, "texts": a.texts, "tokens": a.tokens,
            "path": a.path, "warmup_s": round(ours.warmup_s, 1), "programs": ours.compiled,
            "hf": hf.versions if hf else None}
    batch = None
    if hf is not None:  # HF's batch size: the fastest on a calibration chunk, each size warmed up first
        calib = texts[:max(a.hf_batches)]
        speeds = {}
        for b in a.hf_batches:
            hf.score(calib[:b], b)
            speeds[b] = round(len(calib) * a.tokens / hf.score(calib, b)[0], 1)
        batch = max(speeds, key=speeds.get)
        info["hf_calibration_tok_s"] = speeds
    if a.profile:
        info["profile_ms"] = profile(ours, a)
    emit(a.json, info)
    compiled = ours.engine.compile_count
    chunk = -(-a.texts // a.rounds)
    spent = {"pgpt": 0.0, "hf": 0.0}
    checks = []
    for r in range(a.rounds):
        part = texts[r * chunk:(r + 1) * chunk]
        if not part:
            break
        outs = {}
        row = {"what": "round", "round": r, "texts": len(part)}
        for side in (("pgpt", "hf") if r % 2 == 0 else ("hf", "pgpt")):
            if side == "hf" and hf is None:
                continue
            seconds, outs[side] = ours.score(part) if side == "pgpt" else hf.score(part, batch)
            spent[side] += seconds
            row[f"{side}_tok_s"] = round(len(part) * a.tokens / seconds, 1)
        row["positions"] = sum(map(len, outs["pgpt"]["logprobs"]))  # scored: tokens - 1 a text
        row["load"] = round(os.getloadavg()[0], 2)
        if "hf" in outs:
            check = compare(outs["pgpt"], outs["hf"], ours.tok)
            checks.append(check)
            row.update(check)
        emit(a.json, row)
    compiled_after = ours.engine.compile_count - compiled
    ours.close()
    if hf is not None:
        hf.close()
    total = a.texts * a.tokens
    summary = {"what": "summary", "pgpt_tok_s": round(total / spent["pgpt"], 1), "pgpt_s": round(spent["pgpt"], 1),
               "compiled_while_timed": compiled_after, "load_end": round(os.getloadavg()[0], 2)}
    if hf is not None:
        summary.update(hf_tok_s=round(total / spent["hf"], 1), hf_s=round(spent["hf"], 1), hf_batch=batch,
                       ratio=round(spent["hf"] / spent["pgpt"], 2),
                       max_abs_logprob_diff=max(c["max_abs_logprob_diff"] for c in checks),
                       top1_agree=min(c["top1_agree"] for c in checks))
    emit(a.json, summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=256, help="tokens per text")
    p.add_argument("--rounds", type=int, default=10, help="interleaved chunks of the texts")
    p.add_argument("--path", choices=("http", "engine"), default="http")
    p.add_argument("--prompts-per-request", type=int, default=50)
    p.add_argument("--max-prefill-tokens", type=int, default=1024, help="the engine's: rows x bucket per call")
    p.add_argument("--hf-python", default="none", help="python of a venv with torch + transformers, or none")
    p.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every program first (--no-warmup: a smoke run compiles what it uses)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache here (default: none)")
    p.add_argument("--work-dir", default="~/.cache/pgpt-jax-bench-scoring")
    p.add_argument("--json", default=None, help="append JSON lines here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        hf_worker(a.weights, a.threads)
        return {}
    return run(a)


if __name__ == "__main__":
    main()
