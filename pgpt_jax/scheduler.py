"""Which work runs where: the queue of choices waiting for a slot, the slot table, and the
static shape of every device call.

Host-only bookkeeping (no device, no text). Shapes are chosen from small fixed sets so that
nothing compiles after warm-up:
  - prompt buckets: prompts are padded to 16, 32, 64, ... up to the context length;
  - prefill rows: prompts of one bucket that arrive together share a call of 1, 4 or 16
    rows, as long as rows x bucket stays within `max_prefill_tokens` (past that the matmuls
    are large enough alone, and every extra shape is one more compile);
  - decode rows: decode runs the occupied prefix of the slots, in buckets of 1, 4, 16, ...
    up to `slots` (free slots are taken lowest first, so one stream pays for one row); a
    data axis that splits the slots over devices makes every program run all of them;
  - attention windows: 128, 256, ... up to the context, the smallest that covers the
    longest occupied row after this call's steps.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Optional


def buckets(limit: int, smallest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... below `limit`, then `limit`."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


class Scheduler:
    """The slot table and the waiting queue of one engine; the engine owns it (one thread)."""

    def __init__(self, slots: int, context_length: int, *, min_bucket: int = 16, min_window: int = 128,
                 max_prefill_tokens: int = 1024, split_slots: bool = False):
        self.slots, self.context_length = slots, context_length
        self.buckets = buckets(context_length, min(min_bucket, context_length))
        self.windows = buckets(context_length, min(min_window, context_length))
        self.prefill_rows = {
            b: tuple(p for p in (1, 4, 16) if p == 1 or (p * b <= max_prefill_tokens and p <= slots))
            for b in self.buckets}
        self.row_buckets = (slots,) if split_slots else \
            tuple(4**i for i in range(8) if 4**i < slots) + (slots,)
        self.owner: list[Optional[Any]] = [None] * slots  # what generates in each slot
        self.position = [0] * slots  # device position of each occupied slot's last token
        self.waiting: deque = deque()  # (entry, choice) pairs waiting for a slot, oldest first

    # ------------------------------------------------------------------ the slot table

    @property
    def occupied(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is not None]

    @property
    def active(self) -> int:
        return sum(o is not None for o in self.owner)

    def place(self, slot: int, owner: Any, position: int) -> None:
        self.owner[slot], self.position[slot] = owner, position

    def release(self, slot: Optional[int], owner: Any = None) -> None:
        """Frees `slot` (if `owner` is given, only while it still holds the slot)."""
        if slot is not None and (owner is None or self.owner[slot] is owner):
            self.owner[slot] = None

    def drop(self, entry: Any) -> None:
        """Forgets the waiting choices of `entry`."""
        self.waiting = deque(w for w in self.waiting if w[0] is not entry)

    def clear(self) -> None:
        self.owner = [None] * self.slots
        self.waiting.clear()

    # ------------------------------------------------------------------ admission

    def admissions(self, done=lambda entry: False) -> Iterable[tuple[Any, Any, int]]:
        """(entry, choice, slot) for waiting choices, oldest first, while slots are free; skips
        the choices of entries that `done` says are over."""
        free = [s for s, o in enumerate(self.owner) if o is None]
        while free and self.waiting:
            entry, choice = self.waiting.popleft()
            if done(entry):
                continue
            yield entry, choice, free.pop(0)

    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def prefill_calls(self, items: list, length, alone: bool = False) -> list[tuple[int, int, list]]:
        """Groups `items` (with `length(item)` prompt tokens) into prefill calls: (bucket, rows,
        items) with len(items) <= rows, in the order of each bucket's first item. `alone`: one
        item a call (a shared call that failed, retried prompt by prompt)."""
        by_bucket: dict = {}
        for item in items:
            by_bucket.setdefault(self.bucket(length(item)), []).append(item)
        calls = []
        for bucket, group in by_bucket.items():
            most = 1 if alone else self.prefill_rows[bucket][-1]
            for i in range(0, len(group), most):
                chunk = group[i:i + most]
                calls.append((bucket, next(p for p in self.prefill_rows[bucket] if p >= len(chunk)), chunk))
        return calls

    # ------------------------------------------------------------------ decode

    def decode_shape(self, steps: int) -> tuple[int, int]:
        """(window, rows) for a decode call of `steps` steps over the occupied slots."""
        occupied = self.occupied
        need = min(max(self.position[s] for s in occupied) + steps + 1, self.context_length)
        window = next(w for w in self.windows if w >= need)
        rows = next(r for r in self.row_buckets if r > occupied[-1])
        return window, rows

    def advance(self, steps: int) -> dict[int, Any]:
        """The occupied slots moved on by `steps` tokens; returns {slot: owner} as they were."""
        owners = {}
        for s, o in enumerate(self.owner):
            if o is not None:
                owners[s] = o
                self.position[s] = min(self.position[s] + steps, self.context_length - 1)
        return owners
