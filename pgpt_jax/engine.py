"""The engine: continuous batching of completion requests over a fixed set of device slots.

Threads and queues. One thread owns the engine (its own thread after `start()`, or the
caller of `run_until_idle()` for `generate()`): nothing else touches device state or the
registry. Other threads talk to it through `submit()` and `Handle.abort()`, which only
append to a lock-guarded inbox. Each iteration of the host loop (`step()`):

  1. takes new requests and aborts from the inbox (in a multi-host run, process 0
     broadcasts them first: `multihost.py`) and enters the new ones in the registry;
  2. admits waiting choices into free slots (`scheduler.py` decides which and where):
     `prefill` once per request (n/best_of choices share it; prompts of one bucket that
     arrive together share one call), then per choice `insert` (its KV into the slot) and
     `start_row` (its sampling row, and its first token);
  3. dispatches `decode` for `decode_steps` tokens of the occupied prefix of the slots;
  4. while the device computes that, turns the outputs of the work dispatched earlier
     into text (`outputs.py`) and calls each request's callback with `Delta`s and, at the
     end, one `Result`. Choices that finished free their slots for the next iteration;
     tokens the device made past a finish are discarded.

The registry holds one entry per admitted request, and every way out of it (finished,
aborted, failed) goes through `_end`, so a request ends exactly once. Device programs live
in `programs.py`; shapes are static and every request parameter is a value in an array,
so after `warmup()` nothing compiles again. The engine speaks token ids; the tokenizer is
only used (by `outputs.py`) to turn outputs into text.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import deque
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from pgpt_jax import programs, sampling, sharding
from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.model import GPT
from pgpt_jax.multihost import Iteration, Lockstep
from pgpt_jax.outputs import ChoiceOutput, RequestOutput
from pgpt_jax.request import Limits, QueueFull, Request, Result, validate
from pgpt_jax.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Entry:
    """One admitted request in the registry."""

    rid: int  # the same on every process of a multi-host run
    request: Request
    callback: Callable
    seed: int
    output: Optional[RequestOutput] = None  # made on the engine thread when the request starts
    prefix: Optional[tuple] = None  # (cache, last_logits, index in them, true length): a prefill's output
    unplaced: int = 0  # choices not yet in a slot
    running: list = dataclasses.field(default_factory=list)  # _Running choices in slots
    done: bool = False  # ended (set only by Engine._end)
    aborted: bool = False  # the client left (set from any thread; only silences callbacks)


@dataclasses.dataclass(eq=False)
class _Running:
    """One choice in one slot: what the scheduler's slot table holds."""

    entry: _Entry
    choice: ChoiceOutput
    slot: int


class Handle:
    """Returned by `Engine.submit`; `abort()` is safe from any thread."""

    def __init__(self, engine: "Engine", entry: _Entry):
        self._engine, self._entry = engine, entry

    def abort(self) -> None:
        self._engine._abort(self._entry)

    @property
    def done(self) -> bool:
        return self._entry.done


