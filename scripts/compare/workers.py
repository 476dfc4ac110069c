"""One process per system: a runner per library (pgpt-jax, HF transformers, llama.cpp), and the
line protocol between a worker and the driver.

The driver starts `python scripts/compare --worker KIND ...`; the worker builds its runner
(loads, and for pgpt-jax later compiles, once) and says so on stdout, then answers one JSON
command per stdin line with one JSON line. Lines it sends start with PROTO; whatever a library
prints goes to stderr, the worker's log. The roofline worker measures once and exits.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from compare import MODES, PACKAGE, TOP_P

PROTO = "@@"  # worker -> driver lines start with this; anything else a library prints is ignored


class PgptRunner:
    def __init__(self, a):
        from pgpt_jax.checkpoint import load_model

        self.model = load_model(a.weights)  # float32, as the HF dir's dtype
        self.speculative = a.worker_speculative  # "ngram:K" for the pgpt-spec system, else None

    def run(self, prompts, new_tokens, mode, seed, eos) -> dict:
        from pgpt_jax.generate import engine_for, generate

        # the engine generate() uses for this many slots (and speculation)
        engine = engine_for(self.model, len(prompts), speculative=self.speculative)
        compiled, proposed, accepted = engine.compile_count, engine.spec_proposed_tokens, engine.spec_accepted_tokens
        choices = generate(self.model, prompts, max_tokens=new_tokens, logit_bias={eos: -100.0}, seed=seed,
                           slots=len(prompts), speculative=self.speculative, **MODES[mode])
        out = {"tokens": sum(len(c[0].token_ids) for c in choices), "compiles": engine.compile_count - compiled}
        if self.speculative:
            out.update(proposed=engine.spec_proposed_tokens - proposed, accepted=engine.spec_accepted_tokens - accepted)
        return out


class HFRunner:
    def __init__(self, a):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        torch.set_num_threads(a.threads)
        self.model = GPT2LMHeadModel.from_pretrained(a.weights, dtype=getattr(torch, a.dtype)).eval()

    def run(self, prompts, new_tokens, mode, seed, eos) -> dict:
        torch = self.torch
        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=eos,  # min_new: EOS banned
                  attention_mask=torch.ones_like(ids))
        if mode == "greedy":
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, top_p=TOP_P, top_k=0, temperature=1.0)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(ids, **kw)
        return {"tokens": (out.shape[1] - ids.shape[1]) * ids.shape[0]}


class LlamaRunner:
    def __init__(self, a):
        from llama_cpp import Llama

        self.llm = Llama(model_path=a.gguf, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.n_ctx,
                         logits_all=False, verbose=False, seed=0)

    def run(self, prompts, new_tokens, mode, seed, eos) -> dict:
        assert len(prompts) == 1, "llama-cpp-python's Llama decodes one sequence"
        self.llm.reset()  # no prompt-prefix reuse between runs
        m = MODES[mode]
        out = self.llm.create_completion(prompt=prompts[0], max_tokens=new_tokens, temperature=m["temperature"],
                                         top_p=m["top_p"], top_k=0, min_p=0.0, repeat_penalty=1.0,
                                         logit_bias={eos: -100.0}, seed=seed)
        return {"tokens": out["usage"]["completion_tokens"]}


RUNNERS = {"pgpt": PgptRunner, "hf": HFRunner, "llama": LlamaRunner}


def serve(a) -> None:
    """The worker's side: builds its runner, then answers one JSON command per stdin line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever libraries print must not mix with the protocol

    def say(**msg):
        out.write(PROTO + json.dumps(msg) + "\n")
        out.flush()

    def failed(e: Exception) -> None:
        say(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])

    try:
        if a.worker == "roofline":
            from compare import roofline

            say(ok=True, result=roofline.measure(a.threads))
            return
        t0 = time.perf_counter()
        runner = RUNNERS[a.worker](a)
        say(ok=True, ready_s=round(time.perf_counter() - t0, 2))
    except Exception as e:  # noqa: BLE001
        failed(e)
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            return
        try:
            t0 = time.perf_counter()
            res = runner.run(cmd["prompts"], cmd["new_tokens"], cmd["mode"], cmd["seed"], cmd["eos"])
            dt = time.perf_counter() - t0
            say(ok=True, seconds=round(dt, 4), tok_s=round(res["tokens"] / dt, 2), **res)
        except Exception as e:  # noqa: BLE001
            failed(e)


class Worker:
    """The driver's handle on a worker process: ask() sends one command and waits for its answer."""

    def __init__(self, name: str, argv: list[str], log_path: Path, timeout: float):
        self.name, self.timeout = name, timeout
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen([sys.executable, str(PACKAGE), *argv], stdin=subprocess.PIPE,
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
