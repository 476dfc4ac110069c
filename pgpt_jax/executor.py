"""The device side of the engine: the ops one iteration runs, and the executor that runs them.

Process 0 decides (engine.py: which prompts to prefill, which choice goes in which slot,
what shape to decode); every process executes. An iteration's decisions are a list of ops,
plain host data that process 0 broadcasts as is (multihost.py), so that every process runs
the same programs in the same order and the others decide nothing:

  Prefill(pid, tokens, lengths, want_logprobs,  prompts of one bucket -> their KV and last
          wanted, keep, start, reads, writes,   logits, kept under prefill id `pid` (unless no
          length)                               choice will be placed from it: `keep` False);
                                                `wanted`: what the rows read of prompt logprobs.
                                                Prefix cache: with `reads`, the rows' first
                                                `start` tokens come from those pool blocks
                                                (`gather_blocks`) and `tokens` are the rest
                                                (`extend`, into a `length`-long cache); with
                                                `writes`, whole blocks go into the pool
                                                (`save_blocks`) once it ran
  Extend(pid, tokens, start, lengths, length,   one chunk of a long prompt (chunked prefill):
         first, reads, writes)                  tokens i32[1, C] at positions start + [0, C)
                                                over the cache kept under `pid` (`extend`); the
                                                `first` chunk's cache is new: `length` long,
                                                empty or with `reads` (pool ids) like a
                                                Prefill's; `writes` as a Prefill's, on the
                                                last chunk. The cache stays kept under `pid`
  Place(pid, index, slot, length, row)          prompt `index` of prefill `pid` into `slot`
                                                (`insert`), its sampling row and first token
                                                (`start_row`); `row` is sampling.request_row's
                                                arguments (a sparse bias, not [V] floats)
  Decode(window, rows, steps, span)             `steps` tokens (0: `decode_steps`) for the first
                                                `rows` slots, none constrained; the occupied ones
                                                read `span` cache entries at most (0: `window`)
  Verify(window, rows, proposals, lengths)      speculative decoding: the first `rows` slots'
                                                proposed tokens (i32[rows, K], lengths[b] real
                                                ones in row b) checked in one forward pass;
                                                each row takes 1..K+1 tokens (programs.verify)
  Forward(window, rows, span)                   the model half of one decode step (logits kept
                                                here), while a constrained row runs
  Sample(masks)                                 the sampling half, for the rows of the last
                                                Forward; `masks` {slot: u32[V/32]} the next-token
                                                masks of the constrained ones (sent apart: planner.py)
  Drop(pids)                                    forget prefills no choice will use again

An `Executor` holds what the ops act on: the program params, the decode state, and the
prefills kept by id. It knows nothing of requests or text.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import numpy as np

from pgpt_jax import pool_programs, precompile, programs, sampling


@dataclasses.dataclass
class Prefill:
    pid: int
    tokens: np.ndarray  # i32[B, T]: B prompts padded to the bucket T
    lengths: np.ndarray  # i32[B]
    want_logprobs: bool = False
    wanted: tuple = (0, 0)  # prompt logprobs: top entries any row reads (0..K), whether any reads ranks
    keep: bool = True  # False: every prompt is scored only (max_tokens 0), no KV to keep
    start: Optional[np.ndarray] = None  # i32[B]: tokens each row reads from the pool (with reads)
    reads: Optional[np.ndarray] = None  # i32[B, length/Q]: pool ids of each row's cached blocks, then any
    writes: Optional[np.ndarray] = None  # i32[B, T/Q]: pool id each whole block is saved to (past the pool: none)
    length: int = 0  # with reads: the cache length T (the whole prompt's bucket); tokens are [B, R]


@dataclasses.dataclass
class Extend:
    pid: int
    tokens: np.ndarray  # i32[1, C]: one chunk of the prompt (the last one padded)
    start: np.ndarray  # i32[1]: the position of its first token (the kept cache holds [0, start))
    lengths: np.ndarray  # i32[1]: start + its true tokens (the prompt's length on the last chunk)
    length: int  # T: the cache length (the whole prompt's bucket)
    first: bool = False  # the cache starts here: zeros, or the pool blocks of `reads`
    reads: Optional[np.ndarray] = None  # first chunk, prefix cache: i32[1, T/Q] pool ids, as Prefill's
    writes: Optional[np.ndarray] = None  # last chunk, prefix cache: i32[1, T/Q], as Prefill's


@dataclasses.dataclass
class Place:
    pid: int
    index: int  # which prompt of the prefill
    slot: int
    length: int  # its true length: the position of its next token
    row: dict  # keyword arguments of sampling.request_row, `banned` and `vocab` left out


@dataclasses.dataclass
class Decode:
    window: int
    rows: int
    steps: int = 0  # 0: the engine's decode_steps
    span: int = 0  # cache entries the occupied rows read (the scheduler's need); 0: the window


@dataclasses.dataclass
class Verify:
    window: int
    rows: int
    proposals: np.ndarray  # i32[rows, K]: row b's first lengths[b] are real, the rest padding
    lengths: np.ndarray  # i32[rows]: proposals of each row, 0..K (0: one ordinary token)


@dataclasses.dataclass
class Forward:
    window: int
    rows: int
    span: int = 0  # as Decode's


@dataclasses.dataclass
class Sample:
    masks: dict  # slot -> u32[V/32]: the constrained rows' next-token masks (others are not read)


@dataclasses.dataclass
class Drop:
    pids: list


class Executor:
    """Runs ops on one process's share of the device state (see the module docstring)."""

    def __init__(self, model, *, slots: int, decode_steps: int, top_k: int, mesh=None, prefix_blocks: int = 0,
                 block_tokens: int = 32, verify_k: int = 0):
        self.config, self.slots, self.decode_steps, self.top_k, self.mesh = (
            model.config, slots, decode_steps, top_k, mesh)
        self.verify_k = verify_k  # proposals a Verify op carries per row (speculative decoding; 0: none)
        self.graphdef, self.params, self.head = programs.program_params(model, mesh)
        self.state = programs.init_state(self.config, slots, mesh)
        self.prefix_blocks, self.block_tokens = prefix_blocks, block_tokens
        self.pool = self._new_pool()  # the prefix cache's KV blocks (None: no prefix cache)
        self.never = list(self.config.never_emitted)  # control tokens: banned from every row
        self.prefills: dict[int, tuple] = {}  # pid -> (cache, last_logits)
        self.logits = None  # the last Forward's logits, for the Sample that follows it

    def row(self, row: dict) -> sampling.SamplingRows:
        return sampling.request_row(**row, banned=self.never, vocab=self.config.padded_vocab)

    def run(self, op) -> Any:
        """Runs one op; returns what process 0 reads of it (device arrays, not waited for):
        Prefill -> (prompt logprobs, top ids, top logprobs, ranks; each [B, ...]), Extend -> (), Place -> the
        first token's (token, logprob, top ids, top logprobs), Decode -> the same over [steps, rows], Verify ->
        the same over [K+1, rows] and the tokens each row took, i32[rows]."""
        if isinstance(op, Prefill):
            if op.reads is not None:
                cache = pool_programs.gather_blocks(self.pool, op.reads, length=op.length, mesh=self.mesh)
                cache, last = pool_programs.extend(self.graphdef, self.params, self.head, cache, op.tokens, op.start,
                                              op.lengths, mesh=self.mesh)
                prompt_logprobs = ()
            else:
                cache, last, *prompt_logprobs = programs.prefill(
                    self.graphdef, self.params, self.head, op.tokens, op.lengths, np.asarray(op.wanted, np.int32),
                    want_logprobs=op.want_logprobs, top_k=self.top_k, mesh=self.mesh)
            if op.writes is not None:
                self.pool = pool_programs.save_blocks(self.pool, cache, op.writes, mesh=self.mesh)
            if op.keep:
                self.prefills[op.pid] = (cache, last)
            return tuple(prompt_logprobs)
        if isinstance(op, Extend):
            self._extend(op)
            return ()
        if isinstance(op, Place):
            cache, last = self.prefills[op.pid]
            self.state, last = programs.insert(self.state, cache, last, np.int32(op.index), np.int32(op.slot),
                                               mesh=self.mesh)
            self.state, *outs = programs.start_row(self.state, last, np.int32(op.slot), np.int32(op.length),
                                                   self.row(op.row), top_k=self.top_k, mesh=self.mesh)
            return outs
        if isinstance(op, Decode):
            self.state, *outs = programs.decode(
                self.graphdef, self.params, self.head, self.state, np.int32(op.span or op.window),
                steps=op.steps or self.decode_steps,
                window=op.window, rows=op.rows, top_k=self.top_k, mesh=self.mesh)
            return outs
        if isinstance(op, Verify):
            self.state, *outs = programs.verify(
                self.graphdef, self.params, self.head, self.state, op.proposals, op.lengths, window=op.window,
                rows=op.rows, top_k=self.top_k, mesh=self.mesh)
            return outs
        if isinstance(op, Forward):
            self.logits = None
            self.state, self.logits = programs.forward(self.graphdef, self.params, self.head, self.state,
                                                       np.int32(op.span or op.window), window=op.window,
                                                       rows=op.rows, mesh=self.mesh)
            return None
        if isinstance(op, Sample):
            logits, self.logits = self.logits, None
            if logits is None:
                raise RuntimeError("a Sample op without the Forward it follows")
            masks = programs.no_masks(logits.shape[0], self.state)
            for slot, row in op.masks.items():
                if slot < len(masks):
                    masks[slot] = row
            self.state, *outs = programs.sample_next(self.state, logits, masks, top_k=self.top_k, mesh=self.mesh)
            return outs
        if isinstance(op, Drop):
            for pid in op.pids:
                self.prefills.pop(pid, None)
            return None
        raise TypeError(f"not an op: {op!r}")

    def _extend(self, op: Extend) -> None:
        """One chunk of a chunked prefill: the kept cache (a new one on the first chunk) goes
        on by `op.tokens`; kept under `op.pid` again (a chunk that raises leaves none)."""
        if op.first:
            if op.reads is not None:
                cache = pool_programs.gather_blocks(self.pool, op.reads, length=op.length, mesh=self.mesh)
            else:
                cache = pool_programs.empty_cache(self.config, 1, op.length, self.mesh)
        else:
            cache, _ = self.prefills.pop(op.pid)
        cache, last = pool_programs.extend(self.graphdef, self.params, self.head, cache, op.tokens, op.start,
                                           op.lengths, mesh=self.mesh)
        if op.writes is not None:
            self.pool = pool_programs.save_blocks(self.pool, cache, op.writes, mesh=self.mesh)
        self.prefills[op.pid] = (cache, last)

    def reset(self, prefills: bool = True) -> None:
        """A fresh decode state (and, with `prefills`, no kept prefills)."""
        if prefills:
            self.prefills.clear()
        self.state = programs.init_state(self.config, self.slots, self.mesh)

    def _new_pool(self):
        if not self.prefix_blocks:
            return None
        return pool_programs.init_pool(self.config, self.prefix_blocks, self.block_tokens, self.mesh)

    def pool_lost(self) -> bool:
        """True when a failed save consumed the donated pool."""
        return self.pool is not None and any(a.is_deleted() for a in jax.tree.leaves(self.pool))

    def reset_pool(self) -> None:
        """A pool of zeros (the planner's index must forget every block too)."""
        self.pool = self._new_pool()

    def state_lost(self) -> bool:
        """True when a failed call consumed the donated state."""
        return any(a.is_deleted() for a in jax.tree.leaves(self.state))

    def time_option_sets(self, rows: int, window: int) -> dict[str, float]:
        """Seconds per decode call of `rows` rows under each XLA:CPU option set (fresh states)."""
        return precompile.time_option_sets(self.graphdef, self.params, self.head, self.config, self.slots, rows=rows,
                                           window=window, steps=self.decode_steps, top_k=self.top_k, mesh=self.mesh)

    def time_decodes(self, decodes: list[tuple[int, int]], repeats: int = 3, verify: bool = False,
                     span: Optional[int] = None) -> dict[int, float]:
        """Seconds one decode call (with `verify`, one Verify of K proposals a row) of each
        (rows, window) takes (the fastest of `repeats`), keyed by rows; then a fresh state.
        `span` as a Decode carries it (None: the window). Process 0 alone: a multi-host
        group must not run it."""
        times = {}
        for rows, window in decodes:
            op = (Verify(window, rows, np.zeros((rows, self.verify_k), np.int32), np.zeros((rows,), np.int32))
                  if verify else Decode(window, rows, span=span))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(self.run(op))
                best = min(best, time.perf_counter() - t0)
            times[rows] = best
        self.reset()
        return times

    def warmup(self, prefills, decodes, progress: bool = False, on_program=None, extends=(), chunks=(),
               verifies=()) -> None:
        """Compiles every program for these shapes (`decodes`: (rows, window) of Decode and
        Forward; `verifies`: of Verify, with speculation; `extends`: (rows, T, R) prefix-cache
        hits; `chunks`: (T, C) chunked prefills), then starts from a fresh state."""
        row = self.row(dict(temperature=1.0, top_p=1.0, presence=0.0, frequency=0.0, logit_bias=None,
                            num_logprobs=0, seed=0, choice_index=0))
        more = (len(prefills) + len(extends)) if self.pool is not None else 0  # the prefix cache's programs
        more += len(chunks)
        total = [0]  # precompile.compile_programs's count of programs

        def report(done: int, of: int) -> None:
            total[0] = of
            if on_program is not None:
                on_program(done, of + more)

        precompile.compile_programs(self.graphdef, self.params, self.head, self.state, prefills=prefills,
                                    decodes=decodes, steps=self.decode_steps,
                                    row=row, top_k=self.top_k, mesh=self.mesh, progress=progress,
                                    on_program=report, verify_k=self.verify_k, verifies=verifies)
        pooled = 0  # programs counted so far after compile_programs's

        def after(done: int) -> None:
            if on_program is not None:
                on_program(total[0] + pooled + done, total[0] + more)

        if self.pool is not None:
            precompile.compile_pool(self.graphdef, self.params, self.head, self.pool, prefills=prefills,
                                    extends=extends, mesh=self.mesh, on_program=after)
            pooled = len(prefills) + len(extends)
        # A chunked prefill's empty cache, and without a pool its extends (with one: among `extends`).
        precompile.compile_chunks(self.graphdef, self.params, self.head, self.config, chunks=chunks,
                                  extends=self.pool is None, mesh=self.mesh, on_program=after)
        self.reset()


def row_args(request, seed: int, choice_index: int, mask: Optional[np.ndarray] = None) -> dict:
    """`Place.row` for one choice of a request: what sampling.request_row needs, and no more;
    `mask` u32[V/32] the tokens a constrained choice may sample first."""
    return dict(temperature=float(request.temperature), top_p=float(request.top_p),
                presence=float(request.presence_penalty), frequency=float(request.frequency_penalty),
                logit_bias=dict(request.logit_bias) if request.logit_bias else None,
                num_logprobs=int(request.logprobs or 0), seed=int(seed), choice_index=int(choice_index),
                processed=request.logprobs_mode == "processed_logprobs", mask=mask)