class Engine:
    """Continuous batching over `slots` device rows; see the module docstring."""

    def __init__(self, model: GPT, tokenizer, *, slots: int = 32, decode_steps: int = 4,
                 limits: Limits = Limits(), min_bucket: int = 16, min_window: int = 128,
                 max_prefill_tokens: int = 1024, mesh: Optional[Mesh] = None):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.context_length = self.config.n_positions
        self.slots, self.decode_steps, self.limits, self.mesh = slots, decode_steps, limits, mesh
        self.top_k = max(limits.max_logprobs, 1)
        self.scheduler = Scheduler(slots, self.context_length, min_bucket=min_bucket, min_window=min_window,
                                   max_prefill_tokens=max_prefill_tokens,
                                   split_slots=mesh is not None and mesh.shape["data"] > 1)
        if mesh is not None:
            sharding.check_mesh(mesh, self.config, slots)
        self.graphdef, self.params, self.head = programs.program_params(model, mesh)
        self.state = programs.init_state(self.config, slots, mesh)
        # FIM control tokens only arrange prompts; a completion never produces them.
        self.never = [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE] if self.config.fim else []
        self._lock = threading.Lock()
        self._inbox: list[_Entry] = []
        self._aborts: list[_Entry] = []
        self._wake = threading.Event()
        self._entries: dict[int, _Entry] = {}  # the registry: every admitted request not yet ended
        self._next_rid = 0
        self._pending: deque = deque()  # dispatched work whose outputs are not processed yet
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._compiles_at_start = programs.compiles_so_far()
        self.lockstep = Lockstep() if jax.process_count() > 1 else None
        self._stop_sent = False
        self.prefill_calls = self.decode_calls = self.generated_tokens = 0

    # ---------------------------------------------------------------- public API

    @property
    def compile_count(self) -> int:
        """XLA compilations since this engine was made (warm-up included)."""
        return programs.compiles_so_far() - self._compiles_at_start

    @property
    def active_slots(self) -> int:
        return self.scheduler.active

    @property
    def queue_depth(self) -> int:
        """Requests not yet taken by the engine thread, plus choices waiting for a slot."""
        with self._lock:
            inbox = len(self._inbox)
        return inbox + len(self.scheduler.waiting)

    def check(self, request: Request) -> None:
        """Raises RequestError for what makes `request` impossible; names the OpenAI field."""
        validate(request, self.limits, self.config.vocab_size, self.context_length)

    def submit(self, request: Request, callback: Callable) -> Handle:
        """Queues `request`; `callback(event)` runs on the engine thread (see request.py)."""
        self.check(request)
        if self.queue_depth >= self.limits.max_queue:
            raise QueueFull("The engine's queue is full; retry later.")
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        with self._lock:
            self._next_rid += 1
            entry = _Entry(self._next_rid, request, callback, seed)
            self._inbox.append(entry)
        self._wake.set()
        return Handle(self, entry)

    def start(self) -> None:
        """Runs the host loop in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="pgpt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run_until_idle(self) -> None:
        """Runs the host loop in the calling thread until no work is left (generate())."""
        while self.step():
            pass

    def run_follower(self) -> None:
        """Processes other than 0: run the same loop, fed by process 0's broadcasts, until it stops."""
        self._running = True
        while self._running:
            self.step()

    def warmup(self, progress: bool = False) -> float:
        """Compiles every program for every shape the scheduler can ask for; returns seconds taken."""
        t0 = time.perf_counter()
        sched = self.scheduler
        prefills = [(rows, b) for b in sched.buckets for rows in sched.prefill_rows[b]]
        decodes = [(rows, w) for w in sched.windows for rows in sched.row_buckets]
        row = self._row(_Entry(0, Request(prompt=[0]), None, 0), 0)
        programs.compile_all(self.graphdef, self.params, self.head, self.state, prefills=prefills,
                             echo_buckets=sched.buckets, decodes=decodes, steps=self.decode_steps,
                             row=row, top_k=self.top_k, mesh=self.mesh, progress=progress)
        self.state = programs.init_state(self.config, self.slots, self.mesh)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the host loop

    def _loop(self) -> None:
        while self._running:
            try:
                busy = self.step()
            except Exception as exc:  # never leave requests hanging on a dead thread
                log.exception("engine iteration failed")
                self._fail_all(exc)
                # A failed call may have consumed the donated state: start from a clean one.
                self.state = programs.init_state(self.config, self.slots, self.mesh)
                busy = False
            if not busy:
                # Idle. In multi-host runs the other processes wait in the next broadcast.
                self._wake.wait(timeout=0.02 if self.lockstep else 0.05)
                self._wake.clear()
        if self.lockstep and not self._stop_sent:
            self._take_inbox()  # carries the stop flag to the other processes
        self._fail_all(RuntimeError("the engine stopped"))

    def step(self) -> bool:
        """One iteration (see the module docstring). Returns False when there is no work."""
        self._take_inbox()
        self._admit()
        if self.scheduler.active:
            self._dispatch_decode()
        # Process everything dispatched before the newest decode while the device runs it.
        keep = 1 if self._pending and self._pending[-1][0] == "decode" else 0
        while len(self._pending) > keep:
            self._process(self._pending.popleft())
        if not self.scheduler.active:
            while self._pending:
                self._process(self._pending.popleft())
        return bool(self._pending or self.scheduler.waiting or self.scheduler.active or self._inbox)

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        if self.lockstep is not None:
            new, aborts = self._exchange(new, aborts)
        for entry in new:
            self._entries[entry.rid] = entry
        gone = {e.rid for e in aborts}
        fresh = [e for e in new if e.rid not in gone and self._start(e)]
        self._prefill(fresh, want_logprobs=False)
        for entry in fresh:
            self._enqueue(entry)
        for entry in aborts:
            self._end(entry, None)

    def _exchange(self, new: list, aborts: list) -> tuple[list, list]:
        """Multi-host: process 0's admissions and aborts become every process's (multihost.py)."""
        it = self.lockstep.exchange(Iteration([(e.rid, e.request, e.seed) for e in new],
                                              [e.rid for e in aborts], stop=not self._running))
        self._stop_sent = it.stop
        if self.lockstep.leader:
            return new, aborts
        if it.stop:
            self._running = False
        new = [_Entry(rid, request, lambda event: None, seed) for rid, request, seed in it.admitted]
        known = {**self._entries, **{e.rid: e for e in new}}
        return new, [known[rid] for rid in it.aborted if rid in known]

    def _abort(self, entry: _Entry) -> None:
        entry.aborted = True
        with self._lock:
            self._aborts.append(entry)
        self._wake.set()

    # ---------------------------------------------------------------- admission and dispatch

    def _start(self, entry: _Entry) -> bool:
        """Sets up a new request. True: it still needs its prefill (the caller batches those
        of one iteration); echo with logprobs is prefilled and queued here, alone."""
        r = entry.request
        entry.output = RequestOutput(r, self.tokenizer, max_new=r.max_new(self.context_length),
                                     context_length=self.context_length)
        if r.echo and r.logprobs is not None:
            self._prefill([entry], want_logprobs=True)
        elif entry.output.max_new > 0:
            return True
        if entry.output.max_new == 0:  # the prompt (and its logprobs, when asked) is the whole answer
            entry.output.end("length")
            self._end(entry, entry.output.result())
        else:
            self._enqueue(entry)
        return False

    def _enqueue(self, entry: _Entry) -> None:
        entry.unplaced = len(entry.output.choices)
        self.scheduler.waiting.extend((entry, c) for c in entry.output.choices)

    def _prefill(self, entries: list, want_logprobs: bool) -> None:
        """Prefills `entries`: one call per group of same-bucket prompts (`Scheduler.prefill_calls`)."""
        calls = self.scheduler.prefill_calls(entries, lambda e: len(e.request.prompt), alone=want_logprobs)
        for bucket, rows, chunk in calls:
            tokens = np.zeros((rows, bucket), np.int32)
            lengths = np.ones((rows,), np.int32)  # padding rows: one token, never read
            for j, entry in enumerate(chunk):
                tokens[j, : len(entry.request.prompt)] = entry.request.prompt
                lengths[j] = len(entry.request.prompt)
            cache, last, lp, top_ids, top_lps = programs.prefill(
                self.graphdef, self.params, self.head, tokens, lengths,
                want_logprobs=want_logprobs, top_k=self.top_k, mesh=self.mesh)
            self.prefill_calls += 1
            for j, entry in enumerate(chunk):
                entry.prefix = (cache, last, j, int(lengths[j]))
            if want_logprobs:
                chunk[0].output.set_prompt_logprobs(np.asarray(lp), np.asarray(top_ids), np.asarray(top_lps))

    def _row(self, entry: _Entry, choice_index: int) -> sampling.SamplingRows:
        r = entry.request
        return sampling.request_row(
            temperature=r.temperature, top_p=r.top_p, presence=r.presence_penalty,
            frequency=r.frequency_penalty, logit_bias=r.logit_bias, banned=self.never,
            num_logprobs=r.logprobs or 0, seed=entry.seed, choice_index=choice_index,
            vocab=self.config.padded_vocab)

    def _admit(self) -> None:
        for entry, choice, slot in self.scheduler.admissions(done=lambda e: e.done):
            cache, last, index, length = entry.prefix
            self.state = programs.insert(self.state, cache, np.int32(index), np.int32(slot), mesh=self.mesh)
            self.state, *outs = programs.start_row(
                self.state, last, np.int32(index), np.int32(slot), np.int32(length),
                self._row(entry, choice.index), top_k=self.top_k, mesh=self.mesh)
            run = _Running(entry, choice, slot)
            entry.running.append(run)
            self.scheduler.place(slot, run, length)
            # Outputs of one row, one step: column 0 of this item stands for `slot`.
            self._pending.append(("insert", {0: run}, outs))
            entry.unplaced -= 1
            if not entry.unplaced:
                entry.prefix = None  # the last copy is placed: drop the prefill's device buffers

    def _dispatch_decode(self) -> None:
        window, rows = self.scheduler.decode_shape(self.decode_steps)
        self.state, *outs = programs.decode(
            self.graphdef, self.params, self.head, self.state, steps=self.decode_steps, window=window,
            rows=rows, top_k=self.top_k, mesh=self.mesh)
        self.decode_calls += 1
        self._pending.append(("decode", self.scheduler.advance(self.decode_steps), outs))

    # ---------------------------------------------------------------- outputs and endings

    def _process(self, item) -> None:
        """Feeds one dispatched call's tokens to the outputs of the choices it ran."""
        kind, owners, outs = item
        toks, lps, top_ids, top_lps = (np.asarray(a) for a in outs)  # waits for that program
        if kind == "insert":  # [1] -> [steps=1, rows=1]
            toks, lps = toks.reshape(1, 1), lps.reshape(1, 1)
            top_ids, top_lps = top_ids.reshape(1, 1, -1), top_lps.reshape(1, 1, -1)
        touched = {}
        for col, run in owners.items():
            entry, c = run.entry, run.choice
            if c.finish is not None or entry.done:
                continue
            for t in range(toks.shape[0]):
                entry.output.add_token(c, int(toks[t, col]), float(lps[t, col]), top_ids[t, col], top_lps[t, col])
                self.generated_tokens += 1
                if c.finish is not None:
                    self.scheduler.release(run.slot, run)
                    break
            touched[entry.rid] = entry
        for entry in touched.values():
            if entry.request.stream:
                for delta in entry.output.deltas():
                    self._call(entry, delta)
            if entry.output.finished:
                self._end(entry, entry.output.result())

    def _end(self, entry: _Entry, outcome) -> None:
        """The one way out of the registry: `outcome` is the Result (finished), an exception
        (failed), or None (aborted: nobody is listening). Frees the request's slots and
        forgets its waiting choices; a request ends exactly once."""
        if entry.done:
            return
        entry.done = True
        self._entries.pop(entry.rid, None)
        for run in entry.running:
            self.scheduler.release(run.slot, run)
        if entry.unplaced:
            self.scheduler.drop(entry)
        entry.prefix = None
        if outcome is None:
            if entry.output is not None:
                entry.output.end("abort")
            return
        if isinstance(outcome, Result) and entry.request.stream:
            for delta in entry.output.deltas():
                self._call(entry, delta)
        self._call(entry, outcome)

    def _fail_all(self, exc: Exception) -> None:
        """Ends every request in flight with `exc` and frees all slots."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for entry in inbox + list(self._entries.values()):
            self._end(entry, exc)
        self.scheduler.clear()
        self._pending.clear()

    def _call(self, entry: _Entry, event) -> None:
        if entry.aborted and not isinstance(event, Exception):
            return
        try:
            entry.callback(event)
        except Exception:  # a broken callback must not take the engine down
            log.exception("request callback failed")
