"""Opt-in timestamps of each streamed request's way through the server and the engine.

Set the environment variable PGPT_TIMELINE to a file path before the server starts: every
streamed request appends one JSON line there when it ends (scripts/timeline.py reads them).
Unset (the default), every hook below is one test of `ON` and records nothing.

A request's marks, in the order it meets them (all `time.perf_counter()`, which on Linux is
CLOCK_MONOTONIC, so a client on the same machine can put its own times beside them):

  server (bridge.py, app.py)   arrive, body (read), parsed (JSON + tokenised), accepted (submit
                               returned), on_loop (its first delta reached the event loop),
                               first_write (the first SSE bytes with text handed to the server);
                               `writes`: [time, tokens] of every SSE write after that
  engine (registry.py,         queued (submit took it), taken (the engine loop took it from the
  engine.py)                   inbox), placed (its first choice got a slot), prefill_dispatch /
                               prefill_return (the host call of its prefill), prefill_done (the
                               device finished it), place_dispatch / place_return (insert +
                               start_row), first_sampled (the device finished them: the first token
                               exists), first_read (the host read it), delivered (its first delta
                               went to the callback), decode_dispatch (its first decode program)

`*_done` and `first_sampled` come from a thread per watched program that waits for its outputs,
so they cost the engine nothing but that thread's start (`first_sampled` falls back to the
read's time when that thread wakes after the read). The engine's decode programs are
logged too (one line each: dispatch, return, done, rows, steps, window).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Any, Iterable, Optional

PATH = os.environ.get("PGPT_TIMELINE") or None
ON = PATH is not None
_lock = threading.Lock()


def marks() -> Optional[dict]:
    """A fresh marks dict when the timeline is on, else None (every hook then does nothing)."""
    return {} if ON else None


def mark(m: Optional[dict], name: str, t: Optional[float] = None) -> None:
    """Records `name` once (the first time wins) in `m`, unless `m` is None."""
    if m is not None and name not in m:
        m[name] = time.perf_counter() if t is None else t


def write(row: dict) -> None:
    if PATH is None:
        return
    line = json.dumps(row) + "\n"
    with _lock, open(PATH, "a") as f:
        f.write(line)


WATCHERS = 4  # threads waiting for programs' outputs: a later program is timed while an earlier one runs
_todo: "queue.SimpleQueue" = queue.SimpleQueue()
_watchers: list = []


def _wait_loop() -> None:
    import jax

    while True:
        arrays, done = _todo.get()
        try:
            jax.block_until_ready(arrays)
        except Exception:  # noqa: BLE001 - the engine reports the failure; the timeline only misses a mark
            continue
        done(time.perf_counter())


def _watch(arrays: Any, done) -> None:
    """Calls `done(t)` with the time `arrays` are ready, from one of the watcher threads (started
    once: starting a thread per program cost the engine thread up to a scheduler slice each)."""
    if not _watchers:
        with _lock:
            while len(_watchers) < WATCHERS:
                _watchers.append(threading.Thread(target=_wait_loop, daemon=True, name="pgpt-timeline"))
                _watchers[-1].start()
    _todo.put((arrays, done))


def ran(op, meta, t0: float, out, executor) -> None:
    """The engine ran `op` (dispatched at `t0`, returned now) for the requests in `meta`."""
    from pgpt_jax.executor import Decode, Extend, Place, Prefill

    t1 = time.perf_counter()
    if isinstance(op, Prefill):
        entries = [e for e in meta if e.marks is not None]
        for e in entries:
            mark(e.marks, "prefill_dispatch", t0)
            mark(e.marks, "prefill_return", t1)
        kept = executor.prefills.get(op.pid)
        if kept is not None and entries:
            _watch(kept[1], lambda t: [mark(e.marks, "prefill_done", t) for e in entries])
        for e in entries:
            mark(e.marks, "prefill_timed")  # what the timeline itself took
    elif isinstance(op, Extend):  # a chunked prefill: dispatched with its first chunk, returned with its last
        m = meta.marks
        if m is not None:
            mark(m, "prefill_dispatch", t0)
            if int(op.lengths[0]) == len(meta.request.prompt):
                mark(m, "prefill_return", t1)
                kept = executor.prefills.get(op.pid)
                if kept is not None:
                    _watch(kept[1], lambda t: mark(m, "prefill_done", t))
                mark(m, "prefill_timed")
    elif isinstance(op, Place):
        m = meta.entry.marks
        if m is not None and "place_dispatch" not in m:
            mark(m, "place_dispatch", t0)
            mark(m, "place_return", t1)
            _watch(out, lambda t: mark(m, "first_sampled", t))
    elif isinstance(op, Decode):
        for run in meta.values():
            mark(run.entry.marks, "decode_dispatch", t0)
        row = {"kind": "decode", "dispatch": t0, "return": t1, "rows": op.rows, "steps": op.steps,
               "window": op.window}
        _watch(out, lambda t: write({**row, "done": t}))


def read(owners: dict) -> None:
    """The host read an insert's outputs: the first token of the choice in `owners`. The device
    has finished them by now, so a `first_sampled` its watcher thread has not stamped yet (a
    loaded machine can wake that thread after the whole stream has ended and been recorded)
    takes this time: an upper bound, where the watcher's stamp would be exact."""
    for run in owners.values():
        t = time.perf_counter()
        mark(run.entry.marks, "first_read", t)
        mark(run.entry.marks, "first_sampled", t)


def record(server: dict, engine: Optional[dict], writes: Iterable, seed: Optional[int]) -> None:
    """One finished stream's line: the server's and the engine's marks, and its SSE writes."""
    write({"kind": "request", "seed": seed, "server": server, "engine": engine or {}, "writes": list(writes)})
