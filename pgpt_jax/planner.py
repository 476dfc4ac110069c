"""Process 0's decisions for one engine iteration, written as a list of device ops.

Each iteration the planner takes the registry's new requests, aborts and expired deadlines;
starts the new requests (their output side; their choices wait for slots holding only token
ids); asks the scheduler which waiting choices get which free slots; prefills the requests
that get their first slot (one `Prefill` per group of same-bucket prompts) and places each
choice (`Place`); and shapes the decode of the occupied slots (`Decode`). Requests that only
score their prompt (prompt logprobs with max_tokens 0) need no slot: they wait in `scoring`
and one prefill call of them runs each iteration, oldest first, beside the rest. The result
is the ops (`executor.py`) and, for each, what process 0 does with its outputs (`meta`); in a
multi-host run the ops are all that the other processes see.

Structured output: a constrained choice's next-token mask depends on the token it sampled
last, which the host must have read (and fed to the choice's matcher) before that step's
sampling. So while a constrained choice holds a slot, a plan decodes one step, in two
halves: it ends with `Forward` (the model over every occupied slot: its input tokens are
already on the device), then the engine reads every token dispatched so far while the device
runs it, and only then asks `sample()` for the `Sample` op, with the masks filled from the
matchers. Filling the masks overlaps the forward pass; the device waits only for the
sampling's small transfer. A choice placed by the same plan is forwarded with the others:
its first token (sampled by `start_row` under its grammar's start mask) is read in between
too. Unconstrained requests plan as before: `decode_steps` tokens a call.

Prefix cache (`prefix_cache.py`, when the engine has one): a fresh prompt whose first whole
blocks are in the pool prefills only the rest (`Prefill.reads`), and every prefill saves its
whole blocks that are not there yet (`Prefill.writes`). Prompts of one plan that share a
prefix nobody cached yet: the first is prefilled whole, the others after it read its blocks.
Which blocks are read and written is decided here, so every process replays the same.
Prompts whose prompt logprobs are wanted bypass the cache (prefilled whole, as before: their
logprobs need every position's logits), and so do retries of a failed prefill.

Chunked prefill (`chunk` > 0, `--prefill-chunk`): a fresh prompt longer than `chunk` tokens
is not prefilled in one call, which would stall every running stream for the whole prompt's
forward pass. It becomes a `Chunked` job: each plan runs one `Extend` of `chunk` tokens of the
oldest job, beside the decode of the running slots, over a cache kept under the job's prefill
id (the first chunk starts from zeros, or from the prefix cache's blocks of the prompt). Its
choices take their slots when they are admitted, as any choice does, but only *reserve* them
(`Scheduler.reserve`): a reserved slot is no other choice's, yet it does not decode, is in no
decode's shape and no tokens are read for it. The plan of the last chunk places them
(`Place`), after the chunk's op, so the first token they decode is sampled from the whole
prompt. Reserving at admission (rather than taking a slot once the last chunk ran) keeps
admission as it is (oldest first, background limits, yielding), and a finished prompt never
waits for a slot with its cache held. A decode of rows past a reserved slot computes that row
on whatever the slot held (as for a free slot); `insert` and `start_row` overwrite every entry
the choice reads. Prompts whose prompt logprobs are wanted (echo with logprobs,
prompt_logprobs, scoring) and retries of a failed prefill are not chunked: they need every
position's logits, which `extend` does not give. The last chunk saves the prompt's whole
blocks into the prefix cache, as a whole prefill does.

Speculative decoding (`speculation.py`, when the engine has it): each running row proposes
up to K tokens by n-gram lookup, and when that is expected to pay the plan's decode is a
`Verify` instead, which takes 1..K+1 tokens a row (`Speculation`).

Prefills are kept by id until no request needs them: a request holds its prefill until its
last choice is placed or it ends (`release_prefill`), and the next plan drops (`Drop`) what
nobody holds any more (a chunked job that ends early, aborted or past a deadline, with it).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable, Optional

import numpy as np

from pgpt_jax import ngram
from pgpt_jax.executor import Decode, Drop, Extend, Forward, Place, Prefill, Sample, row_args
from pgpt_jax.outputs import RequestOutput
from pgpt_jax.prefix_cache import PrefixIndex, chain
from pgpt_jax.registry import Entry, Registry, Running
from pgpt_jax.scheduler import Scheduler
from pgpt_jax.speculation import Speculation

INTERACTIVE_HOLD_S = 2.0  # batch work keeps to the rows interactive work needed within this long
BATCH_ADMITS = 4  # batch choices admitted a plan while interactive work is about (their prefills delay it)


@dataclasses.dataclass(eq=False)
class Chunked:
    """A prompt prefilled in chunks: where the next chunk starts, and the choices waiting for it."""

    entry: Entry
    pid: int
    length: int  # T: the prompt's bucket, its cache's length
    start: Optional[int] = None  # the next chunk's first position (None: not begun)
    runs: list = dataclasses.field(default_factory=list)  # Running choices holding reserved slots


class Planner:
    """Plans the engine's iterations (see the module docstring); `end(entry, outcome)` is the
    engine's one way to end a request."""

    def __init__(self, registry: Registry, scheduler: Scheduler, *, tokenizer, context_length: int,
                 decode_steps: int, end: Callable, vocab: Optional[int] = None,
                 cache: Optional[PrefixIndex] = None, chunk: int = 0,
                 speculative: Optional[ngram.Speculative] = None):
        self.registry, self.scheduler, self.tokenizer = registry, scheduler, tokenizer
        self.context_length, self.decode_steps, self.end = context_length, decode_steps, end
        self.vocab = vocab  # the padded vocabulary: mask rows are u32[vocab / 32]
        self._drops: list[int] = []  # prefills no request needs any more: dropped by the next plan
        self._users: dict[int, int] = {}  # prefill id -> requests that still need it
        self._next_pid = 0
        self.yielded = 0  # background requests that gave their slots back to interactive work
        self._needs: deque = deque()  # (time, rows interactive work needed) over INTERACTIVE_HOLD_S
        self.scoring: deque = deque()  # started requests that only score their prompt, oldest first
        self.cache = cache  # the prefix cache's index, or None
        self.chunk = chunk  # tokens a chunk of a long prompt's prefill (0: prompts prefill whole)
        self.chunking: dict[int, Chunked] = {}  # prefill id -> its chunked job, oldest first
        # Speculative decoding's proposals and expectations (speculation.py), or None: off.
        self.speculation = Speculation(speculative, scheduler, context_length) if speculative else None

    def plan(self) -> tuple[list, list]:
        """This iteration's ops, and for each what process 0 does with its outputs."""
        ops, meta = [], []
        if self._drops:
            ops.append(Drop(self._drops))
            meta.append(None)
            self._drops = []
        new, aborts = self.registry.take()
        self.registry.enter(new)  # in the registry at once: a fault from here on still answers them
        expired = self.registry.expired(time.monotonic())
        gone = {e.rid for e in aborts}
        for entry in new:
            if entry.rid not in gone:
                self._start(entry, ops, meta)
        for entry, exc in expired:
            self.end(entry, exc)
        for entry in aborts:
            self.end(entry, None)
        self._next_chunk(ops, meta)  # before this plan's prefills: it reads only blocks saved earlier
        self._score(ops, meta)
        self._admissions(ops, meta)
        if self.scheduler.active:
            constrained = self.constrained()
            steps = 1 if constrained else self._steps()
            spec = self.speculation
            guesses = spec.guesses() if spec is not None and steps else {}
            verify = None if constrained or not guesses else spec.verify(guesses)
            if verify is not None:
                ops.append(verify)
                meta.append({s: self.scheduler.owner[s] for s in self.scheduler.occupied})  # not reserved slots
            elif steps:
                window, rows, span = self.scheduler.decode_shape(steps)
                ops.append(Forward(window, rows, span) if constrained else Decode(window, rows, steps, span))
                owners = self.scheduler.advance(steps)
                for run in owners.values():
                    run.dispatched += steps
                if guesses:
                    spec.decoded(owners, steps, guesses, constrained)
                meta.append(owners)
        if self.cache is not None:
            self.cache.unpin_all()  # the ops are in order: later plans may reuse what these read
        return ops, meta

    def _steps(self) -> int:
        """Decode steps for this plan's call, trading tokens per call against latency:
          0  every running choice gets its last token (max_tokens) from calls already sent: a
             call more would only delay the next plan (stop strings and EOS can end one
             sooner; its tokens past the end are dropped as before);
          1  a row is fewer than `decode_steps` tokens from its max_tokens, or choices wait
             for a slot: their turn comes at the next plan, so a short call lets it come sooner;
          `decode_steps` otherwise (every row steady).
        On CPU `decode_steps` is 1 by default (`devices.default_decode_steps`), so the choice is
        only between 0 and 1 there."""
        left = [run.entry.output.max_new - run.dispatched for run in self.scheduler.owner
                if run is not None and run.live and not run.entry.done]
        if max(left, default=0) <= 0:
            return 0
        if min(left) < self.decode_steps or self.scheduler.waiting:
            return 1
        return self.decode_steps

    def constrained(self) -> bool:
        """A constrained choice holds a slot: decode goes one step at a time, in two halves."""
        return any(run is not None and run.choice.matcher is not None for run in self.scheduler.owner)

    def sample(self) -> Sample:
        """The sampling half of the step whose `Forward` the last plan ended with, once the
        engine has fed every token read so far to the matchers: the next-token masks of the
        constrained choices still running, by slot (the other rows need none)."""
        masks = {}
        for slot, run in enumerate(self.scheduler.owner):
            if run is None or run.choice.matcher is None or run.choice.finish is not None or run.entry.done:
                continue
            masks[slot] = np.zeros((-(-self.vocab // 32),), np.uint32)
            run.choice.matcher.fill(masks[slot])
        return Sample(masks)

    def _start(self, entry: Entry, ops: list, meta: list) -> None:
        """A new request: its output side, then its choices wait for slots (holding only token ids)."""
        r = entry.request
        entry.output = self._output(r)
        if entry.output.max_new > 0:
            self.scheduler.enqueue(entry, entry.output.choices, background=r.background)
        elif r.wants_prompt_logprobs:
            self.scoring.append(entry)  # the prompt's logprobs are the answer (`_score`)
        else:  # max_tokens 0: the prompt is the whole answer; no slot, no device
            entry.output.end("length")
            self.end(entry, entry.output.result())

    def _output(self, r):
        return RequestOutput(r, self.tokenizer, max_new=r.max_new(self.context_length),
                             context_length=self.context_length, vocab=self.vocab)

    def _interactive_need(self) -> int:
        """The most rows interactive work needed (scheduler.interactive_need) within the last
        INTERACTIVE_HOLD_S: batch work does not fill the rows one client's next request, or
        one more concurrent client, will want again a moment later, only to give them back."""
        now, need = time.monotonic(), self.scheduler.interactive_need()
        while self._needs and (now - self._needs[0][0] > INTERACTIVE_HOLD_S or self._needs[0][1] <= need):
            self._needs.popleft()
        while self._needs and self._needs[-1][1] <= need:
            self._needs.pop()
        if need:
            self._needs.append((now, need))
        return max((n for _, n in self._needs), default=0)

    def _yield_background(self) -> tuple[int, int, int]:
        """Takes slots back from background requests: every one holding a slot at or above the
        background limit (scheduler.py), then, lowest slots first, as many as waiting
        interactive choices lack below it. Returns the limit, the free slots below it that batch
        work must leave to interactive work (one while interactive work is about), and how many
        batch choices this plan may admit (BATCH_ADMITS while it is about). Each
        such request starts over later (its choices at the front of the background queue, its
        prompt prefilled again) with the same seed, so its answer is the one it would have
        given; what it made is dropped."""
        sched = self.scheduler
        need = self._interactive_need()
        limit = sched.background_limit(need)
        evict = dict.fromkeys(run.entry for s, run in enumerate(sched.owner)  # ordered: a set's is not
                              if run is not None and sched.batch[s] and s >= limit)
        short = sched.shortfall(limit)
        for s in range(limit):
            run = sched.owner[s]
            if short <= 0:
                break
            if run is not None and sched.batch[s] and run.entry not in evict:
                evict[run.entry] = None
                short -= sum(r.slot < limit for r in run.entry.running)
        for entry in evict:
            for run in entry.running:
                run.live = False
                sched.release(run.slot, run)
            entry.running = []
            sched.drop(entry)
            self.release_prefill(entry)
            entry.output = self._output(entry.request)
            entry.unplaced = entry.request.candidates
            sched.enqueue(entry, entry.output.choices, background=True, front=True)
            self.yielded += 1
        return limit, int(need > 0), BATCH_ADMITS if need else sched.slots

    def _score(self, ops: list, meta: list) -> None:
        """One prefill call of the requests that only score their prompt: the oldest one's
        bucket, as many rows as the call takes. One a call per iteration, so that a large
        scoring job shares the engine with the requests that generate."""
        pending = [e for e in self.scoring if not e.done]
        if not pending:
            self.scoring.clear()
            return
        _, _, chunk = self.scheduler.prefill_calls(pending, lambda e: len(e.request.prompt))[0]
        self.scoring = deque(e for e in pending if e not in chunk)
        self.prefills(chunk, True, ops, meta)

    def prefills(self, entries: list, want_logprobs: bool, ops: list, meta: list, alone: bool = False) -> None:
        """One Prefill per group of same-bucket prompts (`Scheduler.prefill_calls`), with prompt
        logprobs for every row when `want_logprobs`; with a prefix cache, see `_cached`. Prompts
        longer than `chunk` become chunked jobs instead (unless `want_logprobs` or `alone`)."""
        if self.chunk and not want_logprobs and not alone:
            long = [e for e in entries if len(e.request.prompt) > self.chunk]
            for e in long:
                pid = self._new_prefill([e])
                self.chunking[pid] = Chunked(e, pid, self.scheduler.bucket(len(e.request.prompt)))
            entries = [e for e in entries if len(e.request.prompt) <= self.chunk]
        if self.cache is not None and not want_logprobs and not alone:
            self._cached(entries, ops, meta)
        else:
            self._calls(entries, want_logprobs, ops, meta, alone)

    def _cached(self, entries: list, ops: list, meta: list) -> None:
        """Prefills through the prefix cache. A prompt whose cached blocks leave a rest worth
        a program of its own (`Scheduler.extend_shape`) reads them and prefills the rest;
        such prompts of one shape share calls as whole prefills of their bucket do. Others are
        prefilled whole, in shared calls as before, saving their blocks; a prompt that would
        find more blocks once those are saved waits for them: its call comes after theirs."""
        Q, sched = self.cache.block_tokens, self.scheduler
        hits, plain, later = [], [], []
        coming: set = set()  # keys of blocks the whole prefills of this plan will save
        for e in entries:
            p = e.request.prompt
            found = len(self.cache.match(p))
            if sched.extend_shape(len(p), found * Q):
                hits.append(e)
                continue
            keys = [k for k, _ in chain(p[:(len(p) - 1) // Q * Q], Q)]
            n = found
            while n < len(keys) and keys[n] in coming:
                n += 1
            if n > found and sched.extend_shape(len(p), n * Q):
                later.append(e)
            else:
                plain.append(e)
                coming.update(k for k, _ in chain(p, Q))
        for e in plain:
            self.cache.record(e.request.prompt, 0)
        self._calls(plain, False, ops, meta)
        # Every reader matched before any of them allocates: a block one reader saves is never
        # read by another reader of the same call. `later` ones find what the calls above save.
        groups: dict = {}
        for e in hits + later:
            p = e.request.prompt
            ids = self.cache.match(p)
            shape = sched.extend_shape(len(p), len(ids) * Q)
            self.cache.record(p, len(ids) if shape else 0)
            groups.setdefault(shape, []).append((e, ids))
        self._calls([e for e, _ in groups.pop(None, [])], False, ops, meta)  # the pool had no room for them
        for (T, R), group in groups.items():
            for chunk in sched.call_chunks(group, T):
                self._extend(chunk, T, R, ops, meta)

    def _extend(self, chunk: list, T: int, R: int, ops: list, meta: list) -> None:
        """One Prefill of (entry, pool ids of its cached blocks) pairs that read those blocks
        into a T-long cache and compute the rest of their prompts (R tokens at most)."""
        Q = self.cache.block_tokens
        rows = next(p for p in self.scheduler.prefill_rows[T] if p >= len(chunk))
        tokens, reads = np.zeros((rows, R), np.int32), np.zeros((rows, T // Q), np.int32)
        start, lengths = np.zeros((rows,), np.int32), np.ones((rows,), np.int32)  # padding rows: read nothing
        for j, (e, ids) in enumerate(chunk):
            p = e.request.prompt
            start[j], lengths[j] = len(ids) * Q, len(p)
            tokens[j, : len(p) - start[j]] = p[start[j]:]
            reads[j, : len(ids)] = ids
        entries = [e for e, _ in chunk]
        pid = self._new_prefill(entries)
        ops.append(Prefill(pid, tokens, lengths, writes=self._writes(entries, T, rows), start=start, reads=reads,
                           length=T))
        meta.append(entries)

    def _writes(self, chunk: list, bucket: int, rows: int) -> Optional[np.ndarray]:
        """Prefill.writes for a call of `rows` rows, `chunk` first, in `bucket`: pool ids for
        each prompt's whole blocks not cached yet (allocated now, so that later prompts of
        this plan find them); padding rows save nothing."""
        if self.cache is None or bucket < self.cache.block_tokens:
            return None
        writes = np.full((rows, bucket // self.cache.block_tokens), self.cache.blocks, np.int32)
        for j, entry in enumerate(chunk):
            for block, pool_id in self.cache.allocate(entry.request.prompt).items():
                writes[j, block] = pool_id
        return writes if (writes < self.cache.blocks).any() else None

    def _new_prefill(self, chunk: list) -> int:
        """A new prefill id, held by each entry of `chunk` as (id, its row)."""
        self._next_pid += 1
        for j, entry in enumerate(chunk):
            self.release_prefill(entry)  # a retry alone replaces the shared call
            entry.prefix = (self._next_pid, j)
        self._users[self._next_pid] = len(chunk)
        return self._next_pid

    def _calls(self, entries: list, want_logprobs: bool, ops: list, meta: list, alone: bool = False) -> None:
        """Whole prefills, one call per group of same-bucket prompts; they save their blocks
        into the prefix cache unless prompt logprobs are wanted or they are retries (`alone`)."""
        calls = self.scheduler.prefill_calls(entries, lambda e: len(e.request.prompt), alone=alone)
        for bucket, rows, chunk in calls:
            pid = self._new_prefill(chunk)
            tokens = np.zeros((rows, bucket), np.int32)
            lengths = np.ones((rows,), np.int32)  # padding rows: one token, never read
            for j, entry in enumerate(chunk):
                tokens[j, : len(entry.request.prompt)] = entry.request.prompt
                lengths[j] = len(entry.request.prompt)
            writes = None if want_logprobs or alone else self._writes(chunk, bucket, rows)
            wanted = (0, 0)
            if want_logprobs:  # what the rows read: top entries (echo's logprobs, prompt_logprobs), ranks
                wanted = (max(max((r.logprobs or 0) if r.echo else 0, r.prompt_logprobs or 0)
                              for r in (e.request for e in chunk)),
                          int(any(e.request.prompt_logprobs is not None for e in chunk)))
            keep = any(e.output.max_new > 0 for e in chunk)  # a choice will be placed from it
            ops.append(Prefill(pid, tokens, lengths, want_logprobs, wanted, keep, writes=writes))
            meta.append(chunk)

    def _admissions(self, ops: list, meta: list) -> None:
        """Places waiting choices in free slots."""
        limit, reserve, most = self._yield_background()
        admitted = list(self.scheduler.admissions(done=lambda e: e.done, limit=limit, reserve=reserve, most=most))
        fresh = list(dict.fromkeys(e for e, _, _ in admitted if e.prefix is None))
        echo = [e for e in fresh if e.request.wants_prompt_logprobs]
        self.prefills(echo, True, ops, meta)  # logits at every prompt position: their own calls
        self.prefills([e for e in fresh if e not in echo], False, ops, meta)
        for entry, choice, slot in admitted:
            run = Running(entry, choice, slot)
            entry.running.append(run)
            self.registry.placed(entry)
            job = self.chunking.get(entry.prefix[0])
            if job is not None:  # its prompt is still prefilled in chunks: the last one places it
                self.scheduler.reserve(slot, run, background=entry.request.background)
                job.runs.append(run)
                continue
            self._place(run, ops, meta)
            if not entry.unplaced:
                self.release_prefill(entry)  # its last choice is placed

    def _place(self, run: Running, ops: list, meta: list) -> None:
        """`run`'s choice into its slot: the prompt's KV, its sampling row and first token."""
        entry, choice = run.entry, run.choice
        length = len(entry.request.prompt)
        self.scheduler.place(run.slot, run, length, background=entry.request.background)
        pid, index = entry.prefix
        mask = None if choice.matcher is None else choice.matcher.mask()  # the grammar's start
        ops.append(Place(pid, index, run.slot, length, row_args(entry.request, entry.seed, choice.index, mask)))
        meta.append(run)

    def _next_chunk(self, ops: list, meta: list) -> None:
        """One chunk (`chunk` tokens) of the oldest chunked job; after its last, its choices are
        placed. Chunk k runs positions [s + k C, s + (k+1) C) from the cached prefix's end s
        (0 without one), except that a chunk starts at T - C at the latest, so that its padding
        stays in the cache (`extend`): it computes again a few positions the cache holds. The
        prefix cache is looked up when the first chunk runs (what it reads must not be evicted
        between plan and op), and the last chunk saves the prompt's blocks. It runs before the
        plan's prefills, so it reads no block a save of this plan writes (one that fails would
        leave it garbage): a job admitted by this plan runs its first chunk at the next one."""
        if not self.chunking:
            return
        job = next(iter(self.chunking.values()))
        entry, C, T = job.entry, self.chunk, job.length
        p = entry.request.prompt
        first, reads = job.start is None, None
        if first:
            job.start = 0
            if self.cache is not None:
                ids = self.cache.match(p)
                self.cache.record(p, len(ids))
                if ids:
                    Q = self.cache.block_tokens
                    reads = np.zeros((1, T // Q), np.int32)
                    reads[0, : len(ids)] = ids
                    job.start = len(ids) * Q
        start = min(job.start, T - C)
        end = min(start + C, len(p))
        tokens = np.zeros((1, C), np.int32)
        tokens[0, : end - start] = p[start:end]
        last = end == len(p)
        writes = self._writes([entry], T, 1) if last else None
        ops.append(Extend(job.pid, tokens, np.array([start], np.int32), np.array([end], np.int32), T, first=first,
                          reads=reads, writes=writes))
        meta.append(entry)
        job.start = end
        if not last:
            return
        del self.chunking[job.pid]
        for run in job.runs:
            if self.scheduler.owner[run.slot] is run and run.live:
                self._place(run, ops, meta)
        if not entry.unplaced:
            self.release_prefill(entry)  # its last choice is placed

    def release_prefill(self, entry: Entry) -> None:
        """`entry` needs its prefill no more; the next plan drops a prefill nobody needs."""
        if entry.prefix is None:
            return
        pid = entry.prefix[0]
        entry.prefix = None
        self._users[pid] -= 1
        if not self._users[pid]:
            del self._users[pid]
            self.chunking.pop(pid, None)  # a job that ends before its last chunk
            self._drops.append(pid)
