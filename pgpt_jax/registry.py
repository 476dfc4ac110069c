"""The registry: every request the engine accepted, until it ends, and the one way it ends.

A request enters through `submit` (any thread): it is checked against the queue's budget,
given an id and put in the inbox; the engine thread `take`s it from there. It ends in
exactly one of four ways, all through `end`:

  finished   its Result goes to the callback;
  aborted    the client left (`abort`): nothing is sent, nobody is listening;
  failed     an exception goes to the callback (a fault in a device call it was part of,
             or the engine stopping or dying);
  timed out  a `RequestTimeout` goes to the callback (`expired` finds them).

`end` runs once per request whatever happens after: a second ending is ignored.

Admission by cost. Waiting requests hold only their token ids (they are prefilled when
they get a slot), and what may wait is bounded twice: by choices (`Limits.max_queue`) and
by tokens, the sum over waiting choices of prompt + max_tokens (`Limits.max_queued_tokens`).
A choice leaves the budget when it gets a slot (`placed`) or when its request ends.
`submit` takes all of one HTTP request's prompts or none of them. Background (batch)
requests are outside the budget, the counters and the deadlines: their submitter keeps a
bounded window of them in flight, and they may wait as long as interactive work keeps the
slots busy.

Threads: `submit`, `abort` and `close` may be called from any thread (the lock guards the
inbox, the aborts and the budget); everything else is the engine thread's.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import Callable, Optional, Sequence

from pgpt_jax import timeline
from pgpt_jax.outputs import ChoiceOutput, RequestOutput
from pgpt_jax.request import EngineUnavailable, Limits, QueueFull, Request, RequestTimeout

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Entry:
    """One accepted request."""

    rid: int  # the same on every process of a multi-host run
    request: Request
    callback: Callable
    seed: int
    cost: int = 0  # tokens one choice may take: prompt + max_new (the unit of the token budget)
    deadline: Optional[float] = None  # time.monotonic() by which the whole request must be done
    queue_deadline: Optional[float] = None  # ... by which its first choice must have a slot
    output: Optional[RequestOutput] = None  # made on the engine thread when the request starts
    prefix: Optional[tuple] = None  # (prefill id, index in it): where its prompt's KV is kept
    unplaced: int = 0  # choices waiting for a slot (they hold budget)
    running: list = dataclasses.field(default_factory=list)  # Running choices in slots
    started: bool = False  # a choice got a slot (it counts as running, not waiting)
    done: bool = False  # ended (set only by Registry.end)
    aborted: bool = False  # the client left (set from any thread; only silences callbacks)
    counted: bool = False  # in this registry's budget and counters (accepted by `submit`, not background)
    marks: Optional[dict] = None  # timeline.py's timestamps (PGPT_TIMELINE), else None


@dataclasses.dataclass(eq=False)
class Running:
    """One choice in one slot: what the scheduler's slot table holds."""

    entry: Entry
    choice: ChoiceOutput
    slot: int
    live: bool = True  # False once it gave its slot back to interactive work (its tokens are dropped)
    dispatched: int = 1  # tokens the device will have made for it by the calls sent so far (start_row's first)


class Handle:
    """Returned by `Engine.submit`; `abort()` is safe from any thread."""

    def __init__(self, registry: "Registry", entry: Entry):
        self._registry, self._entry = registry, entry

    def abort(self) -> None:
        self._registry.abort(self._entry)

    @property
    def done(self) -> bool:
        return self._entry.done

    @property
    def marks(self) -> Optional[dict]:
        """The engine's timeline marks of this request (timeline.py), or None when it is off."""
        return self._entry.marks


