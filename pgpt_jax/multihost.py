"""Multi-host lockstep: process 0 decides, every process executes the same programs in the same order.

In a multi-process run (jax.distributed) every process holds shards of the same arrays, so
every process must run the same jitted calls in the same order. Process 0 serves HTTP and
makes every decision (admissions, aborts, stop strings, deadlines, shutdown); each engine
iteration it broadcasts what the iteration runs on the device, a list of ops
(`executor.py`), and whether it is stopping. The other processes only replay those ops
(`follow`): they keep no requests, no text, no clocks.

The message has a fixed shape: frames of FRAME bytes (a header with the message's length
and the stop flag, then its pickled ops), as many frames as the message needs, each one
broadcast with the same program; `warmup` compiles it with the engine's programs, so
nothing compiles while serving.

A group that stops answering is a broken group. Each side runs a `Watchdog`: process 0's
fires when an iteration (a broadcast, or a device call with collectives) has not ended
within the lockstep timeout; a follower's when no message has come for that long. Either
way the process gives up: process 0 fails every request in flight and reports not ready,
and both exit non-zero so that the orchestrator restarts the whole group (LeaderWorkerSet's
recreate-group policy). A follower whose device call raises exits the same way: it can no
longer be trusted to hold the same state.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import Callable, Optional

import numpy as np

from pgpt_jax.executor import Executor

log = logging.getLogger(__name__)

FRAME = 16 * 1024  # bytes per broadcast: a few prompts' worth; longer messages take more frames
_HEADER = 8  # uint32 message length, uint32 flags


class Lockstep:
    """Sends process 0's ops to every process, one fixed-shape frame at a time."""

    def __init__(self):
        import jax

        self.leader = jax.process_index() == 0

    def _broadcast(self, frame: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(frame))

    def send(self, ops: list, stop: bool = False) -> None:
        """Process 0: broadcasts this iteration's ops (and the stop flag)."""
        data = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
        head = np.array([len(data), int(stop)], np.uint32).view(np.uint8)
        buf = np.frombuffer(head.tobytes() + data, np.uint8)
        for start in range(0, len(buf), FRAME):
            frame = np.zeros((FRAME,), np.uint8)
            chunk = buf[start:start + FRAME]
            frame[: len(chunk)] = chunk
            self._broadcast(frame)

    def receive(self) -> tuple[list, bool]:
        """The others: the next iteration's ops and process 0's stop flag."""
        first = self._broadcast(np.zeros((FRAME,), np.uint8))
        length, flags = first[:_HEADER].view(np.uint32)
        frames = [first]
        while len(frames) * FRAME < _HEADER + int(length):
            frames.append(self._broadcast(np.zeros((FRAME,), np.uint8)))
        data = np.concatenate(frames)[_HEADER:_HEADER + int(length)].tobytes()
        return pickle.loads(data), bool(flags & 1)

    def warmup(self) -> None:
        """Compiles the broadcast (every process at once, as for the engine's programs)."""
        if self.leader:
            self.send([])
        else:
            self.receive()


class Watchdog:
    """Calls `on_stall(seconds)` once when `beat()` has not been called for `timeout` seconds."""

    def __init__(self, timeout: float, on_stall: Callable[[float], None], name: str = "pgpt-watchdog"):
        self.timeout, self.on_stall = timeout, on_stall
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            stalled = time.monotonic() - self.last
            if stalled > self.timeout:
                self._stop.set()
                self.on_stall(stalled)


def follow(executor: Executor, lockstep: Lockstep, timeout: Optional[float] = None,
           on_fatal: Optional[Callable[[BaseException], None]] = None) -> None:
    """A process other than 0: replays process 0's ops until it says stop.

    Returns when process 0 stops. When process 0 stops answering for `timeout` seconds, or
    an op raises here, `on_fatal(exc)` is called (`pgpt-jax serve` exits non-zero there); without
    it, the exception is raised.
    """
    def stalled(seconds: float) -> None:
        exc = TimeoutError(f"process 0 sent nothing for {seconds:.0f} s: the group is broken")
        log.critical("%s", exc)
        if on_fatal is not None:
            on_fatal(exc)

    watchdog = Watchdog(timeout, stalled, "pgpt-follower-watchdog") if timeout else None
    try:
        while True:
            ops, stop = lockstep.receive()
            if watchdog is not None:
                watchdog.beat()
            if stop:
                return
            for op in ops:
                executor.run(op)
    except Exception as exc:
        log.critical("this process can no longer follow process 0: %r", exc)
        if on_fatal is None:
            raise
        on_fatal(exc)
    finally:
        if watchdog is not None:
            watchdog.stop()
