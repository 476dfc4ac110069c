"""Getting an engine ready: compile every program it can run, time the calls its decisions
weigh, and choose the XLA:CPU option sets its programs compile under.

Functions of an `Engine` (engine.py), whose `warmup()`, `measure_costs()` and
`choose_options()` call them: they read its scheduler, executor and settings, and write
what they measure back to it (`Scheduler.decode_cost`, the speculation's `verify_cost`,
`Engine.option_times`, `Engine.options_note`). Nothing here runs once requests flow.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import jax
from jax.sharding import Mesh

from pgpt_jax import attention, dense
from pgpt_jax.prefix_cache import BLOCK_TOKENS

log = logging.getLogger(__name__)


def warmup(engine, progress: bool = False, on_program: Optional[Callable[[int, int], None]] = None) -> float:
    """Compiles every program for every shape `engine`'s scheduler can ask for (and, multi-host,
    the broadcast); returns seconds taken. `progress` draws a bar; `on_program(done, total)` is
    called after each program."""
    t0 = time.perf_counter()
    sched = engine.scheduler
    engine.choose_options()
    prefills = [(rows, b) for b in sched.buckets for rows in sched.prefill_rows[b]]
    decodes = sched.decode_shapes()
    verifies = [(rows, w) for w in sched.windows for rows in sched.row_buckets] if engine.speculative else []
    extends = [(rows, T, R) for T, R in sched.extend_shapes(BLOCK_TOKENS) for rows in sched.prefill_rows[T]
               if engine.prefix_cache]
    # Chunked prefill: one row of `prefill_chunk` tokens over each longer prompt's cache,
    # which starts empty or (with the prefix cache) from the pool's blocks.
    # (With a pool, its extends run them after gather_blocks or empty_cache: one program.)
    chunk = engine.prefill_chunk
    chunks = [(T, chunk) for T in sched.chunk_buckets(chunk)] if chunk else []
    if engine.prefix_cache:
        extends += [(1, T, C) for T, C in chunks if (1, T, C) not in extends]
    engine.executor.warmup(prefills, decodes, progress=progress, on_program=on_program, extends=extends,
                           chunks=chunks, verifies=verifies)
    if engine.lockstep is not None:
        engine.lockstep.warmup()
    else:
        engine.measure_costs()
    return time.perf_counter() - t0


def measure_costs(engine) -> None:
    """Times a decode call of each row bucket (how far batch work may widen it:
    scheduler.py) and, with speculation, a Verify's against it (when one pays: planner.py).
    Process 0 alone, on compiled programs; leaves a fresh state."""
    sched = engine.scheduler
    need = sched.windows[0]  # calls that read the smallest window's entries
    shapes = [(rows, sched.decode_window(rows, need)) for rows in sched.row_buckets]
    sched.decode_cost = engine.executor.time_decodes(shapes, span=need)
    log.info("decode call seconds by rows: %s", {r: round(t, 4) for r, t in sched.decode_cost.items()})
    if engine.speculative is not None:
        verify = engine.executor.time_decodes([(rows, need) for rows in sched.row_buckets], verify=True)
        engine.planner.speculation.verify_cost = {r: verify[r] / sched.decode_cost[r] for r in verify}
        log.info("verify / decode call time by rows: %s",
                 {r: round(c, 2) for r, c in engine.planner.speculation.verify_cost.items()})


def choose_options(engine) -> None:
    """XLA:CPU option sets for `engine`'s programs (xla_options.CPU_OPTION_SETS): forced by
    name, or with "auto" remembered for this CPU and shape, else measured: each decode row
    bucket under each set, the fastest kept (the largest bucket's for the other programs).
    A multi-host group never measures (its processes must compile the same programs)."""
    from pgpt_jax import xla_options

    if engine.xla_options is None:
        return
    if engine.xla_options != "auto":
        xla_options.choose_options(engine.xla_options)
        engine.options_note = f"XLA:CPU options {engine.xla_options} (forced)"
        log.info(engine.options_note)
        return
    cfg = engine.config
    # The decode attention path and the dense layers' (the native kernels, or XLA's paths
    # where they are off or unavailable) are part of what was timed, so a choice is
    # remembered per pair of paths.
    attend = attention.choose(engine.model.h[0].attn.implementation, jax.default_backend(), cfg.dtype,
                              cfg.head_dim, 1, attention.BLOCKED_MIN_ROWS)
    products = "packed" if dense.fits(cfg.dtype, engine.mesh) else "xla"
    key = (f"{cfg.name}/{cfg.dtype}/slots={engine.slots}/steps={engine.decode_steps}/mesh={_mesh_shape(engine.mesh)}"
           f"/attention={attend}/dense={products}")
    choice = xla_options.remembered_choice(key)
    if choice is not None:
        xla_options.choose_options(choice["default"], choice["decode"])
        engine.options_note = f"XLA:CPU options {_describe_choice(choice)} (remembered for this CPU)"
        log.info("XLA:CPU options for %s (remembered): %s", key, choice)
        return
    if jax.default_backend() != "cpu" or engine.lockstep is not None or xla_options.user_sets_options():
        return
    sched = engine.scheduler
    engine.option_times = {rows: engine.executor.time_option_sets(rows, sched.decode_window(rows, sched.windows[0]))
                           for rows in sched.row_buckets}
    decode = {rows: min(t, key=t.get) for rows, t in engine.option_times.items()}
    choice = {"default": decode[max(decode)], "decode": decode}
    xla_options.choose_options(choice["default"], decode)
    xla_options.remember_choice(key, choice)
    engine.options_note = f"XLA:CPU options {_describe_choice(choice)} (measured)"
    log.info("XLA:CPU options for %s (measured, seconds per decode call): %s -> %s", key,
             {r: {n: round(s, 4) for n, s in t.items()} for r, t in engine.option_times.items()}, choice)


def _mesh_shape(mesh: Optional[Mesh]) -> str:
    return "none" if mesh is None else "x".join(f"{k}{v}" for k, v in mesh.shape.items())


def _describe_choice(choice: dict) -> str:
    """{"default": name, "decode": {rows: name}} -> "xla-default; decode rows 1: no-ynn-fusion, ..."."""
    decode = ", ".join(f"{rows}: {name}" for rows, name in sorted(choice["decode"].items(), key=lambda kv: int(kv[0])))
    return f"{choice['default']}; decode by rows {decode}"