class Registry:
    """The engine's requests; see the module docstring."""

    def __init__(self, limits: Limits, max_queued_tokens: int, wake: Callable[[], None]):
        self.limits, self.max_queued_tokens, self._wake = limits, max_queued_tokens, wake
        self.lock = threading.Lock()
        self.inbox: list[Entry] = []
        self.aborts: list[Entry] = []
        self.entries: dict[int, Entry] = {}  # taken by the engine thread and not yet ended
        self.queued_choices = self.queued_tokens = 0  # the budget in use (under the lock)
        self.waiting_requests = self.running_requests = 0  # accepted here, by whether one has a slot
        self.closed: Optional[EngineUnavailable] = None  # once set, submit refuses everything
        self._next_rid = 0

    # ------------------------------------------------------------------ any thread

    def submit(self, requests: Sequence[Request], callbacks: Sequence[Callable], max_new) -> list[Handle]:
        """Accepts all of `requests` or raises (QueueFull, EngineUnavailable) having accepted none.
        `max_new(request)` is the most tokens a choice of it may generate."""
        now = time.monotonic()
        entries = []
        for r, cb in zip(requests, callbacks):
            seed = r.seed if r.seed is not None else random.getrandbits(63)
            timeouts = (None, None) if r.background else (self.limits.request_timeout, self.limits.queue_timeout)
            entries.append(Entry(0, r, cb, seed, cost=len(r.prompt) + max_new(r),
                                 deadline=_after(now, timeouts[0]), queue_deadline=_after(now, timeouts[1]),
                                 marks=timeline.marks()))
            timeline.mark(entries[-1].marks, "queued")
        counted = [e for e in entries if not e.request.background]
        choices = sum(e.request.candidates for e in counted)
        tokens = sum(e.cost * e.request.candidates for e in counted)
        with self.lock:
            if self.closed is not None:
                raise self.closed
            # A request larger than a whole budget is still taken when nothing waits: it could
            # never run otherwise (the per-request caps bound it).
            if self.queued_choices + choices > self.limits.max_queue and self.queued_choices:
                raise QueueFull(f"The engine's queue is full ({self.queued_choices} choices waiting, "
                                f"{self.limits.max_queue} at most); retry later.")
            if self.queued_tokens + tokens > self.max_queued_tokens and self.queued_choices:
                raise QueueFull(f"The engine's token budget is spent ({self.queued_tokens} tokens waiting, "
                                f"{self.max_queued_tokens} at most); retry later.")
            self.queued_choices += choices
            self.queued_tokens += tokens
            self.waiting_requests += len(counted)
            for e in entries:
                self._next_rid += 1
                e.rid, e.unplaced, e.counted = self._next_rid, e.request.candidates, not e.request.background
            self.inbox += entries
        self._wake()
        return [Handle(self, e) for e in entries]

    def abort(self, entry: Entry) -> None:
        entry.aborted = True
        with self.lock:
            self.aborts.append(entry)
        self._wake()

    def close(self, why: EngineUnavailable) -> list[Entry]:
        """Refuses new work from now on; returns every request not yet ended (for the caller to end)."""
        with self.lock:
            self.closed = self.closed or why
            inbox, self.inbox = self.inbox, []
        return inbox + list(self.entries.values())

    # ------------------------------------------------------------------ the engine thread

    def take(self) -> tuple[list[Entry], list[Entry]]:
        """The new requests and the aborts since the last call."""
        with self.lock:
            new, self.inbox = self.inbox, []
            aborts, self.aborts = self.aborts, []
        return new, aborts

    def enter(self, entries: Sequence[Entry]) -> None:
        """Requests the engine has taken (from its inbox, or from process 0's broadcast)."""
        for e in entries:
            e.unplaced = e.request.candidates
            self.entries[e.rid] = e
            timeline.mark(e.marks, "taken")

    def placed(self, entry: Entry) -> None:
        """One choice of `entry` got a slot: it leaves the queue's budget."""
        entry.unplaced -= 1
        timeline.mark(entry.marks, "placed")
        with self.lock:
            if entry.counted:
                self.queued_choices -= 1
                self.queued_tokens -= entry.cost
            if not entry.started and entry.counted:
                self.waiting_requests -= 1
                self.running_requests += 1
        entry.started = True

    def expired(self, now: float) -> list[tuple[Entry, RequestTimeout]]:
        """Requests past a deadline, with the error each ends with."""
        out = []
        for e in self.entries.values():
            if e.deadline is not None and now > e.deadline:
                out.append((e, RequestTimeout(
                    f"The request did not finish within {self.limits.request_timeout or 0:g} s.", "request")))
            elif e.queue_deadline is not None and now > e.queue_deadline and not e.running:
                out.append((e, RequestTimeout(
                    f"The request waited {self.limits.queue_timeout:g} s without getting a slot; retry later.",
                    "queue")))
        return out

    def deliver(self, entry: Entry, event) -> None:
        """Calls the request's callback; an aborted request hears nothing but an error."""
        if entry.aborted and not isinstance(event, BaseException):
            return
        timeline.mark(entry.marks, "delivered")
        try:
            entry.callback(event)
        except Exception:  # a broken callback must not take the engine down
            log.exception("request callback failed")

    def end(self, entry: Entry, outcome) -> bool:
        """The one way out: `outcome` is the Result, an exception, or None (aborted: nothing is
        sent). Releases the budget its waiting choices held. False when it had already ended."""
        if entry.done:
            return False
        entry.done = True
        self.entries.pop(entry.rid, None)
        entry.prefix = None
        with self.lock:
            if entry.counted:  # this process accepted it (a follower's copies count nowhere)
                self.queued_choices -= entry.unplaced
                self.queued_tokens -= entry.cost * entry.unplaced
                if entry.started:
                    self.running_requests -= 1
                else:
                    self.waiting_requests -= 1
        entry.unplaced = 0
        if outcome is None:
            if entry.output is not None:
                entry.output.end("abort")
            return True
        self.deliver(entry, outcome)
        return True


def _after(now: float, seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else now + seconds
