"""pgpt-jax against its peers in one command: HF transformers, llama.cpp, and the machine's roofline.

    python scripts/compare.py                          # full run, plots into docs/
    python scripts/compare.py --quick                  # smoke run: 1 round, few tokens
    python scripts/compare.py --plot-only RESULTS.jsonl  # summary and plots from a finished run

Every system runs the same random GPT-2 weights: made once with transformers (numpy when it
is missing) and saved as an HF safetensors dir, which pgpt-jax and transformers load and which
llama.cpp's own converter (shipped in llama-cpp-python's sdist) turns into GGUF f32 and f16.

  roofline  memory bandwidth (the best sum over a 1 GiB array: threaded numpy, jax, torch) and
            peak fp32 GEMM FLOP/s (the best 2048^3 matmul: numpy, jax, torch), best of 7 each,
            measured at the start and at the end of the run (the better one counts);
            decode tokens/s at batch B is at most
                min(B * BW / weight_bytes, PEAK / (2 * params))
            (every step reads all weights once; every token costs 2 FLOPs per parameter;
            KV-cache reads ignored, so it is an upper bound at any context).
  engine    generated tokens/s of `pgpt_jax.generate` and HF `generate` (PyTorch float32, and
            bfloat16 where the CPU has native bf16) at each batch size, greedy and top_p 0.9, 32-token prompts, --new-tokens
            new tokens, EOS banned, prefill included; llama.cpp (llama-cpp-python's `Llama`,
            f32 and f16) at batch 1, the only batch its Python API decodes.
  serving   `pgpt-jax serve` against llama-cpp-python's OpenAI-compatible server (f32, f16),
            each its own process, driven by scripts/bench_serving.py's streaming client at each
            concurrency (closed loop): output tokens/s, TTFT and time per output token (TPOT)
            percentiles. Prompts are text (llama.cpp's server takes no token ids) of exactly
            --prompt-tokens GPT-2 tokens; temperature 1, no top_k/min_p/repeat penalty.

Each engine-level system lives in its own worker process, loaded (and compiled) once, so no
two thread pools share the cores; the driver runs one measurement at a time and interleaves
the systems inside each round (A B C, then C B A, ...). The summary gives medians over rounds and
ratios from the same run. Every measurement is a JSON line in --out, and the plots are drawn
from that file. The peers are optional (`pip install -e '.[compare]'`): what is missing is
skipped, and the run says so. Built artifacts (weights, tokenizer files, the GGUF converter,
GGUF files) are cached in --work-dir, so a rerun goes straight to measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
EOS = 50256
TOP_P = 0.9
MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=TOP_P)}
ENGINE_SYSTEMS = ("pgpt", "hf-float32", "hf-bfloat16", "llama-f32", "llama-f16")
SERVING_SYSTEMS = ("pgpt", "llama-f32", "llama-f16")
LABELS = {"pgpt": "pgpt-jax", "hf-float32": "HF transformers fp32", "hf-bfloat16": "HF transformers bf16",
          "llama-f32": "llama.cpp f32", "llama-f16": "llama.cpp f16"}
COLORS = {"pgpt": "tab:blue", "hf-float32": "tab:orange", "hf-bfloat16": "tab:red",
          "llama-f32": "tab:green", "llama-f16": "tab:olive"}
FULL = {"rounds": 2, "batches": [1, 8, 32], "new_tokens": 128, "concurrency": [1, 8, 32], "output_tokens": 64}
QUICK = {"rounds": 1, "batches": [1, 8], "new_tokens": 16, "concurrency": [1, 4], "output_tokens": 16}
PROTO = "@@"  # worker -> driver lines start with this; anything else a library prints is ignored


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ============================================================================ artifacts


def gpt2_tokenizer_files(out_dir: Path) -> None:
    """Writes vocab.json and merges.txt (HF's byte-level BPE files) rebuilt from gpt2.tiktoken.

    The ranks are the vocabulary (each token's bytes spelled with GPT-2's byte-to-unicode map);
    merge number r - 256 forms the token of rank r from the two lower-ranked tokens that BPE
    reaches when it may only use merges below r.
    """
    from pgpt_jax.tokenizer import ENDOFTEXT, _load_ranks  # the sha256-checked ranks the package ships

    ranks = _load_ranks()
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(printable, chars)}

    def spell(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    def split(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return parts
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    vocab = {spell(tok): r for tok, r in ranks.items()}
    vocab[ENDOFTEXT] = EOS
    merges = ["#version: 0.2"]
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            pair = split(tok, r)
            assert len(pair) == 2, (tok, pair)
            merges.append(f"{spell(pair[0])} {spell(pair[1])}")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n")


def make_weights(preset: str, out_dir: Path) -> str:
    """Random GPT-2 weights of `preset` as an HF dir (config.json with n_ctx, model.safetensors,
    vocab.json, merges.txt). Made with transformers when it is installed, else numpy (same names,
    same std-0.02 init). Returns who made them."""
    from pgpt_jax.config import GPTConfig

    cfg = GPTConfig.preset(preset)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if has("torch") and has("transformers"):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                        n_positions=cfg.n_positions, vocab_size=cfg.vocab_size))
        hf.save_pretrained(tmp, safe_serialization=True)
        import transformers

        made_by = f"transformers {transformers.__version__}"
    else:
        import numpy as np
        from safetensors.numpy import save_file

        rng = np.random.default_rng(0)
        d, f32 = cfg.n_embd, np.float32

        def normal(*shape):
            return (0.02 * rng.standard_normal(shape)).astype(f32)

        t = {"transformer.wte.weight": normal(cfg.vocab_size, d), "transformer.wpe.weight": normal(cfg.n_positions, d),
             "transformer.ln_f.weight": np.ones(d, f32), "transformer.ln_f.bias": np.zeros(d, f32)}
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                t[p + ln + ".weight"], t[p + ln + ".bias"] = np.ones(d, f32), np.zeros(d, f32)
            for name, (n_in, n_out) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
                                        "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}.items():
                t[p + name + ".weight"], t[p + name + ".bias"] = normal(n_in, n_out), np.zeros(n_out, f32)
        save_file(t, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.n_positions,
            "vocab_size": cfg.vocab_size, "layer_norm_epsilon": 1e-5, "bos_token_id": EOS, "eos_token_id": EOS,
            "tie_word_embeddings": True}, indent=2))
        made_by = f"numpy {np.__version__} (transformers not installed)"
    conf = json.loads((tmp / "config.json").read_text())
    conf["n_ctx"] = conf["n_positions"]  # llama.cpp's GPT-2 converter reads n_ctx; transformers 5 omits it
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    gpt2_tokenizer_files(tmp)
    (tmp / "MADE_BY").write_text(made_by + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return made_by


def llama_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py (with its conversion/ and gguf-py/ beside it) from the sdist of the
    installed llama-cpp-python version, fetched once with pip."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    dst = work / f"llama.cpp-{ver}"
    script = dst / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    sdist_dir = work / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.exists():
        log(f"fetching the llama-cpp-python {ver} sdist (for its GGUF converter) with pip download ...")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(sdist_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                try:
                    tar.extract(m, tmp, filter="data")
                except TypeError:  # Python without tarfile filters (before 3.10.12 / 3.11.4)
                    tar.extract(m, tmp)
    tmp.rename(dst)
    return script


def make_gguf(work: Path, weights: Path, outtype: str) -> Path:
    out = weights.with_name(f"{weights.name}-{outtype}.gguf")
    if out.exists():
        return out
    script = llama_converter(work)
    log(f"converting {weights.name} to GGUF {outtype} with {script.parent.name}/{script.name} ...")
    tmp = out.with_name(out.name + ".tmp")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py beside the script
    res = subprocess.run([sys.executable, str(script), str(weights), "--outtype", outtype, "--outfile", str(tmp)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed:\n{res.stderr[-3000:]}")
    tmp.rename(out)
    return out


# ============================================================================ workload


def word_prompts(n: int, prompt_tokens: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """n prompts of exactly `prompt_tokens` GPT-2 tokens, as ids and as text that encodes to them:
    words that are one token each (" word"), so the text round-trips through any GPT-2 BPE."""
    import random

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


# ============================================================================ workers (one process per system)


class PgptRunner:
    def __init__(self, a):
        import pgpt_jax  # noqa: F401  (sets XLA:CPU flags before jax starts)
        from pgpt_jax.checkpoint import load_model

        self.model = load_model(a.weights)  # float32, as the HF dir's dtype

    def run(self, prompts, new_tokens, mode, seed):
        import pgpt_jax
        from pgpt_jax.generate import engine_for

        engine = engine_for(self.model, len(prompts))  # the engine generate() uses for this many slots
        compiled = engine.compile_count
        choices = pgpt_jax.generate(self.model, prompts, max_tokens=new_tokens, logit_bias={EOS: -100.0},
                                    seed=seed, slots=len(prompts), **MODES[mode])
        self.compiles = engine.compile_count - compiled
        return sum(len(c[0].token_ids) for c in choices)


class HFRunner:
    def __init__(self, a):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        torch.set_num_threads(a.threads)
        self.model = GPT2LMHeadModel.from_pretrained(a.weights, dtype=getattr(torch, a.dtype)).eval()

    def run(self, prompts, new_tokens, mode, seed):
        torch = self.torch
        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=EOS,  # min_new: EOS banned
                  attention_mask=torch.ones_like(ids))
        if mode == "greedy":
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, top_p=TOP_P, top_k=0, temperature=1.0)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(ids, **kw)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]


class LlamaRunner:
    def __init__(self, a):
        from llama_cpp import Llama

        self.llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.n_ctx,
                         logits_all=False, verbose=False, seed=0)

    def run(self, prompts, new_tokens, mode, seed):
        assert len(prompts) == 1, "llama-cpp-python's Llama decodes one sequence"
        self.llm.reset()  # no prompt-prefix reuse between runs
        m = MODES[mode]
        out = self.llm.create_completion(prompt=prompts[0], max_tokens=new_tokens, temperature=m["temperature"],
                                         top_p=m["top_p"], top_k=0, min_p=0.0, repeat_penalty=1.0,
                                         logit_bias={EOS: -100.0}, seed=seed)
        return out["usage"]["completion_tokens"]


def roofline_measure(threads: int) -> dict:
    """Memory read bandwidth and peak fp32 GEMM FLOP/s: the best of several runs, each of several
    libraries (whichever reaches the hardware best on this machine)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    res: dict = {}
    x = np.ones(1 << 28, np.float32)  # 1 GiB
    chunks = np.array_split(x, threads)
    pool = ThreadPoolExecutor(threads)
    best = 1e9
    for _ in range(7):  # numpy reductions release the GIL: one thread per core, one chunk each
        t0 = time.perf_counter()
        sum(pool.map(np.sum, chunks))
        best = min(best, time.perf_counter() - t0)
    pool.shutdown()
    res["bw_numpy_gbs"] = round(x.nbytes / best / 1e9, 2)
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    best = 1e9
    for _ in range(7):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    res["gemm_numpy_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    try:
        import jax
        import jax.numpy as jnp

        import pgpt_jax  # noqa: F401  (the XLA:CPU flags the package runs with)

        xj = jnp.ones(1 << 28, jnp.float32)
        total = jax.jit(jnp.sum)
        total(xj).block_until_ready()
        best = 1e9
        for _ in range(7):
            t0 = time.perf_counter()
            total(xj).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        res["bw_jax_gbs"] = round(xj.nbytes / best / 1e9, 2)
        del xj
        aj = jnp.asarray(a)
        mm = jax.jit(jnp.matmul)
        mm(aj, aj).block_until_ready()
        best = 1e9
        for _ in range(7):
            t0 = time.perf_counter()
            mm(aj, aj).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        res["gemm_jax_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    except Exception as e:  # noqa: BLE001  (a library that fails here just doesn't count)
        res["jax_error"] = repr(e)[:200]
    if has("torch"):
        import torch

        torch.set_num_threads(threads)
        xt = torch.from_numpy(x)
        best = 1e9
        for _ in range(7):
            t0 = time.perf_counter()
            xt.sum()
            best = min(best, time.perf_counter() - t0)
        res["bw_torch_gbs"] = round(x.nbytes / best / 1e9, 2)
        at = torch.from_numpy(a)
        torch.mm(at, at)
        best = 1e9
        for _ in range(7):
            t0 = time.perf_counter()
            torch.mm(at, at)
            best = min(best, time.perf_counter() - t0)
        res["gemm_torch_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    res["bw_gbs"] = max(v for k, v in res.items() if k.startswith("bw_"))
    res["peak_gflops"] = max(v for k, v in res.items() if k.startswith("gemm_"))
    return res


RUNNERS = {"pgpt": PgptRunner, "hf": HFRunner, "llama": LlamaRunner}


def worker_main(a) -> None:
    """A worker: builds its runner, then answers one JSON command per stdin line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever libraries print must not mix with the protocol

    def say(**msg):
        out.write(PROTO + json.dumps(msg) + "\n")
        out.flush()

    try:
        if a.worker == "roofline":
            say(ok=True, result=roofline_measure(a.threads))
            return
        t0 = time.perf_counter()
        runner = RUNNERS[a.worker](a)
        say(ok=True, ready_s=round(time.perf_counter() - t0, 2))
    except Exception as e:  # noqa: BLE001
        say(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            return
        try:
            t0 = time.perf_counter()
            tokens = runner.run(cmd["prompts"], cmd["new_tokens"], cmd["mode"], cmd["seed"])
            dt = time.perf_counter() - t0
            extra = {"compiles": runner.compiles} if hasattr(runner, "compiles") else {}
            say(ok=True, tokens=tokens, seconds=round(dt, 4), tok_s=round(tokens / dt, 2), **extra)
        except Exception as e:  # noqa: BLE001
            say(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])


class Worker:
    """The driver's handle on a worker process: ask() sends one command and waits for its answer."""

    def __init__(self, name: str, argv: list[str], log_path: Path, timeout: float):
        self.name, self.timeout = name, timeout
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                self.lines.put(json.loads(line[len(PROTO):]))
        self.lines.put({"ok": False, "error": f"worker exited (code {self.proc.wait()}); see {self.log.name}"})

    def answer(self) -> dict:
        try:
            return self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            return {"ok": False, "error": f"no answer in {self.timeout:.0f} s; see {self.log.name}"}

    def ask(self, **cmd) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"worker is gone; see {self.log.name}"}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ============================================================================ servers


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


def start_server(system: str, a, port: int, weights: Path, gguf: dict, log_path: Path) -> tuple:
    logf = open(log_path, "a")
    if system == "pgpt":
        cmd = [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", str(weights), "--port", str(port),
               "--slots", str(max(a.concurrency)), "--served-model-name", system]
        ready = f"http://127.0.0.1:{port}/health"
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf[system]), "--model_alias", system,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(a.threads),
               "--n_threads_batch", str(a.threads), "--n_ctx", str(a.n_ctx), "--interrupt_requests", "False"]
        ready = f"http://127.0.0.1:{port}/v1/models"
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, logf, ready


async def drive(base_url: str, model: str, concurrency: int, bodies: list[dict]) -> dict:
    """bench_serving's closed loop (its client and report), over ready-made request bodies."""
    import httpx

    sys.path.insert(0, str(SCRIPTS))
    import bench_serving as bs

    url = base_url + "/completions"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        warm = await bs._one_http(client, url, {**bodies[0], "max_tokens": 4}, {})
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        records: list = []
        todo = iter(bodies)

        async def worker() -> None:
            for b in todo:
                records.append(await bs._one_http(client, url, b, {}))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    return bs.report(records, duration, base_url=base_url, model=model, concurrency=concurrency,
                     num_requests=len(bodies))


# ============================================================================ the run


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")  # one run per file: medians never mix two runs

    def add(self, **row) -> dict:
        # The 1-minute load average says when another process shared the cores during a figure.
        row.setdefault("load1", round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        self.rows.append(row)
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        return row

    def skip(self, what: str, why: str) -> None:
        log(f"SKIPPED {what}: {why}")
        self.add(kind="skip", what=what, why=why)


def cpu_flags() -> list[str]:
    """The SIMD/matrix features that decide CPU matmul speed (Linux; empty elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def simd(flags) -> str:
    """The widest vector/matrix unit, in words: "AMX", "AVX-512 BF16", "AVX-512", "AVX2", ..."""
    flags = set(flags or ())
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return "flags unknown"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    family = model = None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and cpu == (platform.processor() or platform.machine()):
                cpu = val
            elif key == "cpu family" and family is None:
                family = val
            elif key == "model" and model is None:
                model = val
            if family and model and key == "flags":
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("pgpt-jax", "jax", "jaxlib", "flax", "numpy", "torch", "transformers", "llama-cpp-python"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpu_family_model": f"{family}/{model}", "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(), "mem_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def run(a) -> Path:
    work = Path(a.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = Path(a.out) if a.out else work / f"results-{stamp}.jsonl"
    R = Results(out_path)
    t_start = time.time()
    from pgpt_jax.config import GPTConfig

    cfg = GPTConfig.preset(a.preset)
    a.n_ctx = min(1024, cfg.n_positions)
    R.add(kind="meta", date=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
          preset=a.preset, rounds=a.rounds, new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens,
          batches=a.batches, modes=a.modes, concurrency=a.concurrency, serving_output_tokens=a.output_tokens,
          requests_per_stream=a.requests_per_stream, threads=a.threads, quick=a.quick, **machine())
    log(f"results -> {out_path}")

    # ---- artifacts
    weights = work / f"weights-{a.preset}"
    if not (weights / "MADE_BY").exists():
        log(f"making random {a.preset} weights in {weights} ...")
        make_weights(a.preset, weights)
    made_by = (weights / "MADE_BY").read_text().strip()
    n_params = _count_safetensors(weights / "model.safetensors")
    log(f"weights: {weights} ({n_params / 1e6:.1f}M params, made by {made_by})")
    R.add(kind="weights", path=str(weights), made_by=made_by, params=n_params, weight_bytes_fp32=4 * n_params)

    have_torch = has("torch") and has("transformers")
    have_llama = has("llama_cpp")
    systems = [s for s in a.systems if s in ENGINE_SYSTEMS]
    flags = cpu_flags()
    if a.systems_default and "hf-bfloat16" in systems and flags and not {"avx512_bf16", "amx_bf16"} & set(flags):
        # Without native bf16, torch emulates it: 1.7 tok/s at batch 1 on a Zen 3 (AVX2), 10x below
        # its float32, and the full grid would take over an hour.
        R.skip("hf-bfloat16", "this CPU has no native bf16 (avx512_bf16/amx_bf16), torch emulates it at a "
               "fraction of its float32 speed; name it in --systems to run it anyway")
        systems.remove("hf-bfloat16")
    if not have_torch:
        for s in [s for s in systems if s.startswith("hf-")]:
            R.skip(s, "torch/transformers not installed (pip install -e '.[compare]')")
            systems.remove(s)
    gguf: dict = {}
    for s in [s for s in systems if s.startswith("llama-")]:
        why = None if have_llama else "llama-cpp-python not installed (pip install -e '.[compare]')"
        if why is None and not have_torch:
            why = "the GGUF converter needs torch and transformers (pip install -e '.[compare]')"
        if why is None and not has("yaml"):
            why = "the GGUF converter needs PyYAML (pip install -e '.[compare]')"
        if why is None:
            try:
                gguf[s] = make_gguf(work, weights, s.split("-")[1])
            except Exception as e:  # noqa: BLE001
                why = f"GGUF conversion failed: {e}"
        if why:
            R.skip(s, why)
            systems.remove(s)

    # ---- roofline: measured first and last; the summary takes the best of the two, so a
    # moment of contention lowers neither bound
    def roofline(when: str) -> None:
        log(f"roofline ({when}): memory bandwidth and peak GEMM ...")
        w = Worker("roofline", ["--worker", "roofline", "--threads", str(a.threads)], logs / "roofline.log", 600)
        ans = w.answer()
        w.close()
        if ans.get("ok"):
            r = ans["result"]
            bound = {b: round(roofline_bound(b, r["bw_gbs"], r["peak_gflops"], n_params), 1)
                     for b in sorted(set(a.batches) | {1})}
            R.add(kind="roofline", when=when, params=n_params, weight_bytes=4 * n_params, bound_tok_s=bound, **r)
            log(f"roofline: {r['bw_gbs']} GB/s, {r['peak_gflops']} GFLOP/s -> decode bound {bound} tok/s")
        else:
            R.add(kind="error", phase="roofline", error=ans.get("error"))
            log(f"roofline failed: {ans.get('error')}")

    if "roofline" in a.phases:
        roofline("start")

    # ---- engine level
    if "engine" in a.phases and systems:
        engine_phase(a, R, systems, weights, gguf, logs)

    # ---- serving level
    if "serving" in a.phases:
        srv = [s for s in a.systems if s in SERVING_SYSTEMS and (s == "pgpt" or s in gguf)]
        if not has("httpx"):
            R.skip("serving", "httpx not installed (pip install -e '.[compare]')")
        elif srv:
            serving_phase(a, R, srv, weights, gguf, logs)

    if "roofline" in a.phases:
        roofline("end")
    R.add(kind="done", wall_s=round(time.time() - t_start, 1))
    R.f.close()
    log(f"done in {(time.time() - t_start) / 60:.1f} min; results in {out_path}")
    return out_path


def _count_safetensors(path: Path) -> int:
    """Parameters in a safetensors file, from its header (tied lm_head stored once)."""
    import math
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"
               and not k.endswith((".attn.bias", ".attn.masked_bias")))


def roofline_bound(batch: float, bw_gbs: float, peak_gflops: float, params: int, bytes_per_param: int = 4) -> float:
    """Decode tokens/s at `batch` rows: each step reads every weight once and each token costs
    2 FLOPs per parameter, so min(B * BW / weight_bytes, PEAK / (2 * params))."""
    return min(batch * bw_gbs * 1e9 / (bytes_per_param * params), peak_gflops * 1e9 / (2 * params))


def engine_phase(a, R: Results, systems: list[str], weights: Path, gguf: dict, logs: Path) -> None:
    plan = {s: [b for b in a.batches if not s.startswith("llama-") or b == 1] for s in systems}
    for s in systems:
        if not plan[s]:
            R.skip(f"engine:{s}", "its Python API decodes batch 1 only and --batches has no 1")
    systems = [s for s in systems if plan[s]]
    workers: dict[str, Worker] = {}
    for s in systems:
        argv = ["--worker", s.split("-")[0], "--weights", str(weights), "--threads", str(a.threads)]
        if s.startswith("hf-"):
            argv += ["--dtype", s.split("-")[1]]
        if s.startswith("llama-"):
            argv += ["--gguf", str(gguf[s]), "--n-ctx", str(a.n_ctx)]
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
                    for n in ([a.new_tokens] if s == "pgpt" else []) + [min(8, a.new_tokens)]:
                        ans = w.ask(prompts=ids, new_tokens=n, mode="greedy", seed=0)
                        R.add(kind="engine_warmup", system=s, batch=b, **{k: v for k, v in ans.items() if k != "ok"})
        for rnd in range(a.rounds):
            for b in a.batches:
                ids, _ = word_prompts(b, a.prompt_tokens, seed=rnd * 1000 + b)
                for mode in a.modes:
                    order = [s for s in workers if b in plan[s]]
                    if rnd % 2:
                        order.reverse()  # A B C, C B A, ...: no system always runs right after another
                    for s in order:
                        ans = workers[s].ask(prompts=ids, new_tokens=a.new_tokens, mode=mode, seed=rnd)
                        if ans.get("ok"):
                            R.add(kind="engine", system=s, batch=b, mode=mode, round=rnd, new_tokens=a.new_tokens,
                                  prompt_tokens=a.prompt_tokens, **{k: v for k, v in ans.items() if k != "ok"})
                            log(f"engine r{rnd} batch {b:>3} {mode:<6} {LABELS[s]:<22} {ans['tok_s']:>8.1f} tok/s"
                                + ("" if ans["tokens"] == b * a.new_tokens else f"  ({ans['tokens']} tokens!)")
                                + (f"  (compiled {ans['compiles']} programs while timed!)" if ans.get("compiles") else ""))
                        else:
                            R.add(kind="error", phase="engine", system=s, batch=b, mode=mode, round=rnd,
                                  error=ans.get("error"), trace=ans.get("trace"))
                            log(f"engine r{rnd} batch {b} {mode} {s}: {ans.get('error')}")
    finally:
        for w in workers.values():
            w.close()


def serving_phase(a, R: Results, systems: list[str], weights: Path, gguf: dict, logs: Path) -> None:
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
            except RuntimeError as e:
                R.add(kind="error", phase="serving", system=s, error=f"{e}; see {logf.name}")
                log(f"serving: {s} did not start: {e}; see {logf.name}")
                proc.kill()
                del procs[s]
        prompts_n = max(max(2, a.requests_per_stream * c) for c in a.concurrency)
        _, texts = word_prompts(prompts_n, a.prompt_tokens, seed=7)

        def bodies(s: str, n: int, rnd: int) -> list[dict]:
            out = []
            for i in range(n):
                b = {"model": s, "prompt": texts[i], "max_tokens": a.output_tokens, "temperature": 1.0,
                     "top_p": 1.0, "stream": True, "stream_options": {"include_usage": True},
                     "logit_bias": {str(EOS): -100}, "seed": rnd * 1000 + i}
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
                order = list(procs)
                if rnd % 2:
                    order.reverse()
                for s in order:
                    try:
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
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logf.close()


# ============================================================================ summary and plots


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Medians over rounds: engine[(system, batch, mode)] = tok/s; serving[(system, C)] = {...}."""
    eng: dict = {}
    for r in rows:
        if r.get("kind") == "engine":
            eng.setdefault((r["system"], r["batch"], r["mode"]), []).append(r["tok_s"])
    srv: dict = {}
    for r in rows:
        if r.get("kind") == "serving":
            srv.setdefault((r["system"], r["concurrency"]), []).append(r)
    serving = {}
    for key, rs in srv.items():
        serving[key] = {"output_tokens_per_s": _median([r["output_tokens_per_s"] for r in rs]), "n": len(rs)}
        for m in ("ttft_ms", "tpot_ms"):
            serving[key][m] = {p: _median([r[m][p] for r in rs]) for p in ("p50", "p90", "p99")}
    roofs = [r for r in rows if r.get("kind") == "roofline"]
    roof = None
    if roofs:  # the best bandwidth and the best GEMM over the samples (start and end of the run)
        roof = dict(roofs[0], bw_gbs=max(r["bw_gbs"] for r in roofs),
                    peak_gflops=max(r["peak_gflops"] for r in roofs), samples=len(roofs))
        roof["bound_tok_s"] = {b: round(roofline_bound(int(b), roof["bw_gbs"], roof["peak_gflops"], roof["params"]), 1)
                               for b in roofs[0]["bound_tok_s"]}
    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    return {"engine": {k: _median(v) for k, v in eng.items()}, "engine_n": {k: len(v) for k, v in eng.items()},
            "serving": serving, "roofline": roof, "meta": meta,
            "weights": next((r for r in rows if r.get("kind") == "weights"), None),
            "measurements": [r for r in rows if r.get("kind") in ("engine", "serving")],
            "skips": [r for r in rows if r.get("kind") == "skip"],
            "errors": [r for r in rows if r.get("kind") == "error"]}


def _ratio(x, y) -> float | None:
    return round(x / y, 2) if x and y else None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def print_summary(S: dict) -> list[str]:
    lines = []
    meta, roof = S["meta"], S["roofline"]
    lines.append(f"# {meta.get('date', '?')}  {meta.get('cpu', '?')} (family/model {meta.get('cpu_family_model')}, "
                 f"{simd(meta.get('cpu_flags'))}), {meta.get('cores', '?')} cores, "
                 f"{meta.get('mem_gib', '?')} GiB; preset {meta.get('preset')}, float32 unless named; "
                 f"medians of {meta.get('rounds')} round(s); load average at start {meta.get('load1')}")
    loads = [r["load1"] for r in S["measurements"] if r.get("load1") is not None]
    if loads and max(loads) > 0.5 * (meta.get("cores") or 1) + 1:
        lines.append(f"WARNING: 1-minute load average reached {max(loads)} during the run: another process "
                     "shared the cores (llama.cpp's spinning thread barrier suffers most); rerun on a quiet machine")
    if roof:
        lines.append(f"roofline: {roof['bw_gbs']} GB/s read, {roof['peak_gflops']} GFLOP/s fp32 GEMM, "
                     f"{roof['params'] / 1e6:.1f}M params ({roof['weight_bytes'] / 1e6:.0f} MB fp32): "
                     "bound min(B*BW/W, PEAK/(2P)) = "
                     + ", ".join(f"B={b}: {v}" for b, v in roof["bound_tok_s"].items()) + " tok/s")
    eng = S["engine"]
    if eng:
        systems = [s for s in ENGINE_SYSTEMS if any(k[0] == s for k in eng)]
        head = ["batch", "mode"] + [LABELS[s] for s in systems] + ["roofline", "vs HF fp32", "vs llama f32"]
        lines.append("")
        lines.append("engine, generated tokens/s (" + f"{meta.get('prompt_tokens')}-token prompts, "
                     f"{meta.get('new_tokens')} new tokens, EOS banned, prefill included)")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for b in sorted({k[1] for k in eng}):
            for mode in ("greedy", "top_p"):
                if not any(k[1] == b and k[2] == mode for k in eng):
                    continue
                vals = [eng.get((s, b, mode)) for s in systems]
                ours = eng.get(("pgpt", b, mode))
                bound = roof["bound_tok_s"].get(str(b), roof["bound_tok_s"].get(b)) if roof else None
                lines.append("| " + " | ".join([str(b), mode if mode == "greedy" else f"top_p {TOP_P}"]
                                               + [f"{v:.1f}" if v else "-" for v in vals]
                                               + [f"{bound}" if bound else "-",
                                                  _x(_ratio(ours, eng.get(("hf-float32", b, mode)))),
                                                  _x(_ratio(ours, eng.get(("llama-f32", b, mode))))]) + " |")
    srv = S["serving"]
    if srv:
        lines.append("")
        lines.append(f"serving, closed loop, {meta.get('prompt_tokens')}-token prompts, "
                     f"{meta.get('serving_output_tokens')} output tokens a request")
        head = ["C", "system", "output tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "vs llama f32"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for c in sorted({k[1] for k in srv}):
            for s in SERVING_SYSTEMS:
                v = srv.get((s, c))
                if not v:
                    continue
                ll = srv.get(("llama-f32", c))
                lines.append("| " + " | ".join([
                    str(c), LABELS[s], f"{v['output_tokens_per_s']:.1f}",
                    " / ".join(f"{v['ttft_ms'][p]:.0f}" for p in ("p50", "p90", "p99")),
                    " / ".join(f"{v['tpot_ms'][p]:.1f}" for p in ("p50", "p90", "p99")),
                    _x(_ratio(v["output_tokens_per_s"], ll and ll["output_tokens_per_s"]))]) + " |")
    # The targets, from this run's ratios.
    lines.append("")
    lines.append("targets (2-core CPU, float32, ratios from this run):")

    def target(name, value, goal, fmt="{:.2f}x"):
        got = "n/a (not measured)" if value is None else fmt.format(value)
        ok = "" if value is None else (" MET" if value >= goal else " MISSED")
        lines.append(f"  {name}: {got} (target >= {fmt.format(goal)}){ok}")

    target("batch-1 greedy decode vs llama.cpp f32", _ratio(eng.get(("pgpt", 1, "greedy")),
                                                            eng.get(("llama-f32", 1, "greedy"))), 1.0)
    target("batch-32 greedy decode vs HF transformers fp32", _ratio(eng.get(("pgpt", 32, "greedy")),
                                                                   eng.get(("hf-float32", 32, "greedy"))), 3.0)
    p32, l32, p1 = srv.get(("pgpt", 32)), srv.get(("llama-f32", 32)), srv.get(("pgpt", 1))
    target("serving at 32 streams vs llama.cpp server f32, output tok/s",
           _ratio(p32 and p32["output_tokens_per_s"], l32 and l32["output_tokens_per_s"]), 5.0)
    tp = _ratio(p32 and p32["tpot_ms"]["p50"], p1 and p1["tpot_ms"]["p50"])
    lines.append("  pgpt-jax p50 TPOT at 32 streams / at 1: "
                 + ("n/a (not measured)" if tp is None else
                    f"{p32['tpot_ms']['p50']:.1f} / {p1['tpot_ms']['p50']:.1f} ms = {tp:.2f}x (target <= 2.00x)"
                    + (" MET" if tp <= 2 else " MISSED")))
    for r in S["skips"]:
        lines.append(f"skipped {r['what']}: {r['why']}")
    for r in S["errors"]:
        lines.append(f"error in {r.get('phase')} {r.get('system', '')}: {str(r.get('error'))[:300]}")
    print("\n".join(lines), flush=True)
    return lines


def plot(S: dict, out_dir: Path) -> list[Path]:
    """docs-style PNGs: decode tokens/s vs batch with the roofline, and serving vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")  # minor ticks: 2s and 5s

    def log_axes(ax, xs) -> None:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)

    out_dir.mkdir(parents=True, exist_ok=True)
    meta, roof, eng, srv = S["meta"], S["roofline"], S["engine"], S["serving"]
    where = (f"{meta.get('cpu', '?')} ({simd(meta.get('cpu_flags'))}), {meta.get('cores', '?')} cores, "
             f"{str(meta.get('date', '?'))[:10]}"
             + (" (--quick smoke run)" if meta.get("quick") else ""))
    params = (S.get("weights") or {}).get("params")
    model = f"GPT-2 (preset {meta.get('preset')}" + (f", {params / 1e6:.0f}M params)" if params else ")")
    paths = []
    if eng or roof:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        batches = sorted({k[1] for k in eng} | set(meta.get("batches") or []))
        for s in ENGINE_SYSTEMS:
            for mode, style in (("greedy", "-"), ("top_p", "--")):
                pts = sorted((b, v) for (sys_, b, m), v in eng.items() if sys_ == s and m == mode and v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o" if mode == "greedy" else "s",
                            color=COLORS[s], label=f"{LABELS[s]}, {'greedy' if mode == 'greedy' else f'top_p {TOP_P}'}")
        if roof and batches:
            import numpy as np

            xs = np.geomspace(min(batches), max(batches), 100)
            ax.plot(xs, [roofline_bound(x, roof["bw_gbs"], roof["peak_gflops"], roof["params"]) for x in xs], "k-",
                    lw=2, alpha=0.6, label=f"roofline fp32: min(B·{roof['bw_gbs']:.0f} GB/s / "
                                           f"{roof['weight_bytes'] / 1e6:.0f} MB, {roof['peak_gflops']:.0f} GFLOP/s"
                                           f" / (2·{roof['params'] / 1e6:.0f}M))")
            ax.plot(xs, [roofline_bound(x, roof["bw_gbs"], roof["peak_gflops"], roof["params"], 2) for x in xs],
                    "k--", lw=1, alpha=0.4, label="roofline with 2-byte (f16) weights, for llama.cpp f16")
        log_axes(ax, batches)
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_ylabel("generated tokens/s (prefill included)")
        ax.set_title(f"{model} decode: {meta.get('prompt_tokens')}-token prompt, "
                     f"{meta.get('new_tokens')} new tokens, EOS banned\n{where}", fontsize=10)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        p = out_dir / "compare_decode.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    if srv:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
        conc = sorted({k[1] for k in srv})
        for s in SERVING_SYSTEMS:
            pts = [(c, srv[(s, c)]) for c in conc if (s, c) in srv]
            if not pts:
                continue
            cs = [c for c, _ in pts]
            axes[0].plot(cs, [v["output_tokens_per_s"] for _, v in pts], "-o", color=COLORS[s], label=LABELS[s])
            for ax, m in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
                p50 = [v[m]["p50"] for _, v in pts]
                ax.plot(cs, p50, "-o", color=COLORS[s], label=f"{LABELS[s]} p50")
                ax.plot(cs, [v[m]["p90"] for _, v in pts], "--", color=COLORS[s], alpha=0.7, label=f"{LABELS[s]} p90")
                ax.plot(cs, [v[m]["p99"] for _, v in pts], ":", color=COLORS[s], alpha=0.7, label=f"{LABELS[s]} p99")
        for ax, ylabel in zip(axes, ("output tokens/s (all streams)", "time to first token (ms)",
                                     "time per output token (ms)")):
            log_axes(ax, conc)
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
        axes[2].legend(fontsize=6.5)
        fig.suptitle(f"{model} serving (OpenAI Completions, streaming, closed loop): "
                     f"{meta.get('prompt_tokens')}-token prompts, {meta.get('serving_output_tokens')} output "
                     f"tokens a request\n{where}", fontsize=10)
        fig.tight_layout()
        p = out_dir / "compare_serving.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def report_and_plot(results: Path, plots_dir: Path) -> None:
    S = summarize(load_rows(results))
    print_summary(S)
    if not has("matplotlib"):
        log("SKIPPED plots: matplotlib not installed (pip install -e '.[compare]')")
        return
    for p in plot(S, plots_dir):
        log(f"plot: {p}")


# ============================================================================ CLI


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(allowed):
    def parse(s: str) -> list[str]:
        names = [x for x in s.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="~/.cache/pgpt-jax-compare", help="cache of weights, GGUF files, logs")
    p.add_argument("--out", default=None, help="JSON lines of every measurement, overwritten (default: WORK_DIR/results-<time>.jsonl)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: docs/, or WORK_DIR with --quick)")
    p.add_argument("--plot-only", metavar="RESULTS", default=None, help="summarize and plot a finished run's JSON lines")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 16 new tokens, batches 1,8, concurrency 1,4, 16 output tokens")
    p.add_argument("--preset", default="gpt2", help="model shapes (gpt2 = 124M; tiny for a fast check)")
    p.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']} (--quick: {QUICK['rounds']})")
    p.add_argument("--batches", type=_ints, default=None, help="default 1,8,32 (--quick: 1,8)")
    p.add_argument("--modes", type=_names(MODES), default=list(MODES))
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=_ints, default=None, help="default 1,8,32 (--quick: 1,4)")
    p.add_argument("--output-tokens", type=int, default=None, help="serving: output tokens a request; default 64 (--quick: 16)")
    p.add_argument("--requests-per-stream", type=int, default=1,
                   help="serving: requests per concurrent stream (at least 2 requests a point)")
    p.add_argument("--systems", type=_names(ENGINE_SYSTEMS), default=None,
                   help=f"default: {','.join(ENGINE_SYSTEMS)} (hf-bfloat16 only where the CPU has native bf16)")
    p.add_argument("--phases", type=_names(("roofline", "engine", "serving")), default=["roofline", "engine", "serving"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and llama.cpp")
    p.add_argument("--port", type=int, default=8790, help="first of the servers' ports")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a worker or server may take to answer")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--n-ctx", type=int, default=1024, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))  # pgpt_jax from this checkout when it is not installed
    if a.worker:
        worker_main(a)
        return
    if a.plot_only:
        report_and_plot(Path(a.plot_only), Path(a.plots_dir or REPO / "docs"))
        return
    a.systems_default = a.systems is None
    a.systems = a.systems or list(ENGINE_SYSTEMS)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:  # flags given explicitly win over --quick
            setattr(a, k, v)
    plots_dir = Path(a.plots_dir) if a.plots_dir else (Path(a.work_dir).expanduser() if a.quick else REPO / "docs")
    results = run(a)
    report_and_plot(results, plots_dir)


if __name__ == "__main__":
    main()
