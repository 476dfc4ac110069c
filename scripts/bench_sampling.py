"""Time the jitted sampling step alone, against a GPT-2 124M decode step at the same batch size.

    .venv/bin/python scripts/bench_sampling.py [--slots 1 8 32] [--iters 20] [--window 128]

For each S it measures one decode step (random-init GPT-2 124M, one new token a row, a
`window`-long cache, cache donated) and then `sampling.sample` at V=50304 (rows donated, as
the engine does) for greedy, temperature-only, top_p=0.9 and everything on (dense bias,
presence and frequency penalties over generated counts, top_p=0.9, 5 top logprobs). Nucleus
rows run on two kinds of logits: "peaked" (N(0, 6^2): the top-64 prefilter settles the
nucleus) and "flat" (the random-init model's own logits, std 0.55: the nucleus holds tens of
thousands of tokens, so it goes through rejection). Calls are timed round-robin, so load
from other processes hits all alike; medians over `iters` rounds; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pgpt_jax import sampling, xla_options  # noqa: E402
from pgpt_jax.model import forward, init_cache, init_model  # noqa: E402


def interleaved_ms(calls: dict, iters: int) -> dict:
    """Median ms of each call, timed round-robin so that all of them see the same load."""
    times = {name: [] for name in calls}
    for i in range(iters):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(i))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def decode_call(model, slots: int, window: int):
    """A jitted decode step (one token a row, cache donated) as call(i) -> logits [S, V]."""
    graphdef, state = nnx.split(model)

    def step(state, tokens, positions, cache):
        logits, cache = forward(nnx.merge(graphdef, state), tokens, positions, cache, window)
        return logits[:, 0], cache

    step = jax.jit(step, donate_argnums=(3,), compiler_options=xla_options.compiler_options())
    box = {"cache": init_cache(model.config, slots, window)}
    tokens = jnp.zeros((slots, 1), jnp.int32)

    def call(i):
        positions = jnp.full((slots, 1), i % window, jnp.int32)
        logits, box["cache"] = step(state, tokens, positions, box["cache"])
        return logits

    jax.block_until_ready(call(0))
    return call


def make_rows(slots: int, vocab: int, real_vocab: int, kind: str) -> sampling.SamplingRows:
    """Rows for one benchmark configuration; row s has seed s."""
    rows = sampling.init_rows(slots, vocab)
    keys = jnp.asarray(np.stack([sampling.row_key(s, 0) for s in range(slots)]))
    rows = dataclasses.replace(rows, key=keys)
    full = lambda v: jnp.full((slots,), v, jnp.float32)  # noqa: E731
    if kind == "greedy":
        return dataclasses.replace(rows, temperature=full(0.0))
    if kind == "temperature":
        return dataclasses.replace(rows, temperature=full(0.8))
    if kind == "top_p":
        return dataclasses.replace(rows, top_p=full(0.9))
    assert kind == "everything"
    rng = np.random.default_rng(0)
    bias = np.zeros((slots, vocab), np.float32)
    bias[:, rng.integers(0, real_vocab, 20)] = rng.uniform(-5, 5, 20)  # a few biased tokens
    counts = np.zeros((slots, vocab), np.int32)
    for s in range(slots):  # a hundred generated tokens per row
        np.add.at(counts[s], rng.integers(0, real_vocab, 100), 1)
    return dataclasses.replace(
        rows, top_p=full(0.9), presence=full(0.5), frequency=full(0.5),
        bias=jnp.asarray(bias), counts=jnp.asarray(counts),
        num_logprobs=jnp.full((slots,), 5, jnp.int32))


def sample_call(step, logits, rows):
    """The jitted sampling step as call(i) -> tokens; rows are donated and carried, as in
    the engine (counts grow by one token a step)."""
    slots = logits.shape[0]
    box = {"rows": rows}

    def call(i):
        positions = jnp.full((slots,), i, jnp.int32)
        tokens, *_, box["rows"] = step(logits, box["rows"], positions)
        return tokens

    jax.block_until_ready(call(0))
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args(argv)

    model = init_model("gpt2")
    cfg = model.config
    V = cfg.padded_vocab
    cases = [("greedy", "flat"), ("temperature", "flat"), ("top_p", "peaked"),
             ("top_p", "flat"), ("everything", "peaked"), ("everything", "flat")]
    # One program per shape: the configurations differ only in values.
    step = jax.jit(sampling.sample, donate_argnums=(1,), compiler_options=xla_options.compiler_options())
    results = {}
    for slots in args.slots:
        decode = decode_call(model, slots, args.window)
        flat = decode(0)  # the random-init model's own logits
        peaked = np.random.default_rng(1).normal(size=(slots, V)).astype(np.float32) * 6
        peaked[:, cfg.vocab_size:] = -np.inf
        logits = {"flat": flat, "peaked": jnp.asarray(peaked)}
        calls = {"decode": decode}
        for kind, which in cases:
            rows = make_rows(slots, V, cfg.vocab_size, kind)
            calls[kind, which] = sample_call(step, logits[which], rows)
        for name, ms in interleaved_ms(calls, args.iters).items():
            results[(slots,) + (name if isinstance(name, tuple) else (name,))] = ms
        print(f"S={slots}: decode {results[slots, 'decode']:.1f} ms", file=sys.stderr, flush=True)

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.machine()}, "
          f"{os.cpu_count()} cores; V={V}; decode window {args.window}; median of {args.iters}\n")
    head = "| step | logits | " + " | ".join(f"S={s} ms (x decode)" for s in args.slots) + " |"
    print(head)
    print("|" + "---|" * (2 + len(args.slots)))
    print("| GPT-2 124M decode step | - | "
          + " | ".join(f"{results[s, 'decode']:.1f}" for s in args.slots) + " |")
    for kind, which in cases:
        cells = [f"{results[s, kind, which]:.2f} "
                 f"({results[s, kind, which] / results[s, 'decode']:.1%})" for s in args.slots]
        print(f"| sample: {kind} | {which} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
