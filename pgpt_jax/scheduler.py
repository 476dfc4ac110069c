"""Which work runs where: the queue of choices waiting for a slot, the slot table, and the
static shape of every device call.

Host-only bookkeeping (no device, no text). Shapes are chosen from small fixed sets so that
nothing compiles after warm-up:
  - prompt buckets: prompts are padded to 16, 32, 64, ... up to the context length;
  - prefill rows: prompts of one bucket that arrive together share a call of 1, 4 or 16
    rows, as long as rows x bucket stays within `max_prefill_tokens` (past that the matmuls
    are large enough alone, and every extra shape is one more compile);
  - decode rows: decode runs the occupied prefix of the slots, in buckets of 1, 4, 8, 16,
    64, ... up to `slots` (free slots are taken lowest first, so one stream pays for one row); a
    data axis that splits the slots over devices makes every program run all of them;
  - attention windows: 128, 256, ... up to the context, the smallest that covers the
    longest occupied row after this call's steps. Row buckets whose decode reads only what
    the positions need (`reads_by_position`: attention.py's native kernel, every bucket on
    CPU where it builds; else its blocked path, 8 rows or more) take one window, the context:
    such a call reads what its positions and span need whatever its window, so a program per
    window would only add compiles (no slower, measured in docs/benchmarks.md). A Verify
    computes its window in full and keeps the buckets.

Two queues: interactive choices (`waiting`) get free slots before background (batch) ones
(`background`). While interactive work is about, batch work may hold only the slots below
`background_limit`: the rows of the decode bucket interactive work needs anyway, widened to
a bigger bucket only while its decode call costs at most `batch_slack` times as much
(`decode_cost`, measured at warm-up). So batch work fills rows interactive steps compute
regardless, and never makes them much slower. `shortfall` says how many slots below that
limit waiting interactive work lacks; the planner takes them back from batch work.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Optional


# Decode row buckets (then `slots`): powers of 4 with 8 between 4 and 16, where a closed loop
# of 8 streams sits (on a 2-core Zen 5, one GPT-2 step of 8 rows took 49.5 ms, of 16 59 ms).
ROW_BUCKETS = (1, 4, 8, 16, 64, 256, 1024, 4096)


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
                 max_prefill_tokens: int = 1024, split_slots: bool = False, batch_slack: float = 1.25,
                 reads_by_position: Callable[[int], bool] = lambda rows: False):
        self.slots, self.context_length = slots, context_length
        self.buckets = buckets(context_length, min(min_bucket, context_length))
        self.windows = buckets(context_length, min(min_window, context_length))
        self.prefill_rows = {
            b: tuple(p for p in (1, 4, 16) if p == 1 or (p * b <= max_prefill_tokens and p <= slots))
            for b in self.buckets}
        self.row_buckets = (slots,) if split_slots else tuple(r for r in ROW_BUCKETS if r < slots) + (slots,)
        # Row buckets whose decode reads only what its rows' positions need (the native kernel, the
        # blocked path: `reads_by_position(rows)`): such a call costs the same at any window, so its
        # window is the context, one program per bucket.
        self.context_window_rows = frozenset(r for r in self.row_buckets if reads_by_position(r))
        self.owner: list[Optional[Any]] = [None] * slots  # what generates in each slot
        self.batch = [False] * slots  # whether that is background (batch) work
        self.reserved = [False] * slots  # held for a choice whose prompt is still prefilled in chunks
        self.batch_slack = batch_slack
        self.decode_cost: Optional[dict[int, float]] = None  # seconds of a decode call by rows (warm-up)
        self.position = [0] * slots  # device position of each occupied slot's last token
        self.waiting: deque = deque()  # (entry, choice) pairs waiting for a slot, oldest first
        self.background: deque = deque()  # the same for background (batch) work, served after

    # ------------------------------------------------------------------ the slot table

    @property
    def occupied(self) -> list[int]:
        """Slots that decode: held by a placed choice (not only reserved)."""
        return [s for s, o in enumerate(self.owner) if o is not None and not self.reserved[s]]

    @property
    def active(self) -> int:
        return len(self.occupied)

    def place(self, slot: int, owner: Any, position: int, background: bool = False) -> None:
        self.owner[slot], self.position[slot], self.batch[slot] = owner, position, background
        self.reserved[slot] = False

    def reserve(self, slot: int, owner: Any, background: bool = False) -> None:
        """`slot` is `owner`'s, but it does not decode until `place` (its prompt is prefilled in
        chunks): no free slot for others, no row of the decode's shape, no tokens read."""
        self.owner[slot], self.batch[slot], self.reserved[slot] = owner, background, True

    def interactive_slots(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is not None and not self.batch[s]]

    def release(self, slot: Optional[int], owner: Any = None) -> None:
        """Frees `slot` (if `owner` is given, only while it still holds the slot)."""
        if slot is not None and (owner is None or self.owner[slot] is owner):
            self.owner[slot], self.reserved[slot] = None, False

    @property
    def queued(self) -> int:
        """Choices waiting for a slot, interactive and background."""
        return len(self.waiting) + len(self.background)

    def enqueue(self, entry: Any, choices: Iterable[Any], background: bool = False, front: bool = False) -> None:
        """`choices` of `entry` wait for slots: at the back of their queue, or at its front."""
        queue = self.background if background else self.waiting
        items = [(entry, c) for c in choices]
        if front:
            queue.extendleft(reversed(items))
        else:
            queue.extend(items)

    def drop(self, entry: Any) -> None:
        """Forgets the waiting choices of `entry`."""
        self.waiting = deque(w for w in self.waiting if w[0] is not entry)
        self.background = deque(w for w in self.background if w[0] is not entry)

    def clear(self) -> None:
        self.owner = [None] * self.slots
        self.reserved = [False] * self.slots
        self.waiting.clear()
        self.background.clear()

    # ------------------------------------------------------------------ admission

    def admissions(self, done=lambda entry: False, limit: Optional[int] = None, reserve: int = 0,
                   most: Optional[int] = None) -> Iterable[tuple[Any, Any, int]]:
        """(entry, choice, slot) for waiting choices while slots are free, lowest first:
        interactive ones oldest first, then at most `most` background ones (default: no cap)
        below `limit` (default: all slots) as long as `reserve` free slots below it stay free;
        skips the choices of entries `done` says are over."""
        free = [s for s, o in enumerate(self.owner) if o is None]
        limit = self.slots if limit is None else limit
        most = self.slots if most is None else most
        for queue in (self.waiting, self.background):
            while free and queue:
                if queue is self.background and (sum(s < limit for s in free) <= reserve or most <= 0):
                    return
                most -= queue is self.background
                entry, choice = queue.popleft()
                if done(entry):
                    continue
                yield entry, choice, free.pop(0)

    def interactive_need(self) -> int:
        """Rows interactive work needs now: its rows and waiting choices packed low, and at
        least up to its highest slot (0: none)."""
        mine = self.interactive_slots()
        return max(len(mine) + len(self.waiting), mine[-1] + 1 if mine else 0)

    def background_limit(self, need: int) -> int:
        """Slots (a prefix) batch work may hold when interactive work needs `need` rows: all of
        them for 0; else that need's decode bucket, widened while a bucket's measured decode
        costs at most `batch_slack` times that one's."""
        if need <= 0:
            return self.slots
        base = next((r for r in self.row_buckets if r >= need), self.slots)
        cost = self.decode_cost
        if not cost or base not in cost:
            return base
        return max(r for r in self.row_buckets if r <= base or cost.get(r, float("inf")) <= self.batch_slack * cost[base])

    def shortfall(self, limit: Optional[int] = None) -> int:
        """Slots below `limit` (default: all) that waiting interactive choices lack."""
        limit = self.slots if limit is None else limit
        return max(0, len(self.waiting) - sum(o is None for o in self.owner[:limit]))

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
            for chunk in ([[x] for x in group] if alone else self.call_chunks(group, bucket)):
                calls.append((bucket, next(p for p in self.prefill_rows[bucket] if p >= len(chunk)), chunk))
        return calls

    def call_chunks(self, group: list, bucket: int) -> list[list]:
        """`group` (prompts of one bucket) cut into its prefill calls (`call_sizes`), in order."""
        chunks, i = [], 0
        for take in self.call_sizes(len(group), bucket):
            chunks.append(group[i:i + take])
            i += take
        return chunks

    def call_sizes(self, n: int, bucket: int) -> list[int]:
        """How many of `n` prompts of `bucket` each prefill call takes, in order. A call's rows
        are a row bucket; a row of padding costs as much as a prompt (prefill is compute-bound)
        and every prompt's first token waits for its whole call, so a call is padded by at most
        a quarter of its rows (or 2): 8 prompts go in two calls of 4, not one of 16."""
        rows, sizes = self.prefill_rows[bucket], []
        while n > 0:
            fit = next((p for p in rows if p >= n), rows[-1])  # the call that takes them all, or the most
            take = min(n, fit) if fit - n <= max(fit // 4, 2) else max(p for p in rows if p <= n)
            sizes.append(take)
            n -= take
        return sizes

    def extend_shape(self, length: int, start: int) -> Optional[tuple[int, int]]:
        """(T, R) of a prefill that reads the first `start` tokens of a `length`-token prompt
        from the prefix cache and computes the rest: T the whole prompt's bucket (its cache's
        length), R the bucket of the rest. None when that saves too little to be worth a
        program (R over T/2) or the rest's padding would run past the cache (start + R > T)."""
        T, R = self.bucket(length), self.bucket(max(length - start, 1))
        if start <= 0 or 2 * R > T or start + R > T:
            return None
        return T, R

    def chunk_buckets(self, chunk: int) -> list[int]:
        """The cache lengths T of prompts longer than `chunk` tokens (prefilled in chunks of it)."""
        return [T for T in self.buckets if T > chunk]

    def extend_shapes(self, block: int) -> list[tuple[int, int]]:
        """Every (T, R) `extend_shape` can give when cached prefixes are whole blocks of `block` tokens."""
        return [(T, R) for T in self.buckets if T > block for R in self.buckets if 2 * R <= T]

    # ------------------------------------------------------------------ decode

    def decode_shape(self, steps: int, verify: bool = False) -> tuple[int, int, int]:
        """(window, rows, span) for a decode call of `steps` steps over the occupied slots:
        span is how many cache entries the furthest of them reads (at most the window). A
        `verify` call's window is always the smallest bucket that covers the span."""
        occupied = self.occupied
        need = min(max(self.position[s] for s in occupied) + steps + 1, self.context_length)
        rows = next(r for r in self.row_buckets if r > occupied[-1])
        return (self.window(need) if verify else self.decode_window(rows, need)), rows, need

    def window(self, need: int) -> int:
        """The smallest window bucket that holds `need` cache entries."""
        return next(w for w in self.windows if w >= need)

    def decode_window(self, rows: int, need: int) -> int:
        """The window of a Decode or Forward call of `rows` rows that reads `need` entries."""
        return self.windows[-1] if rows in self.context_window_rows else self.window(need)

    def decode_shapes(self, need: Optional[int] = None) -> list[tuple[int, int]]:
        """Every (rows, window) a Decode or Forward call can have (with `need`, while no row
        reads more than `need` entries): what warm-up compiles."""
        windows = [w for w in self.windows if need is None or w <= self.window(need)]
        return sorted({(rows, self.decode_window(rows, w)) for rows in self.row_buckets for w in windows})

    def advance(self, steps: int) -> dict[int, Any]:
        """The occupied slots moved on by `steps` tokens; returns {slot: owner} as they were."""
        owners = {}
        for s in self.occupied:
            owners[s] = self.owner[s]
            self.position[s] = min(self.position[s] + steps, self.context_length - 1)
        return owners
