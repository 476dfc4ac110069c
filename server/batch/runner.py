"""The server's batch runner: one thread that feeds the active batches' lines to the engine.

It keeps at most `window` lines in flight over all batches (oldest batch first), each as
background work, so the engine's queue never grows past that and interactive requests go
first (pgpt_jax/scheduler.py). Finished lines are written to the store as they end (a
transaction per wake-up of this thread); a batch with no line left is finalised (its output
and error files written) and completed. Cancelling or expiry aborts the lines in flight and
ends the lines not run with `batch_cancelled` / `batch_expired` errors.

When the engine stops (a drain, a fault), lines in flight end with EngineUnavailable: they
are not recorded, so a restarted server runs them again. A line is recorded once
(`BatchStore.record` keeps the first output), so every custom_id ends in one output line.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

from pgpt_jax.request import EngineUnavailable, QueueFull
from server.batch.lines import LineRun, parse_line, unrun_line
from server.batch.store import BatchStore
from server.protocol import ModelInfo

log = logging.getLogger("pgpt_jax.server")

ENDINGS = {"cancelling": ("cancelled", "cancelled_at", "batch_cancelled", "The batch was cancelled before this request ran."),
           "expired": ("expired", "expired_at", "batch_expired",
                       "The batch's completion window ended before this request ran.")}


class BatchRunner:
    """See the module docstring. `on_line(ok)` is called for each line this process ran to an end."""

    def __init__(self, store: BatchStore, engine, info: ModelInfo, window: int, on_line=lambda ok: None):
        self.store, self.engine, self.info, self.window, self.on_line = store, engine, info, window, on_line
        self.flight: dict[str, dict[int, LineRun]] = {}  # batch id -> line number -> run
        self._ended: queue.Queue = queue.Queue()  # LineRuns the engine has ended
        self._wake = threading.Event()
        self._running = False
        self._feeding = True
        self._thread: Optional[threading.Thread] = None

    @property
    def in_flight(self) -> int:
        return sum(len(f) for f in self.flight.values())

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="pgpt-batches", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """No more lines go to the engine (a drain); those that end are still recorded."""
        self._feeding = False

    def resume(self) -> None:
        self._feeding = True
        self._wake.set()

    def stop(self) -> None:
        """Stops the thread, recording what ended last; call it once the engine has stopped
        (lines it ended with EngineUnavailable stay unrecorded and run again after a restart)."""
        self._feeding = self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._record()

    def wake(self) -> None:
        """A batch was created or cancelled."""
        self._wake.set()

    def _ended_cb(self, run: LineRun) -> None:  # the engine thread (or this one, for a refused body)
        self._ended.put(run)
        self._wake.set()

    def _loop(self) -> None:
        while self._running:
            try:
                self._record()
                for batch_id in self.store.active():
                    self._tick(batch_id)
            except EngineUnavailable:
                log.info("the engine stopped: batch lines in flight run again after a restart")
                self._feeding = False
            except Exception:  # a fault here must not end the batches: log and go on
                log.exception("batch runner iteration failed")
                time.sleep(1.0)
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _record(self) -> None:
        """Writes the lines that ended since the last call, one transaction per batch."""
        done: dict[str, list] = {}
        while True:
            try:
                run = self._ended.get_nowait()
            except queue.Empty:
                break
            batch_id = run.batch_id
            if self.flight.get(batch_id, {}).pop(run.line.number, None) is None or run.lost:
                continue  # aborted by a cancel, or the engine stopped: not this run's to record
            done.setdefault(batch_id, []).append((run.line.number, run.ok, run.format()))
            self.on_line(run.ok)
        for batch_id, results in done.items():
            self.store.record(batch_id, results)

    def _tick(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)
        status = batch["status"]
        flight = self.flight.setdefault(batch_id, {})
        if status == "in_progress" and batch["expires_at"] is not None and time.time() > batch["expires_at"]:
            status = "expired"
        if status in ENDINGS:
            self._end_early(batch_id, *ENDINGS[status])
        elif status == "in_progress" and self._feeding:
            self._feed(batch_id, flight)
            if not flight and not self.store.left(batch_id):
                self.store.set_status(batch_id, "finalizing", "finalizing_at", only_from=("in_progress",))
                status = "finalizing"
        if status == "finalizing":
            self.store.finalize(batch_id, "completed", "completed_at")
            self.flight.pop(batch_id, None)
            log.info("batch %s completed", batch_id)

    def _feed(self, batch_id: str, flight: dict) -> None:
        room = self.window - self.in_flight
        if room <= 0:
            return
        for number, _cid, text in self.store.pending(batch_id, set(flight), room):
            run = LineRun(parse_line(text, number), self.info, self._ended_cb, batch_id)
            flight[number] = run
            try:
                run.submit(self.engine)
            except QueueFull:  # cannot happen for background work, but never lose the line
                del flight[number]
                return
            except EngineUnavailable:
                del flight[number]
                raise

    def _end_early(self, batch_id: str, status: str, when: str, code: str, message: str) -> None:
        """Cancelled or expired: abort what runs, end what never ran, write the files."""
        self._record()  # lines that ended meanwhile keep their answers
        for run in self.flight.pop(batch_id, {}).values():
            run.abort()
        unrun = self.store.pending(batch_id, set(), 1 << 62)
        if unrun:
            self.store.record(batch_id, [(n, False, unrun_line(cid, code, message)) for n, cid, _ in unrun])
        self.store.finalize(batch_id, status, when)
        log.info("batch %s %s (%d request(s) not run)", batch_id, status, len(unrun))
