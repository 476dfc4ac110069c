"""One process's recovery from device calls that raise, within one plan (engine.py's "Faults").

A shared prefill that raises is retried prompt by prompt, so that only the request that
causes the fault fails; a failing chunk fails its one request; any other call with slots
fails the requests it ran, and every running request too if it consumed the donated state
(on a fresh state). A failed save's prefix cache blocks are forgotten, and a later prefill
of the same plan that would read them runs whole (a consumed pool starts again empty).

`Faults` holds what a plan's faults changed (prefills moved by a retry, pool blocks never
saved) until the engine's next plan; it ends requests through the engine's `_end` and runs
retries through its `_execute`. In a multi-host run any fault is fatal (engine.py): only
`reads_lost` is asked there, and it says no.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from pgpt_jax.executor import Executor, Extend, Prefill
from pgpt_jax.prefix_cache import BLOCK_TOKENS, PrefixIndex
from pgpt_jax.scheduler import Scheduler

log = logging.getLogger(__name__)


class Faults:
    """The engine's fault handling on one process; `planner` is its Planner, `end` its `_end`
    and `execute` its `_execute`. `multihost`: a lockstep group, where no prefill reads lost blocks."""

    def __init__(self, executor: Executor, planner, scheduler: Scheduler, cache: Optional[PrefixIndex], *,
                 end: Callable, execute: Callable[[list, list], None], multihost: bool):
        self.executor, self.planner, self.scheduler, self.cache = executor, planner, scheduler, cache
        self.end, self.execute, self.multihost = end, execute, multihost
        self.moved: dict[tuple, tuple] = {}  # this plan's prefills retried alone: (pid, index) -> new
        self.bad_blocks: set = set()  # this plan's pool blocks whose save failed (None in it: all)

    def new_plan(self) -> None:
        """Forgets the last plan's moves and lost blocks."""
        self.moved.clear()
        self.bad_blocks.clear()

    def prefill_fault(self, op: Prefill, chunk: list, exc: Exception) -> None:
        """One process: a prefill raised. A shared call is retried prompt by prompt, so that only
        the request that causes the fault fails. The pool blocks it was to save hold nothing:
        forgotten, and later prefills of this plan that would read them run whole."""
        self.lost_blocks(op)
        if len(chunk) > 1:
            self.retry_alone(op, chunk)
            return
        log.error("prefill failed: %r", exc)
        self.end(chunk[0], exc)

    def chunk_fault(self, op: Extend, entry, exc: Exception) -> None:
        """One process: an Extend (one chunk of one prompt) raised: only its request fails."""
        self.lost_blocks(op)
        log.error("prefill chunk failed: %r", exc)
        self.end(entry, exc)

    def retry_alone(self, op: Prefill, chunk: list) -> None:
        """Prefills `chunk` again, whole and one prompt a call, without the prefix cache."""
        ops, meta = [], []
        old = [(op.pid, j) for j in range(len(chunk))]
        self.planner.prefills(chunk, op.want_logprobs, ops, meta, alone=True)
        for was, entry in zip(old, chunk):
            self.moved[was] = entry.prefix  # this plan's Place ops read the new prefill
        self.execute(ops, meta)
        for entry in chunk:
            if not entry.unplaced:  # every choice of it was planned already: drop the new one next
                self.planner.release_prefill(entry)

    def reads_lost(self, op: Prefill) -> bool:
        """One process: whether `op` reads pool blocks whose save failed earlier in this plan."""
        if op.reads is None or not self.bad_blocks or self.multihost:
            return False
        reads = {int(b) for row, start in zip(op.reads, op.start) for b in row[: start // BLOCK_TOKENS]}
        return None in self.bad_blocks or bool(self.bad_blocks & reads)

    def lost_blocks(self, op: Prefill) -> None:
        """A prefill that was to save blocks failed: the index forgets them (all of them, with
        a fresh pool, if the failed save consumed the donated one)."""
        cache = self.cache
        if cache is None:
            return
        if self.executor.pool_lost():
            self.executor.reset_pool()
            cache.clear()
            self.bad_blocks.add(None)
        elif op.writes is not None:
            lost = {int(b) for b in op.writes.reshape(-1) if b < cache.blocks}
            cache.forget(lost)
            self.bad_blocks |= lost

    def device_fault(self, exc: Exception, touched: list) -> None:
        """One process: a call with slots raised. The requests it ran fail; if it consumed the
        donated state, every running request lost its cache and fails too, on a fresh state."""
        log.error("a device call failed for %d request(s): %r", len(set(touched)), exc)
        if self.executor.state_lost():
            touched = touched + [run.entry for run in self.scheduler.owner if run is not None]
            self.executor.reset(prefills=False)
        for entry in dict.fromkeys(touched):
            self.end(entry, exc)
