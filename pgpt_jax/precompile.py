"""Compiling the device programs before serving, and timing XLA:CPU's option sets on them.

`Executor.warmup` calls these so that serving compiles nothing (0 compiles after warm-up is a
test): `compile_programs` for the decode state's programs (`programs.py`), `compile_pool` and
`compile_chunks` for the prefix cache's and chunked prefill's (`pool_programs.py`). Prefill,
decode and the pool's programs are compiled ahead of time with the very arguments a call
passes, so the call finds the same executable, and not run; the cheap ones (insert,
start_row) run on zeros shaped and placed like their inputs. `time_option_sets` is what
`warmup.py` measures to pick an option set per row count (`xla_options.py`).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pgpt_jax import sampling
from pgpt_jax.pool_programs import empty_cache_program, extend, gather_blocks, save_blocks
from pgpt_jax.programs import (DecodeState, decode, forward, init_state, insert, no_masks, prefill, sample_next,
                               start_row, verify)
from pgpt_jax.xla_options import CPU_OPTION_SETS


def compile_programs(graphdef, params, head, state: DecodeState, *, prefills, decodes, steps: int,
                     row: sampling.SamplingRows, top_k: int, mesh=None, progress: bool = False,
                     on_program=None, verify_k: int = 0, verifies=()) -> None:
    """Compiles every program once per shape so that serving compiles nothing: prefill for each
    (rows, bucket) in `prefills`, with and without prompt logprobs, insert after each,
    start_row once, decode for each (rows, window) in `decodes` at `steps` (and
    at 1 when `steps` is more: the planner's short calls), and the one-step halves of a
    constrained decode (forward for each (rows, window), sample_next
    once per rows), and with `verify_k` (speculative decoding) verify of that many proposals
    for each (rows, window) in `verifies`. `state` is donated along the way: the caller makes a fresh one.
    `on_program(done, total)` is called after each program (the server's warm-up metric).

    Prefill and decode are compiled ahead of time (`lower(...).compile()`, with the very
    arguments a call passes, so the call finds the same executable) and not run: running
    them was most of a restart's warm-up once the persistent cache supplies the executables
    (a 1024-token prefill takes seconds on CPU). Insert and start_row are cheap and run, on
    zeros shaped and placed like prefill's outputs.
    """
    jobs = [("echo", *p) for p in prefills] + [("prefill", *p) for p in prefills]
    # Decode at `steps` tokens a call, and its two halves (what runs while a constrained row
    # needs its next mask from the token just sampled: planner.py), sample_next once per rows.
    # Decode at one step too when `steps` is more (the planner's short calls: planner._steps).
    jobs += [(kind, *d, n) for d in decodes for kind, n in
             [("decode", steps), ("forward", 1)] + ([("decode", 1)] if steps > 1 else [])]
    jobs += [("verify", *v, verify_k) for v in verifies] if verify_k else []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="warm-up (compiling)", unit="program")
    started, sampled = False, set()  # start_row compiles once (on insert's one row), sample_next per rows
    for done, (kind, rows, size, *n) in enumerate(jobs, start=1):
        if kind == "decode":
            decode.lower(graphdef, params, head, state, np.int32(size), steps=n[0], window=size, rows=rows,
                         top_k=top_k, mesh=mesh).compile()
        elif kind == "verify":
            verify.lower(graphdef, params, head, state, np.zeros((rows, n[0]), np.int32), np.zeros((rows,), np.int32),
                         window=size, rows=rows, top_k=top_k, mesh=mesh).compile()
        elif kind == "forward":
            compiled = forward.lower(graphdef, params, head, state, np.int32(size), window=size, rows=rows,
                                     mesh=mesh).compile()
            if rows not in sampled:
                sampled.add(rows)
                logits = zeros_like(compiled.out_info[1])
                sample_next.lower(state, logits, no_masks(rows, state), top_k=top_k, mesh=mesh).compile()
        else:
            # Host arrays, as the engine passes them: the same jit cache entries.
            compiled = prefill.lower(graphdef, params, head, np.zeros((rows, size), np.int32),
                                     np.ones((rows,), np.int32), np.zeros((2,), np.int32),
                                     want_logprobs=kind == "echo", top_k=top_k, mesh=mesh).compile()
            if kind == "prefill":  # the echo variant's cache has the same shape as the plain one's
                cache, last, *_ = zeros_like(compiled.out_info)
                state, last = insert(state, cache, last, np.int32(0), np.int32(0), mesh=mesh)
                if not started:
                    started = True
                    state, *_ = start_row(state, last, np.int32(0), np.int32(1), row, top_k=top_k, mesh=mesh)
        jax.block_until_ready(state.tokens)
        if bar is not None:
            bar.update(1)
        if on_program is not None:
            on_program(done, len(jobs))
    if bar is not None:
        bar.close()


def compile_pool(graphdef, params, head, pool, *, prefills, extends, mesh=None, on_program=None) -> None:
    """Compiles (ahead of time, without running them, as `compile_programs`) save_blocks
    for each (rows, T) prefill shape in `prefills` that holds a whole block, and gather_blocks
    + extend for each (rows, T, R) in `extends`. `on_program(done)` after each."""
    Q = pool[0][0].shape[2]
    done = 0
    for rows, size in prefills:
        if size >= Q:
            # A prefill's cache has the shape and sharding of a gather's of the same length.
            cache = zeros_like(gather_blocks.lower(pool, np.zeros((rows, size // Q), np.int32), length=size,
                                                    mesh=mesh).compile().out_info)
            save_blocks.lower(pool, cache, np.zeros((rows, size // Q), np.int32), mesh=mesh).compile()
        done += 1
        if on_program is not None:
            on_program(done)
    for rows, size, rest in extends:
        cache = zeros_like(gather_blocks.lower(pool, np.zeros((rows, size // Q), np.int32), length=size,
                                                mesh=mesh).compile().out_info)
        extend.lower(graphdef, params, head, cache, np.zeros((rows, rest), np.int32), np.zeros((rows,), np.int32),
                     np.ones((rows,), np.int32), mesh=mesh).compile()
        done += 1
        if on_program is not None:
            on_program(done)


def compile_chunks(graphdef, params, head, config, *, chunks, extends: bool = True, mesh=None,
                   on_program=None) -> None:
    """Compiles (ahead of time, as `compile_programs`) what a chunked prefill runs: empty_cache, and
    with `extends` the extend of one row, for each (T, C) in `chunks` (a cache of T tokens, C
    tokens a chunk; with a pool, `compile_pool`'s `extends` hold those, after gather_blocks:
    the same program). `on_program(done)` after each."""
    for done, (size, rest) in enumerate(chunks, start=1):
        cache = zeros_like(empty_cache_program.lower(config=config, rows=1, length=size, mesh=mesh).compile().out_info)
        if extends:
            extend.lower(graphdef, params, head, cache, np.zeros((1, rest), np.int32), np.zeros((1,), np.int32),
                         np.ones((1,), np.int32), mesh=mesh).compile()
        if on_program is not None:
            on_program(done)


def time_option_sets(graphdef, params, head, cfg, slots: int, *, rows: int, window: int, steps: int, top_k: int,
                     mesh=None, repeats: int = 3) -> dict[str, float]:
    """Seconds per decode call of `rows` rows compiled under each XLA:CPU option set (the
    fastest of `repeats` calls after the one that compiles), on fresh states."""
    times = {}
    for name in CPU_OPTION_SETS:
        fn, state, best = decode.with_options(name), init_state(cfg, slots, mesh), float("inf")
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            state, *outs = fn(graphdef, params, head, state, np.int32(window), steps=steps, window=window, rows=rows,
                              top_k=top_k, mesh=mesh)
            jax.block_until_ready(outs)
            if i:
                best = min(best, time.perf_counter() - t0)
        times[name] = best
    return times


def zeros_like(infos):
    """Zeros for a tree of ShapeDtypeStructs, each on its sharding (every process its own
    shards) and committed, as a program's results are (its params are: `program_params`).
    Committed or not is part of a jit cache key: the wrong one would compile insert again
    when serving."""
    def one(info):
        host = np.zeros(info.shape, info.dtype)  # calloc'd: the slices below read no memory
        return jax.make_array_from_callback(info.shape, info.sharding, lambda index: host[index])

    return jax.tree.map(one, infos)
