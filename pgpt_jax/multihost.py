"""Multi-host lockstep: what process 0 broadcasts each engine iteration, and how the others read it.

In a multi-process run (jax.distributed) every process holds shards of the same arrays, so
every process must run the same jitted calls in the same order. Process 0 serves HTTP and
decides; at the start of each iteration it broadcasts an `Iteration` (the requests it
admitted, with their seeds and ids, the ids it aborted, and whether it is stopping). The
other processes receive it and make the same host decisions from it: their engines run
the same loop over the same registry, fed by these messages instead of by clients.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np

from pgpt_jax.request import Request


@dataclasses.dataclass
class Iteration:
    """Process 0's decisions for one iteration."""

    admitted: list[tuple[int, Request, int]]  # (request id, request, seed)
    aborted: list[int]  # request ids
    stop: bool = False


class Lockstep:
    """Broadcasts one `Iteration` from process 0 to all; every process calls `exchange` once a loop."""

    def __init__(self):
        import jax

        self.leader = jax.process_index() == 0

    def exchange(self, it: Iteration) -> Iteration:
        """Process 0 passes its decisions and gets them back; the others pass anything and get process 0's."""
        from jax.experimental import multihost_utils

        msg = pickle.dumps(it) if self.leader else b""
        # Two broadcasts: the length, then the bytes padded to a power of two (few shapes).
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(msg))))
        size = 1 << max(10, (n - 1).bit_length())
        buf = np.zeros((size,), np.uint8)
        buf[: len(msg)] = np.frombuffer(msg, np.uint8)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        return it if self.leader else pickle.loads(buf[:n].tobytes())
