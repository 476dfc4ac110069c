"""The engine: continuous batching of completion requests over a fixed set of device slots.

Threads and queues. One thread owns the engine (its own thread after `start()`, or the
caller of `run_until_idle()` for `generate()`): nothing else touches device state. Other
threads talk to it through `submit()` and `Handle.abort()`, which only go through the
registry's lock-guarded inbox (`registry.py`). Each iteration of the host loop (`step()`):

  1. plans (process 0 decides everything): takes new requests, aborts and expired
     deadlines; pairs waiting choices with free slots (`scheduler.py`); a request is
     prefilled when its first choice gets a slot (n/best_of choices share it; prompts of
     one bucket admitted together share one call; with the prefix cache a prompt whose
     first blocks are cached prefills only the rest; with `prefill_chunk` a longer prompt
     prefills one chunk an iteration, its choices placed after the last one: planner.py),
     each choice is placed (`insert` its KV,
     `start_row` its sampling row and first token), and the occupied prefix of the slots
     decodes `decode_steps` tokens (or, while a constrained choice runs, one token in two
     halves: the planner's `Forward`, then its `Sample` once the host has read the tokens
     dispatched earlier and filled the masks while the forward ran; with speculative
     decoding, a `Verify` of the rows' n-gram proposals when it is expected to pay: 1..K+1
     tokens a row, planner.py). The plan is a list of ops (`executor.py`);
  2. in a multi-host run, broadcasts the ops (`multihost.py`): the other processes replay
     them and decide nothing;
  3. executes the ops (`Executor`);
  4. while the device computes the decode, turns the outputs of the work dispatched
     earlier into text (`outputs.py`) and calls each request's callback with `Delta`s and,
     at the end, one `Result`. Choices that finished free their slots for the next plan;
     tokens the device made past a finish are discarded.

Faults. On one process, a device call that raises fails the requests it ran (a shared
prefill is retried prompt by prompt first; a failing chunk fails its one request) and the
others go on; if it consumed the donated
state, every running request fails and a fresh state replaces it. A failed prefill's prefix
cache blocks are forgotten, and a later prefill of the iteration that would read them runs
whole (a consumed pool starts again empty): `faults.py`. In a multi-host run any
fault, and a group that stops answering (`lockstep_timeout`), is fatal: every request gets
an error and `on_fatal` is called (the server exits non-zero so the group restarts). Every
ending goes through `_end` (then `Registry.end`), so a request ends exactly once. If the
loop itself dies, every request gets `EngineUnavailable` at once and `alive` turns False.

Shapes are static and every request parameter is a value in an array, so after
`warmup()` (`warmup.py`) nothing compiles again. The engine speaks token ids; the
tokenizer is only used (by `outputs.py`) to turn outputs into text.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from pgpt_jax import attention, grammar, ngram, sharding, timeline, warmup
from pgpt_jax.executor import Decode, Drop, Executor, Extend, Forward, Place, Prefill, Sample, Verify
from pgpt_jax.faults import Faults
from pgpt_jax.model import GPT
from pgpt_jax.multihost import Lockstep, Watchdog, follow
from pgpt_jax.planner import Planner
from pgpt_jax.prefix_cache import BLOCK_TOKENS, PrefixIndex
from pgpt_jax.registry import Entry, Handle, Registry
from pgpt_jax.request import EngineUnavailable, Limits, Request, RequestError, Result, validate
from pgpt_jax.scheduler import Scheduler

log = logging.getLogger(__name__)

LIVENESS_S = 60.0  # an engine thread whose last iteration began longer ago than this is hung


class GroupBroken(BaseException):
    """Multi-host: a fault or a silent process broke the lockstep; nothing can go on."""


class Engine:
    """Continuous batching over `slots` device rows; see the module docstring."""

    def __init__(self, model: GPT, tokenizer, *, slots: int = 32, decode_steps: int = 4,
                 limits: Limits = Limits(), min_bucket: int = 16, min_window: int = 128,
                 max_prefill_tokens: int = 1024, mesh: Optional[Mesh] = None,
                 lockstep_timeout: float = 30.0, on_fatal: Optional[Callable[[BaseException], None]] = None,
                 batch_slack: float = 1.25, xla_options: Optional[str] = None, prefix_cache_blocks: int = 0,
                 prefill_chunk: int = 0, speculative: Optional[str | ngram.Speculative] = None):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.context_length = self.config.n_positions
        self.slots, self.decode_steps, self.limits, self.mesh = slots, decode_steps, limits, mesh
        self.top_k = max(limits.max_logprobs, 1)
        self.scheduler = Scheduler(slots, self.context_length, min_bucket=min_bucket, min_window=min_window,
                                   max_prefill_tokens=max_prefill_tokens,
                                   split_slots=mesh is not None and mesh.shape["data"] > 1, batch_slack=batch_slack,
                                   reads_by_position=self._reads_by_position)
        if mesh is not None:
            sharding.check_mesh(mesh, self.config, slots)
        if prefill_chunk >= self.context_length:
            prefill_chunk = 0  # no prompt is longer
        if prefill_chunk and prefill_chunk not in self.scheduler.buckets:
            raise ValueError(f"prefill_chunk must be 0 or a prompt bucket {self.scheduler.buckets}, not {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # prompts longer than this prefill in chunks of it (planner.py)
        # The prefix cache: an index on process 0's host, a pool of KV blocks on the devices.
        self.prefix_cache = PrefixIndex(prefix_cache_blocks) if prefix_cache_blocks > 0 else None
        # Speculative decoding: "ngram:K[:MIN-MAX]" (ngram.parse) or a Speculative; None: off.
        self.speculative = ngram.parse(speculative) if isinstance(speculative, (str, type(None))) else speculative
        self.executor = Executor(model, slots=slots, decode_steps=decode_steps, top_k=self.top_k, mesh=mesh,
                                 prefix_blocks=max(prefix_cache_blocks, 0), block_tokens=BLOCK_TOKENS,
                                 verify_k=self.speculative.k if self.speculative else 0)
        self.never = self.executor.never
        self._wake = threading.Event()
        budget = limits.max_queued_tokens or 8 * slots * self.context_length
        self.registry = Registry(limits, budget, self._wake.set)
        self._pending: list = []  # dispatched work whose outputs are not processed yet
        self.planner = Planner(self.registry, self.scheduler, tokenizer=tokenizer,
                               context_length=self.context_length, decode_steps=decode_steps, end=self._end,
                               vocab=self.config.padded_vocab, cache=self.prefix_cache, chunk=prefill_chunk,
                               speculative=self.speculative)
        self._forwarded: Optional[dict] = None  # this step's Forward ran: {slot: owner} for its Sample
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._stop_why = "The engine stopped."
        self.heartbeat = time.monotonic()  # when the loop last began an iteration
        self.dead: Optional[BaseException] = None  # what killed the loop, if something did
        self._compiles_at_start = _compiles()
        self.lockstep = Lockstep() if jax.process_count() > 1 else None
        self.faults = Faults(self.executor, self.planner, self.scheduler, self.prefix_cache, end=self._end,
                             execute=self._execute, multihost=self.lockstep is not None)
        self.lockstep_timeout, self.on_fatal = lockstep_timeout, on_fatal
        self._watchdog: Optional[Watchdog] = None
        self._stop_sent = False
        self.prefill_calls = self.decode_calls = self.generated_tokens = 0
        self.spec_proposed_tokens = self.spec_accepted_tokens = 0  # speculative decoding's proposals, and those taken
        # XLA:CPU options: None keeps the process's choice, "auto" measures at warm-up, else a set's name.
        self.xla_options = xla_options
        self.option_times: dict = {}  # rows -> {option set: seconds per decode call}, when measured
        self.options_note = "XLA defaults"  # what choose_options decided, for the start-up line

    # ---------------------------------------------------------------- public API

    graphdef = property(lambda self: self.executor.graphdef)
    params = property(lambda self: self.executor.params)
    head = property(lambda self: self.executor.head)
    state = property(lambda self: self.executor.state)

    @property
    def compile_count(self) -> int:
        """XLA compilations since this engine was made (warm-up included)."""
        return _compiles() - self._compiles_at_start

    @property
    def batch_yields(self) -> int:
        """Times background (batch) requests gave their slots back to interactive work."""
        return self.planner.yielded

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
        slot's rows of the preallocated cache, so this is the share of slots in use (reserved
        for a prompt still prefilled in chunks too)."""
        return sum(o is not None for o in self.scheduler.owner) / self.slots

    # The prefix cache for /metrics (zeros without one): pool blocks in all and holding a
    # cached prompt block; prompt tokens looked up and served from it, and their ratio.
    prefix_cache_blocks = property(lambda self: self.prefix_cache.blocks if self.prefix_cache else 0)
    prefix_cache_blocks_used = property(lambda self: self.prefix_cache.used if self.prefix_cache else 0)
    prefix_cache_queried_tokens = property(lambda self: self.prefix_cache.queried_tokens if self.prefix_cache else 0)
    prefix_cache_hit_tokens = property(lambda self: self.prefix_cache.hit_tokens if self.prefix_cache else 0)
    prefix_cache_hit_rate = property(
        lambda self: self.prefix_cache_hit_tokens / max(self.prefix_cache_queried_tokens, 1))

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
        k = request.constraint
        if k is not None:  # compiled here, on the caller's thread: the engine thread finds it cached
            try:
                grammar.compile(k.kind, k.spec, self.tokenizer, self.config.padded_vocab)
            except ValueError as exc:
                raise RequestError(f"Invalid {k.param}: {exc}", k.param) from None

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
        self.heartbeat = time.monotonic()
        if self.lockstep is not None:
            self._watchdog = Watchdog(self.lockstep_timeout, self._stalled)
        self._thread = threading.Thread(target=self._loop, name="pgpt-engine", daemon=True)
        self._thread.start()

    def stop(self, why: str = "The engine stopped.", reopen: bool = False) -> None:
        """Stops the loop; every request not yet ended gets EngineUnavailable(why), and later
        submits are refused until `start()`. `reopen`: accept work again at once, for a caller
        that goes on driving the loop itself (`run_until_idle`)."""
        self._stop_why = why
        self._running = False
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        else:
            self._close(EngineUnavailable(why))
        if reopen and self.dead is None:
            self.registry.closed = None

    def run_until_idle(self) -> None:
        """Runs the host loop in the calling thread until no work is left (generate())."""
        while self.step() or self.scheduler.background:
            time.sleep(0.0 if self.scheduler.active or self.planner.chunking else 0.01)  # batch work held back

    def run_follower(self) -> None:
        """Processes other than 0: replay process 0's ops until it stops (multihost.follow)."""
        follow(self.executor, self.lockstep, self.lockstep_timeout, self.on_fatal)

    def _reads_by_position(self, rows: int) -> bool:
        """Whether a decode call of `rows` rows reads only what its positions need (the native
        kernel, or in blocks; the scheduler gives those one window: scheduler.py)."""
        cfg = self.config
        return attention.reads_by_position(self.model.h[0].attn.implementation, jax.default_backend(), cfg.dtype,
                                           cfg.head_dim, rows, self.context_length)

    def warmup(self, progress: bool = False, on_program: Optional[Callable[[int, int], None]] = None) -> float:
        """Compiles every program for every shape the scheduler can ask for (and, multi-host,
        the broadcast); returns seconds taken. `progress` draws a bar; `on_program(done,
        total)` is called after each program (warmup.py)."""
        return warmup.warmup(self, progress, on_program)

    def measure_costs(self) -> None:
        """Times a decode call of each row bucket and, with speculation, a Verify's against it
        (warmup.py). Process 0 alone, on compiled programs; leaves a fresh state."""
        warmup.measure_costs(self)

    def choose_options(self) -> None:
        """Chooses the XLA:CPU option sets for this engine's programs: forced, remembered or
        measured (warmup.py)."""
        warmup.choose_options(self)

    # ---------------------------------------------------------------- the host loop

    def _loop(self) -> None:
        why: BaseException = EngineUnavailable("The engine died.")
        try:
            while self._running:
                self.heartbeat = time.monotonic()
                if self._watchdog is not None:
                    self._watchdog.beat()
                try:
                    busy = self.step()
                except Exception as exc:  # a fault no single request owns: fail all in flight
                    if self.lockstep is not None:
                        raise GroupBroken(repr(exc)) from exc
                    log.exception("engine iteration failed")
                    self._close(exc, refuse=False)
                    busy = False
                if not busy:
                    # Idle until new work wakes the loop. In a multi-host run the other processes
                    # wait in the next broadcast meanwhile (each costs every process a collective).
                    self._wake.wait(timeout=0.1 if self.lockstep else 0.05)
                    self._wake.clear()
            if self.lockstep and not self._stop_sent:
                self._stop_sent = True
                self.lockstep.send([], stop=True)  # the other processes leave their loops too
            why = EngineUnavailable(self._stop_why)
        except BaseException as exc:
            log.critical("the engine loop died", exc_info=exc)
            self.dead = exc
            why = EngineUnavailable(f"The engine died ({type(exc).__name__}: {exc}); the server must restart.")
            raise
        finally:
            self._close(why)
            if self.dead is not None and self.lockstep is not None and self.on_fatal is not None:
                self.on_fatal(self.dead)

    def _stalled(self, seconds: float) -> None:
        """Watchdog thread, multi-host: an iteration has hung in a collective (a process died)."""
        exc = GroupBroken(f"an engine iteration has not ended for {seconds:.0f} s: a process of the group is gone")
        log.critical("%s", exc)
        self.dead = exc
        self._close(EngineUnavailable(f"{exc}; the server restarts."))
        if self.on_fatal is not None:
            self.on_fatal(exc)

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
            self.executor.reset()
            if self.prefix_cache is not None and self.executor.pool_lost():
                self.executor.reset_pool()
                self.prefix_cache.clear()

    def step(self) -> bool:
        """One iteration (see the module docstring). Returns False when there is no work to do now
        (batch work held back for interactive work does not count)."""
        self.faults.new_plan()
        self._forwarded = None
        ops, meta = self.planner.plan()
        if self.lockstep is not None:
            self._stop_sent = not self._running
            self.lockstep.send(ops, stop=self._stop_sent)
        self._execute(ops, meta)
        if self._forwarded is not None:
            # A constrained step's forward runs: read every token dispatched before it (the
            # matchers take them), then its sampling goes out under the masks they give.
            while self._pending:
                self._process(self._pending.pop(0))
            sample = [self.planner.sample()]
            if self.lockstep is not None and not self._stop_sent:  # (a stopping group has left)
                self.lockstep.send(sample)
            self._execute(sample, [self._forwarded])
        # Process everything dispatched before the newest decode while the device runs it (all
        # of it when this plan sent no decode: the rows' last tokens are in flight).
        decoded = any(isinstance(op, (Decode, Forward, Verify)) for op in ops)
        keep = 1 if decoded and self._pending and self._pending[-1][0] in ("decode", "verify") else 0
        while len(self._pending) > keep:
            self._process(self._pending.pop(0))
        if not self.scheduler.active:
            while self._pending:
                self._process(self._pending.pop(0))
        # Batch work that waits alone is not a reason to spin: it waits for interactive work to
        # leave (planner.INTERACTIVE_HOLD_S), and the loop's idle wait re-plans soon enough.
        return bool(self._pending or self.scheduler.waiting or self.scheduler.active or self.registry.inbox
                    or self.planner.scoring or self.planner.chunking)

    # ---------------------------------------------------------------- execution (every process)

    def _execute(self, ops: list, meta: list) -> None:
        for op, m in zip(ops, meta):
            if isinstance(op, Place) and self.lockstep is None:
                if m.entry.done:  # its prefill failed here (alone, so no other process runs it)
                    continue
                op.pid, op.index = self.faults.moved.get((op.pid, op.index), (op.pid, op.index))
            if isinstance(op, Prefill) and self.faults.reads_lost(op):
                self.faults.retry_alone(op, m)  # what it would read was never saved: prefill it whole
                continue
            try:
                t0 = time.perf_counter()
                out = self.executor.run(op)
                if timeline.ON:
                    timeline.ran(op, m, t0, out, self.executor)
                if isinstance(op, Prefill) and op.want_logprobs:
                    out = tuple(np.asarray(a) for a in out)  # errors of the call surface here
            except Exception as exc:
                if self.lockstep is not None:
                    raise
                if isinstance(op, Prefill):
                    self.faults.prefill_fault(op, m, exc)
                elif isinstance(op, Extend):  # one chunk of one prompt: only its request fails
                    self.faults.chunk_fault(op, m, exc)
                elif not isinstance(op, Drop):
                    self.faults.device_fault(exc, [m.entry] if isinstance(op, Place) else [r.entry for r in m.values()])
                continue
            if isinstance(op, (Prefill, Extend)):
                self.prefill_calls += 1
            if isinstance(op, Prefill):
                for j, entry in enumerate(m if op.want_logprobs else ()):
                    entry.output.set_prompt_logprobs(*(a[j] for a in out))
                    if entry.output.max_new == 0:
                        entry.output.end("length")
                        self._end(entry, entry.output.result())
            elif isinstance(op, Place):
                self._pending.append(("insert", {0: m}, out))  # column 0 of this item stands for its slot
            elif isinstance(op, Forward):
                self._forwarded = m  # its Sample follows (step)
            elif isinstance(op, (Decode, Sample)):
                self.decode_calls += 1
                self._pending.append(("decode", m, out))
            elif isinstance(op, Verify):
                self.decode_calls += 1
                self.spec_proposed_tokens += int(op.lengths.sum())
                self._pending.append(("verify", m, (*out, op.lengths + 1)))  # + what each row was planned for

    # ---------------------------------------------------------------- outputs and endings (process 0)

    def _process(self, item) -> None:
        """Feeds one dispatched call's tokens to the outputs of the choices it ran."""
        kind, owners, outs = item
        try:
            toks, lps, top_ids, top_lps, *counts = (np.asarray(a) for a in outs)  # waits for that program
        except Exception as exc:  # the call failed while it ran
            if self.lockstep is not None:
                raise
            self.faults.device_fault(exc, [run.entry for run in owners.values()])
            return
        taken = None
        if kind == "verify":  # row `col` took taken[col] of the [K+1] tokens
            taken, planned = counts
            self.planner.speculation.settle(owners, planned, taken)
            self.spec_accepted_tokens += sum(int(taken[col]) - 1 for col in owners)
        if kind == "insert":  # [1] -> [steps=1, rows=1]
            if timeline.ON:
                timeline.read(owners)
            toks, lps = toks.reshape(1, 1), lps.reshape(1, 1)
            top_ids, top_lps = top_ids.reshape(1, 1, -1), top_lps.reshape(1, 1, -1)
        touched = {}
        for col, run in owners.items():
            entry, c = run.entry, run.choice
            if c.finish is not None or entry.done or not run.live:
                continue
            touched[entry.rid] = entry
            made = int(taken[col]) if taken is not None else toks.shape[0]
            if kind != "insert" and self.speculative is not None:
                self.planner.speculation.observe(run, toks[:made, col].tolist())
            try:
                for t in range(made):
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
        """The one way out: frees the request's slots, waiting choices and prefill, sends what
        a stream still holds when it finished, then `Registry.end` (the Result, an exception,
        or None when the client left)."""
        if entry.done:
            return
        for run in entry.running:
            self.scheduler.release(run.slot, run)
        if entry.unplaced:
            self.scheduler.drop(entry)
        self.planner.release_prefill(entry)
        if isinstance(outcome, Result) and entry.request.stream:
            for delta in entry.output.deltas():
                self.registry.deliver(entry, delta)
        self.registry.end(entry, outcome)


def _compiles() -> int:
    from pgpt_jax.xla_options import compiles_so_far

    return compiles_so_far()
