"""Speculative decoding's share of the plan (process 0): n-gram proposals for the running rows,
whether a plan's decode goes out as a `Verify` of them, and what each call in flight is
expected to give.

Speculative decoding (`ngram.py`, when the engine has it): each running row proposes up to K
tokens by n-gram lookup in its prompt + output; if any row does, the plan's decode is a
`Verify` instead, which takes 1..K+1 tokens a row (a row with no proposal takes one). The
engine keeps pipelining (it plans call t+1 before reading call t), so a row's proposal
continues the output it is *expected* to have once the calls in flight are read: each call
records, per row, how many tokens it gives (unknown for a row it verifies) and which tokens
the lookup expects from it (`_flight`); reading the call (`observe`) checks them. A wrong
expectation costs only speed: the device checks every proposal against the model itself,
so proposals made from a wrong guess are rejected like any other. Until read, a verified
row's dispatched count and position are planned for the most it can take (K+1, so that the
window covers it and max_tokens is never passed); `settle` takes back what it did not.
Constrained rows never propose (a plan with one runs `Forward`/`Sample`: planner.py); a
request may opt out (`Request.speculative`).

A Verify costs more than a one-step Decode (K+1 positions a row: 1.3x at one GPT-2 row on a
2-core CPU, 2.1x at eight; `verify_cost`, measured at warm-up), so it goes out only when it
is expected to pay: each row's hit rate (how often the lookup's expected tokens came, from
every call read, verified or not) gives the tokens E it expects of its proposals, and the
plan verifies when the rows' time a token, `verify_cost` / E against a decode's 1, is below
1 on average (every row pays for the longer call: one that proposes nothing is slowed
down, so a batch where a few rows repeat decodes). Otherwise it decodes (and the
expectations are still checked, so a row that starts to repeat is seen).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pgpt_jax import ngram
from pgpt_jax.executor import Verify
from pgpt_jax.registry import Running
from pgpt_jax.scheduler import Scheduler

HIT_DECAY = 0.8  # weight of a row's older hits against its latest (`observe`)


class Speculation:
    """The proposals and expectations of one engine's running rows (see the module docstring);
    the planner asks it for each plan's `Verify` and tells it what each plain decode carries."""

    def __init__(self, config: ngram.Speculative, scheduler: Scheduler, context_length: int):
        self.config, self.scheduler, self.context_length = config, scheduler, context_length
        # Running -> per call in flight: (tokens it gives, None for a verified row; the tokens
        # expected of it, i32[...], or None)
        self._flight: dict = {}
        self._hits: dict = {}  # Running -> (expected tokens that came, tokens checked), decayed (`observe`)
        # Seconds of a Verify / seconds of a one-step Decode, by rows (Engine.warmup measures it);
        # None: verify whenever a row proposes (a multi-host group, which measures nothing).
        self.verify_cost: Optional[dict[int, float]] = None

    def decoded(self, owners: dict, steps: int, guesses: dict, constrained: bool) -> None:
        """A plain decode (or Forward) of `steps` tokens went out for `owners` {slot: run}: what
        the lookup expects of it, where it knows."""
        for s, run in owners.items():
            cont = None if constrained else guesses[s][1]
            self._flight[run].append((steps, cont[:steps] if cont is not None and cont.size >= steps else None))

    def guesses(self) -> dict:
        """slot -> (history, continuation) for every occupied row: its prompt + output as
        expected once the calls in flight are read (`_expected`), and the next K+1 tokens the
        n-gram lookup expects after it (i32[<= K+1]); (None, None) where either is unknown."""
        sched, spec = self.scheduler, self.config
        self._flight = {run: self._flight.get(run, []) for run in sched.owner if run is not None}
        self._hits = {run: h for run, h in self._hits.items() if run in self._flight}
        out = {}
        for s in sched.occupied:
            hist = self._expected(sched.owner[s])
            cont = None if hist is None else ngram.propose(hist, spec.k + 1, spec.min_n, spec.max_n)
            out[s] = (hist, cont if cont is not None and cont.size else None)
        return out

    def _expected(self, run: Running) -> Optional[np.ndarray]:
        """i32[n]: `run`'s prompt + output once the calls in flight for it are read, if they give
        what was expected of them (tokens expected of none, for a call of a known count, are
        looked up now); None when that is unknown."""
        c = run.choice
        hist = np.asarray(run.entry.request.prompt + c.token_ids, np.int32)
        flight = ([(1, None)] if c.generated == 0 else []) + self._flight[run]  # start_row's first token
        for count, tokens in flight:
            if tokens is None and count is not None:
                tokens = ngram.propose(hist, count, self.config.min_n, self.config.max_n)
                tokens = tokens if tokens.size == count else None
            if tokens is None:
                return None
            hist = np.concatenate([hist, tokens])
        return hist

    def verify(self, guesses: dict) -> Optional[Verify]:
        """The plan's decode as a Verify of the rows' proposals, or None when no row proposes
        anything (then it decodes as without speculation). Records what each row is expected
        to give, and plans its dispatched count and position for the most it can take."""
        sched, k = self.scheduler, self.config.k
        counts = {s: self._proposals(sched.owner[s], cont) for s, (_, cont) in guesses.items()}
        if not any(counts.values()):
            return None
        window, rows, _ = sched.decode_shape(1 + max(counts.values()), verify=True)  # it reads the whole window
        if self.verify_cost is not None:  # each row's time a token, cost / expected tokens, on average
            cost = self.verify_cost.get(rows, max(self.verify_cost.values()))
            if sum(cost / self._expected_tokens(sched.owner[s], n) for s, n in counts.items()) >= len(counts):
                return None
        tokens, lengths = np.zeros((rows, k), np.int32), np.zeros((rows,), np.int32)
        for s, n in counts.items():
            run, cont = sched.owner[s], guesses[s][1]
            if n:
                tokens[s, :n], lengths[s] = cont[:n], n
            self._flight[run].append((None if n else 1, cont[: n + 1] if cont is not None and cont.size > n else None))
            run.dispatched += n + 1
            sched.position[s] = min(sched.position[s] + n + 1, self.context_length - 1)
        return Verify(window, rows, tokens, lengths)

    def _proposals(self, run: Running, cont: Optional[np.ndarray]) -> int:
        """How many of the continuation's tokens `run` proposes: at most K, and one fewer than
        the continuation holds (its last one is what the row is expected to take after them);
        none when it opted out, is ending, or has fewer than two tokens to go (a Verify never
        makes a row's tokens past its max_tokens)."""
        c, entry = run.choice, run.entry
        left = entry.output.max_new - run.dispatched
        if (cont is None or not run.live or entry.done or c.finish is not None or not entry.request.speculative
                or c.matcher is not None or left < 2):
            return 0
        return max(0, min(self.config.k, left - 1, cont.size - 1))

    def _expected_tokens(self, run: Running, n: int) -> float:
        """Tokens `run` is expected to take from a Verify of n proposals: 1 + a + a^2 + ... + a^n,
        a its hit rate (each proposal is taken only if those before it were)."""
        hit, tried = self._hits.get(run, (0.0, 0.0))
        a = (hit + 1.0) / (tried + 2.0)
        return sum(a ** j for j in range(n + 1))

    def observe(self, run: Running, tokens: list) -> None:
        """The tokens a decode or verify call gave `run`, read in call order: checked against
        what was expected of that call (the row's hit rate counts the expected tokens that
        came, up to the first that did not); after a surprise, later calls' expectations
        (made from the wrong history) are forgotten, and a verified one's count is unknown."""
        flight = self._flight.get(run)
        if not flight:
            return
        count, expected = flight.pop(0)
        if expected is None:
            return
        expected = expected.tolist()
        same = next((i for i, (x, y) in enumerate(zip(expected, tokens)) if x != y), min(len(expected), len(tokens)))
        hit, tried = self._hits.get(run, (0.0, 0.0))
        self._hits[run] = (HIT_DECAY * hit + same, HIT_DECAY * tried + same + (same < len(tokens)))
        if expected != tokens:
            flight[:] = [(n, None) for n, _ in flight]

    def settle(self, owners: dict, planned, taken) -> None:
        """A Verify's rows were read: row `slot` was planned for planned[slot] tokens and took
        taken[slot] (i32[rows] each); its dispatched count and position take back the rest."""
        for slot, run in owners.items():
            unused = int(planned[slot]) - int(taken[slot])
            run.dispatched -= unused
            if self.scheduler.owner[slot] is run:
                self.scheduler.position[slot] -= unused
