"""The engine: continuous batching of completion requests over a fixed set of device slots.

Threads and queues. One thread owns the engine (its own thread after `start()`, or the
caller of `run_until_idle()` for `generate()`): nothing else touches device state. Other
threads talk to it through `submit()` and `Handle.abort()`, which only go through the
registry's lock-guarded inbox (`registry.py`). Each iteration of the host loop (`step()`):

  1. takes new requests, aborts and expired deadlines (in a multi-host run, process 0
     broadcasts its decisions first: `multihost.py`); a waiting request holds only its
     token ids;
  2. admits waiting choices into free slots (`scheduler.py` decides which and where):
     `prefill` once per request when its first choice gets a slot (n/best_of choices share
     it; prompts of one bucket admitted together share one call), then per choice `insert`
     (its KV into the slot) and `start_row` (its sampling row, and its first token);
  3. dispatches `decode` for `decode_steps` tokens of the occupied prefix of the slots;
  4. while the device computes that, turns the outputs of the work dispatched earlier
     into text (`outputs.py`) and calls each request's callback with `Delta`s and, at the
     end, one `Result`. Choices that finished free their slots for the next iteration;
     tokens the device made past a finish are discarded.

Faults. A device call that raises fails the requests it ran (the others go on); if it
consumed the donated state, every running request lost its cache and fails, and the
engine continues from a fresh state. Every ending goes through `_end` (then
`Registry.end`), so a request ends exactly once. If the loop itself dies, every request
gets an `EngineUnavailable` at once and `alive` turns False.

Device programs live in `programs.py`; shapes are static and every request parameter is a
value in an array, so after `warmup()` nothing compiles again. The engine speaks token ids;
the tokenizer is only used (by `outputs.py`) to turn outputs into text.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from pgpt_jax import programs, sampling, sharding
from pgpt_jax.model import GPT
from pgpt_jax.multihost import Iteration, Lockstep
from pgpt_jax.outputs import RequestOutput
from pgpt_jax.registry import Entry, Handle, Registry, Running
from pgpt_jax.request import EngineUnavailable, Limits, Request, Result, validate
from pgpt_jax.scheduler import Scheduler

log = logging.getLogger(__name__)

LIVENESS_S = 60.0  # an engine thread whose last iteration began longer ago than this is hung


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
        self.never = list(self.config.never_emitted)  # control tokens: banned from every row
        self._wake = threading.Event()
        budget = limits.max_queued_tokens or 8 * slots * self.context_length
        self.registry = Registry(limits, budget, self._wake.set)
        self._pending: list = []  # dispatched work whose outputs are not processed yet
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._stop_why = "The engine stopped."
        self.heartbeat = time.monotonic()  # when the loop last began an iteration
        self.dead: Optional[BaseException] = None  # what killed the loop, if something did
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
        """Choices accepted and waiting for a slot."""
        return self.registry.queued_choices

    @property
    def requests_waiting(self) -> int:
        """Requests accepted with no choice in a slot yet (the gateways' queued requests)."""
        return self.registry.waiting_requests

    @property
    def requests_running(self) -> int:
        return self.registry.running_requests

    @property
    def kv_cache_usage(self) -> float:
        """The share of the KV cache held by requests, 0..1: each running choice holds one
        slot's rows of the preallocated cache, so this is the share of slots in use."""
        return self.scheduler.active / self.slots

    @property
    def alive(self) -> bool:
        """False once the loop died or stopped; a running loop must have begun an iteration lately."""
        if self.dead is not None or self.registry.closed is not None:
            return False
        if self._thread is None:  # generate(): the caller drives the loop
            return True
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < LIVENESS_S

    def check(self, request: Request) -> None:
        """Raises RequestError for what makes `request` impossible; names the OpenAI field."""
        validate(request, self.limits, self.config.vocab_size, self.context_length, self.never)

    def submit(self, request: Request, callback: Callable) -> Handle:
        """Queues `request`; `callback(event)` runs on the engine thread (see request.py)."""
        return self.submit_all([request], [callback])[0]

    def submit_all(self, requests: Sequence[Request], callbacks: Sequence[Callable]) -> list[Handle]:
        """Queues all of `requests` (the prompts of one HTTP request) or none: RequestError,
        QueueFull (over the queue's budget) or EngineUnavailable (stopping, stopped, dead)."""
        for r in requests:
            self.check(r)
        return self.registry.submit(requests, callbacks, lambda r: r.max_new(self.context_length))

    def start(self) -> None:
        """Runs the host loop in a daemon thread until `stop()` (a stopped engine may start again)."""
        if self._thread is not None:
            return
        if self.dead is not None:
            raise EngineUnavailable(f"The engine died ({self.dead!r}); make a new one.")
        self.registry.closed = None
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="pgpt-engine", daemon=True)
        self._thread.start()

    def stop(self, why: str = "The engine stopped.", reopen: bool = False) -> None:
        """Stops the loop; every request not yet ended gets EngineUnavailable(why), and later
        submits are refused until `start()`. `reopen`: accept work again at once, for a caller
        that goes on driving the loop itself (`run_until_idle`)."""
        self._stop_why = why
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        else:
            self._close(EngineUnavailable(why))
        if reopen and self.dead is None:
            self.registry.closed = None

    def run_until_idle(self) -> None:
        """Runs the host loop in the calling thread until no work is left (generate())."""
        while self.step():
            pass

    def run_follower(self) -> None:
        """Processes other than 0: run the same loop, fed by process 0's broadcasts, until it stops."""
        self._running = True
        while self._running:
            self.step()

    def warmup(self, progress: bool = False, on_program: Optional[Callable[[int, int], None]] = None) -> float:
        """Compiles every program for every shape the scheduler can ask for; returns seconds taken.
        `progress` draws a bar; `on_program(done, total)` is called after each program."""
        t0 = time.perf_counter()
        sched = self.scheduler
        prefills = [(rows, b) for b in sched.buckets for rows in sched.prefill_rows[b]]
        decodes = [(rows, w) for w in sched.windows for rows in sched.row_buckets]
        row = self._row(Entry(0, Request(prompt=[0]), None, 0), 0)
        programs.compile_all(self.graphdef, self.params, self.head, self.state, prefills=prefills,
                             echo_buckets=sched.buckets, decodes=decodes, steps=self.decode_steps,
                             row=row, top_k=self.top_k, mesh=self.mesh, progress=progress,
                             on_program=on_program)
        self.state = programs.init_state(self.config, self.slots, self.mesh)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the host loop

    def _loop(self) -> None:
        why = EngineUnavailable("The engine died.")
        try:
            while self._running:
                self.heartbeat = time.monotonic()
                try:
                    busy = self.step()
                except Exception as exc:  # a fault no single request owns: fail all in flight
                    log.exception("engine iteration failed")
                    self._close(exc, refuse=False)
                    busy = False
                if not busy:
                    # Idle. In multi-host runs the other processes wait in the next broadcast.
                    self._wake.wait(timeout=0.02 if self.lockstep else 0.05)
                    self._wake.clear()
            if self.lockstep and not self._stop_sent:
                self._take_inbox()  # carries the stop flag to the other processes
            why = EngineUnavailable(self._stop_why)
        except BaseException as exc:
            log.critical("the engine loop died", exc_info=exc)
            self.dead = exc
            why = EngineUnavailable(f"The engine died ({type(exc).__name__}: {exc}); the server must restart.")
            raise
        finally:
            self._close(why)

    def _close(self, why: BaseException, refuse: bool = True) -> None:
        """Ends every request not yet ended with `why`. With `refuse` (stopping) the inbox's too,
        and the engine takes no more; without (it goes on) it starts again from a fresh state,
        since the failed call may have consumed the donated one."""
        gone = self.registry.close(why) if refuse else list(self.registry.entries.values())
        for entry in gone:
            self._end(entry, why)
        self.scheduler.clear()
        self._pending.clear()
        if not refuse:
            self.state = programs.init_state(self.config, self.slots, self.mesh)

    def step(self) -> bool:
        """One iteration (see the module docstring). Returns False when there is no work."""
        self._take_inbox()
        self._admit()
        if self.scheduler.active:
            self._dispatch_decode()
        # Process everything dispatched before the newest decode while the device runs it.
        keep = 1 if self._pending and self._pending[-1][0] == "decode" else 0
        while len(self._pending) > keep:
            self._process(self._pending.pop(0))
        if not self.scheduler.active:
            while self._pending:
                self._process(self._pending.pop(0))
        return bool(self._pending or self.scheduler.waiting or self.scheduler.active or self.registry.inbox)

    def _take_inbox(self) -> None:
        new, aborts = self.registry.take()
        self.registry.enter(new)  # in the registry at once: a fault from here on still answers them
        leader = self.lockstep is None or self.lockstep.leader
        expired = self.registry.expired(time.monotonic()) if leader else []  # process 0 keeps the time
        if self.lockstep is not None:
            new, aborts = self._exchange(new, aborts, expired)
            self.registry.enter(new)
        gone = {e.rid for e in aborts}
        for entry in new:
            if entry.rid not in gone:
                self._start(entry)
        for entry, exc in expired:
            self._end(entry, exc)
        for entry in aborts:
            self._end(entry, None)

    def _exchange(self, new: list, aborts: list, expired: list) -> tuple[list, list]:
        """Multi-host: process 0's admissions and endings become every process's (multihost.py)."""
        ended = [e.rid for e in aborts] + [e.rid for e, _ in expired]
        it = self.lockstep.exchange(Iteration([(e.rid, e.request, e.seed) for e in new], ended,
                                              stop=not self._running))
        self._stop_sent = it.stop
        if self.lockstep.leader:
            return new, aborts
        if it.stop:
            self._running = False
        new = [Entry(rid, request, lambda event: None, seed) for rid, request, seed in it.admitted]
        known = {**self.registry.entries, **{e.rid: e for e in new}}
        return new, [known[rid] for rid in it.aborted if rid in known]

    # ---------------------------------------------------------------- admission and dispatch

    def _start(self, entry: Entry) -> None:
        """A new request: its output side, then its choices wait for slots (holding only token ids)."""
        r = entry.request
        entry.output = RequestOutput(r, self.tokenizer, max_new=r.max_new(self.context_length),
                                     context_length=self.context_length)
        if entry.output.max_new > 0:
            self.scheduler.waiting.extend((entry, c) for c in entry.output.choices)
            return
        # max_tokens 0: the prompt (and its logprobs, when asked) is the whole answer; no slot.
        if r.echo and r.logprobs is not None:
            self._prefill([entry], want_logprobs=True)
        if not entry.done:
            entry.output.end("length")
            self._end(entry, entry.output.result())

    def _prefill(self, entries: list, want_logprobs: bool, alone: bool = False) -> None:
        """Prefills `entries`: one call per group of same-bucket prompts (`Scheduler.prefill_calls`).
        When a shared call raises, each of its prompts is tried alone, so that only the request
        that causes the fault fails."""
        alone = alone or want_logprobs
        calls = self.scheduler.prefill_calls(entries, lambda e: len(e.request.prompt), alone=alone)
        for bucket, rows, chunk in calls:
            tokens = np.zeros((rows, bucket), np.int32)
            lengths = np.ones((rows,), np.int32)  # padding rows: one token, never read
            for j, entry in enumerate(chunk):
                tokens[j, : len(entry.request.prompt)] = entry.request.prompt
                lengths[j] = len(entry.request.prompt)
            try:
                cache, last, lp, top_ids, top_lps = programs.prefill(
                    self.graphdef, self.params, self.head, tokens, lengths,
                    want_logprobs=want_logprobs, top_k=self.top_k, mesh=self.mesh)
                if want_logprobs:
                    chunk[0].output.set_prompt_logprobs(np.asarray(lp), np.asarray(top_ids), np.asarray(top_lps))
            except Exception as exc:
                if len(chunk) > 1:
                    self._prefill(chunk, want_logprobs, alone=True)
                    continue
                log.error("prefill failed: %r", exc)
                self._end(chunk[0], exc)
                continue
            self.prefill_calls += 1
            for j, entry in enumerate(chunk):
                entry.prefix = (cache, last, j, int(lengths[j]))

    def _row(self, entry: Entry, choice_index: int) -> sampling.SamplingRows:
        r = entry.request
        return sampling.request_row(
            temperature=r.temperature, top_p=r.top_p, presence=r.presence_penalty,
            frequency=r.frequency_penalty, logit_bias=r.logit_bias, banned=self.never,
            num_logprobs=r.logprobs or 0, seed=entry.seed, choice_index=choice_index,
            vocab=self.config.padded_vocab)

    def _admit(self) -> None:
        admitted = list(self.scheduler.admissions(done=lambda e: e.done))
        fresh = list(dict.fromkeys(e for e, _, _ in admitted if e.prefix is None))
        echo = [e for e in fresh if e.request.echo and e.request.logprobs is not None]
        self._prefill(echo, want_logprobs=True)  # alone: logits at every prompt position
        self._prefill([e for e in fresh if e not in echo], want_logprobs=False)
        for entry, choice, slot in admitted:
            if entry.done:  # its prefill failed
                continue
            cache, last, index, length = entry.prefix
            try:
                self.state = programs.insert(self.state, cache, np.int32(index), np.int32(slot), mesh=self.mesh)
                self.state, *outs = programs.start_row(
                    self.state, last, np.int32(index), np.int32(slot), np.int32(length),
                    self._row(entry, choice.index), top_k=self.top_k, mesh=self.mesh)
            except Exception as exc:
                self._device_fault(exc, [entry])
                continue
            run = Running(entry, choice, slot)
            entry.running.append(run)
            self.scheduler.place(slot, run, length)
            self.registry.placed(entry)
            # Outputs of one row, one step: column 0 of this item stands for `slot`.
            self._pending.append(("insert", {0: run}, outs))
            if not entry.unplaced:
                entry.prefix = None  # the last copy is placed: drop the prefill's device buffers

    def _dispatch_decode(self) -> None:
        window, rows = self.scheduler.decode_shape(self.decode_steps)
        try:
            self.state, *outs = programs.decode(
                self.graphdef, self.params, self.head, self.state, steps=self.decode_steps, window=window,
                rows=rows, top_k=self.top_k, mesh=self.mesh)
        except Exception as exc:
            self._device_fault(exc, [run.entry for run in self.scheduler.owner if run is not None])
            return
        self.decode_calls += 1
        self._pending.append(("decode", self.scheduler.advance(self.decode_steps), outs))

    def _device_fault(self, exc: Exception, touched: list) -> None:
        """A device call raised: the requests it ran fail. If it consumed the donated state,
        every running request lost its cache: they fail too, and a fresh state replaces it."""
        log.error("a device call failed for %d request(s): %r", len(set(touched)), exc)
        if any(a.is_deleted() for a in jax.tree.leaves(self.state)):
            touched = touched + [run.entry for run in self.scheduler.owner if run is not None]
            self.state = programs.init_state(self.config, self.slots, self.mesh)
        for entry in dict.fromkeys(touched):
            self._end(entry, exc)

    # ---------------------------------------------------------------- outputs and endings

    def _process(self, item) -> None:
        """Feeds one dispatched call's tokens to the outputs of the choices it ran."""
        kind, owners, outs = item
        try:
            toks, lps, top_ids, top_lps = (np.asarray(a) for a in outs)  # waits for that program
        except Exception as exc:  # the call failed while it ran
            self._device_fault(exc, [run.entry for run in owners.values()])
            return
        if kind == "insert":  # [1] -> [steps=1, rows=1]
            toks, lps = toks.reshape(1, 1), lps.reshape(1, 1)
            top_ids, top_lps = top_ids.reshape(1, 1, -1), top_lps.reshape(1, 1, -1)
        touched = {}
        for col, run in owners.items():
            entry, c = run.entry, run.choice
            if c.finish is not None or entry.done:
                continue
            touched[entry.rid] = entry
            try:
                for t in range(toks.shape[0]):
                    entry.output.add_token(c, int(toks[t, col]), float(lps[t, col]), top_ids[t, col],
                                           top_lps[t, col])
                    self.generated_tokens += 1
                    if c.finish is not None:
                        self.scheduler.release(run.slot, run)
                        break
            except Exception as exc:  # a fault in one request's output side fails only it
                log.exception("output processing failed")
                self._end(entry, exc)
        for entry in touched.values():
            try:
                if entry.request.stream and not entry.done:
                    for delta in entry.output.deltas():
                        self.registry.deliver(entry, delta)
                if not entry.done and entry.output.finished:
                    self._end(entry, entry.output.result())
            except Exception as exc:
                log.exception("output processing failed")
                self._end(entry, exc)

    def _end(self, entry: Entry, outcome) -> None:
        """The one way out: frees the request's slots and waiting choices, sends what a stream
        still holds when it finished, then `Registry.end` (the Result, an exception, or None
        when the client left)."""
        if entry.done:
            return
        for run in entry.running:
            self.scheduler.release(run.slot, run)
        if entry.unplaced:
            self.scheduler.drop(entry)
        if isinstance(outcome, Result) and entry.request.stream:
            for delta in entry.output.deltas():
                self.registry.deliver(entry, delta)
        self.registry.end(entry, outcome)
