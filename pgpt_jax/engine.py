"""The engine: continuous batching of completion requests over a fixed set of device slots.

Threads and queues. One thread owns the device (the engine thread, or the caller of
`run_until_idle()` for `generate()`): nothing else touches device state. Other threads
talk to it through `submit()` and `Handle.abort()`, which only append to a lock-guarded
inbox. Each iteration of the host loop (`step()`):

  1. takes new requests and aborts from the inbox;
  2. admits waiting choices into free slots: `prefill` once per request (n/best_of
     choices share it; prompts of one bucket that arrive together share one call), then
     per choice `insert` (its KV into the slot) and `start_row` (its sampling row, and its
     first token); free slots are taken lowest first;
  3. dispatches `decode` for `decode_steps` tokens of the occupied prefix of the slots
     (one program; row buckets 1, 4, 16, ..., slots, so one stream pays for one row);
  4. while the device computes that, turns the outputs of the work dispatched earlier
     into text: detokenizes, matches stop strings, and calls the request's callback with
     `Delta`s and, at the end, one `Result`. Choices that finished free their slots for
     the next iteration; tokens the device made past a finish are discarded.

Device state is one pytree (`DecodeState`) donated to every jitted call. Shapes are
static (slots, prompt buckets, prefill rows, decode rows, attention windows, decode
steps, top-k cap); every request parameter is a value in an array, so after `warmup()`
nothing compiles again.
The engine speaks token ids; the tokenizer is only used to turn outputs into text.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import pickle
import random
import threading
import time
from collections import deque
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pgpt_jax import sampling, sharding
from pgpt_jax.config import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.model import GPT, init_cache, lm_head
from pgpt_jax.request import (Choice, Delta, Logprobs, QueueFull, Request, RequestError,
                              Result)
from pgpt_jax.tokenizer import IncrementalDetokenizer

MAX_BEST_OF = 20
MAX_N = 128
# The API allows 4 stop strings; the chat template adds its own turn markers on top.
MAX_STOPS = 8

# --------------------------------------------------------------------------- compile counting

_compiles = 0
_compiles_lock = threading.Lock()


def _on_event(name: str, *_args, **_kwargs) -> None:
    global _compiles
    if name == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles_so_far() -> int:
    """XLA compilations in this process since pgpt_jax.engine was imported."""
    return _compiles


# --------------------------------------------------------------------------- device state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: tuple  # per layer (k, v), each [S, N, L, H]
    tokens: jax.Array  # i32[S]: last sampled token, the next decode input
    positions: jax.Array  # i32[S]: position that token will occupy in the cache
    rows: sampling.SamplingRows  # per-slot sampling parameters and counts


def init_state(cfg, slots: int, mesh: Optional[Mesh] = None) -> DecodeState:
    """Zeros for every slot, created directly with the mesh's shardings when there is one."""
    def make():
        return DecodeState(
            cache=init_cache(cfg, slots, cfg.n_positions),
            tokens=jnp.zeros((slots,), jnp.int32),
            positions=jnp.zeros((slots,), jnp.int32),
            rows=sampling.init_rows(slots, cfg.padded_vocab),
        )

    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=sharding.state_shardings(jax.eval_shape(make), mesh))()


def _constrain(state: DecodeState, outs: tuple, mesh: Optional[Mesh]):
    """Keeps the state on its shardings and makes host-bound outputs readable by every process."""
    if mesh is None:
        return state, outs
    state = jax.lax.with_sharding_constraint(state, sharding.state_shardings(state, mesh))
    outs = jax.lax.with_sharding_constraint(outs, sharding.replicated(mesh))
    return state, outs


# --------------------------------------------------------------------------- jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def transposed_head(graphdef, params, *, mesh=None):
    """The LM head as its own [D, V] array (`model.lm_head`), vocabulary over `model`."""
    head = lm_head(nnx.merge(graphdef, params))
    if mesh is not None:
        head = jax.lax.with_sharding_constraint(
            head, NamedSharding(mesh, sharding.spec(("embed", "vocab"))))
    return head


@functools.partial(jax.jit, static_argnames=("graphdef", "want_logprobs", "top_k", "mesh"))
def prefill(graphdef, params, head, tokens, true_len, *, want_logprobs: bool, top_k: int, mesh=None):
    """tokens i32[P, T] (P prompts padded to a bucket T), true_len i32[P] -> their KV caches and logits.

    Returns (cache: per layer ([P, N, T, H], [P, N, T, H]), last_logits f32[P, V],
    prompt logprobs f32[T-1] of row 0's tokens 1..T-1, top ids i32[T-1, k], top logprobs
    f32[T-1, k]); the prompt-logprob arrays are empty unless `want_logprobs` (then P is 1:
    logits for every prompt position are the costly part of echo). Prompts that arrive
    together share one call: P rows of T tokens make one [P*T, D] matmul per weight.
    """
    model = nnx.merge(graphdef, params)
    P, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
    hidden, cache = model(tokens, positions, init_cache(model.config, P, T))
    last_hidden = jnp.take_along_axis(hidden, (true_len - 1)[:, None, None], axis=1)[:, 0]  # [P, D]
    last_logits = model.logits(last_hidden, head)
    if want_logprobs:
        logits = model.logits(hidden[0, :-1], head)  # [T-1, V]: predicts tokens 1..T-1
        lp, top_ids, top_lps = sampling.logprobs_of(logits, tokens[0, 1:], top_k)
    else:
        lp = jnp.zeros((0,), jnp.float32)
        top_ids, top_lps = jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(
            cache, NamedSharding(mesh, PartitionSpec(None, "model", None, None)))
        last_logits, lp, top_ids, top_lps = jax.lax.with_sharding_constraint(
            (last_logits, lp, top_ids, top_lps), sharding.replicated(mesh))
    return cache, last_logits, lp, top_ids, top_lps


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def insert(state: DecodeState, prefix_cache, prow, slot, *, mesh=None):
    """Copies row `prow` of a prefill's KV (per layer ([P, N, T, H], ...)) into `slot` of the cache.

    One program per prefill shape (P, T), and nothing else in it: sampling the first token
    is `start_row`'s job, compiled once for every P.
    """
    def put(full, prefix):
        one = jax.lax.dynamic_slice_in_dim(prefix, prow, 1, axis=0)
        return jax.lax.dynamic_update_slice(full, one.astype(full.dtype), (slot, 0, 0, 0))

    cache = tuple((put(k, pk), put(v, pv)) for (k, v), (pk, pv) in zip(state.cache, prefix_cache))
    return _constrain(dataclasses.replace(state, cache=cache), (), mesh)[0]


@functools.partial(jax.jit, static_argnames=("top_k", "mesh"), donate_argnums=(0,))
def start_row(state: DecodeState, last_logits, prow, slot, true_len, row, *, top_k: int, mesh=None):
    """Sets `slot`'s sampling row and samples its first token from the prefill's last logits.

    last_logits f32[P, V] (row `prow` is this sequence's); row: dict of temperature, top_p,
    presence, frequency, num_logprobs (scalars), key u32[2] and bias f32[V] (see
    `Engine._row_arrays`). Returns (state, token i32[1],
    logprob f32[1], top ids i32[1, k], top logprobs f32[1, k]).
    """
    r = state.rows
    one = sampling.SamplingRows(
        temperature=row["temperature"][None], top_p=row["top_p"][None],
        presence=row["presence"][None], frequency=row["frequency"][None],
        bias=row["bias"][None], counts=jnp.zeros((1, r.counts.shape[1]), r.counts.dtype),
        num_logprobs=row["num_logprobs"][None], key=row["key"][None].astype(r.key.dtype))
    last = jax.lax.dynamic_slice_in_dim(last_logits, prow, 1, axis=0)  # [1, V]
    tok, lp, top_ids, top_lps, one = sampling.sample(last, one, jnp.reshape(true_len, (1,)), top_k=top_k)
    rows = jax.tree.map(lambda all_rows, new: all_rows.at[slot].set(new[0]), r, one)
    state = dataclasses.replace(state, tokens=state.tokens.at[slot].set(tok[0]),
                                positions=state.positions.at[slot].set(true_len), rows=rows)
    state, outs = _constrain(state, (tok, lp, top_ids, top_lps), mesh)
    return (state, *outs)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "window", "rows", "top_k", "mesh"),
                   donate_argnums=(3,))
def decode(graphdef, params, head, state: DecodeState, *, steps: int, window: int, rows: int,
           top_k: int, mesh=None):
    """Runs `steps` decode steps for the first `rows` slots in one program.

    Attention reads only the first `window` cache entries and only the first `rows` slots
    run (the host picks buckets that cover every occupied slot; free slots past `rows` cost
    nothing). Returns (state, tokens i32[steps, rows], logprobs f32[steps, rows],
    top ids i32[steps, rows, k], top logprobs f32[steps, rows, k]).
    """
    model = nnx.merge(graphdef, params)
    last = model.config.n_positions - 1
    head_rows = lambda a: a[:rows]  # noqa: E731

    def one_step(carry, _):
        cache, tokens, positions, sampling_rows = carry
        hidden, cache = model(tokens[:, None], positions[:, None], cache, window)
        logits = model.logits(hidden[:, 0], head)  # [rows, V]
        new_pos = jnp.minimum(positions + 1, last)  # free slots may run on; clamp them
        tok, lp, top_ids, top_lps, sampling_rows = sampling.sample(
            logits, sampling_rows, new_pos, top_k=top_k)
        return (cache, tok, new_pos, sampling_rows), (tok, lp, top_ids, top_lps)

    carry = (state.cache, head_rows(state.tokens), head_rows(state.positions),
             jax.tree.map(head_rows, state.rows))
    (cache, tokens, positions, sampling_rows), outs = jax.lax.scan(one_step, carry, None, length=steps)
    put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)  # noqa: E731
    state = DecodeState(cache, put(state.tokens, tokens), put(state.positions, positions),
                        jax.tree.map(put, state.rows, sampling_rows))
    state, outs = _constrain(state, outs, mesh)
    return (state, *outs)


# --------------------------------------------------------------------------- host-side bookkeeping


class Handle:
    """Returned by `Engine.submit`; `abort()` is safe from any thread."""

    def __init__(self, engine: "Engine", req: "_Req"):
        self._engine, self._req = engine, req

    def abort(self) -> None:
        self._engine._abort(self._req)

    @property
    def done(self) -> bool:
        return self._req.done


@dataclasses.dataclass(eq=False)
class _Choice:
    req: "_Req"
    index: int  # candidate index (seed derivation uses it)
    detok: IncrementalDetokenizer
    slot: Optional[int] = None
    text: str = ""  # completion text so far (stop strings already cut)
    sent: int = 0  # characters of text already streamed
    token_ids: list = dataclasses.field(default_factory=list)
    offsets: list = dataclasses.field(default_factory=list)  # char offset of each token in text
    lps: list = dataclasses.field(default_factory=list)
    tops: list = dataclasses.field(default_factory=list)
    sent_tokens: int = 0  # logprob entries already streamed
    generated: int = 0  # every sampled token, EOS included
    logprob_sum: float = 0.0
    finish: Optional[str] = None
    echo_sent: bool = False
    final_sent: bool = False


@dataclasses.dataclass(eq=False)
class _Req:
    request: Request
    callback: Callable
    max_new: int
    best_of: int
    seed: int
    choices: list = dataclasses.field(default_factory=list)
    waiting: deque = dataclasses.field(default_factory=deque)  # choices not yet in a slot
    prefix: Optional[tuple] = None  # (cache, last_logits, row in them, true_len): a prefill's output
    prompt_lp: Optional[Logprobs] = None  # echo logprobs, built once
    prompt_text: str = ""  # what echo returns before the completion
    prompt_chars: int = 0  # characters of the prompt: completion text_offsets start here
    done: bool = False
    aborted: bool = False
    rid: int = 0  # multi-host: the id process 0 gave it


def _buckets(limit: int, smallest: int) -> tuple[int, ...]:
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


class Engine:
    """Continuous batching over `slots` device rows; see the module docstring."""

    def __init__(self, model: GPT, tokenizer, *, slots: int = 32, decode_steps: int = 4,
                 max_queue: int = 256, max_logprobs: int = 5, min_bucket: int = 16,
                 min_window: int = 128, max_prefill_tokens: int = 1024, mesh: Optional[Mesh] = None):
        if not 0 <= max_logprobs <= 20:
            raise ValueError("max_logprobs must be in 0..20")
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.context_length = self.config.n_positions
        self.slots, self.decode_steps = slots, decode_steps
        self.max_queue, self.max_logprobs = max_queue, max_logprobs
        self.top_k = max(max_logprobs, 1)
        self.buckets = _buckets(self.context_length, min(min_bucket, self.context_length))
        self.windows = _buckets(self.context_length, min(min_window, self.context_length))
        # Prompts of one bucket that arrive together are prefilled in one call of 1, 4 or 16
        # rows, as long as rows x bucket stays within max_prefill_tokens (past that the
        # matmuls are large enough alone, and every extra shape is one more compile).
        self.prefill_rows = {
            b: tuple(p for p in (1, 4, 16) if p == 1 or (p * b <= max_prefill_tokens and p <= slots))
            for b in self.buckets}
        # Decode runs the occupied prefix of the slots, in buckets of 1, 4, 16, ... rows
        # (free slots are taken lowest first). A data axis splits slots over devices: there
        # every program runs all of them rather than reshard a prefix.
        self.row_buckets = (slots,)
        if mesh is None or mesh.shape["data"] == 1:
            self.row_buckets = tuple(4**i for i in range(8) if 4**i < slots) + (slots,)
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        if jax.default_backend() == "cpu":
            # XLA:CPU has no native bf16 matmul: it would convert stored bf16 weights on every
            # call (the embedded model ships bf16). Upcast them once to the compute dtype.
            compute = jnp.dtype(self.config.dtype)
            self.params = jax.tree.map(
                lambda a: a.astype(compute) if a.dtype.itemsize < compute.itemsize else a, self.params)
        if mesh is not None:
            # Params already placed by load_model/init_model(mesh=...) stay where they are.
            sharding.check_mesh(mesh, self.config, slots)
            self.params = jax.device_put(self.params, sharding.param_shardings(self.params, mesh))
        self.head = transposed_head(self.graphdef, self.params, mesh=mesh)
        self.state = init_state(self.config, slots, mesh)
        self.vocab = self.config.vocab_size
        self._inbox: list = []
        self._aborts: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: deque[_Req] = deque()  # admitted requests with choices still waiting
        self._slot_choice: list[Optional[_Choice]] = [None] * slots
        self._slot_pos = [0] * slots  # device position of each occupied slot's last token
        self._pending: deque = deque()  # dispatched work whose outputs are not processed yet
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._compiles_at_start = compiles_so_far()
        self.multihost = jax.process_count() > 1
        self.is_leader = jax.process_index() == 0
        self._next_rid = 0
        self._by_rid: dict = {}  # multi-host: request id -> _Req, the same on every process
        self._stop_sent = False
        self.prefill_calls = 0
        self.decode_calls = 0
        self.generated_tokens = 0

    # ---------------------------------------------------------------- public API

    @property
    def compile_count(self) -> int:
        """XLA compilations since this engine was made (warm-up included)."""
        return compiles_so_far() - self._compiles_at_start

    @property
    def active_slots(self) -> int:
        return sum(c is not None for c in self._slot_choice)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            inbox = len(self._inbox)
        return inbox + sum(len(r.waiting) for r in list(self._queue))

    def check(self, request: Request) -> None:
        """Raises RequestError for what makes `request` impossible; names the OpenAI field."""
        P = len(request.prompt)
        if P == 0:
            raise RequestError("The prompt must contain at least one token.", "prompt")
        bad = [t for t in request.prompt if not (isinstance(t, (int, np.integer)) and 0 <= t < self.vocab)]
        if bad:
            raise RequestError(f"Token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1}).", "prompt")
        if not 1 <= request.n <= MAX_N:
            raise RequestError(f"n must be between 1 and {MAX_N}.", "n")
        best_of = request.best_of if request.best_of is not None else request.n
        if best_of < request.n:
            raise RequestError("best_of must be greater than or equal to n.", "best_of")
        if best_of > max(MAX_BEST_OF, request.n):
            raise RequestError(f"best_of must be at most {MAX_BEST_OF}.", "best_of")
        if request.stream and best_of > request.n:
            raise RequestError("Cannot stream results when best_of is greater than n.", "stream")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.max_logprobs:
            raise RequestError(f"logprobs must be between 0 and {self.max_logprobs}.", "logprobs")
        if not 0 <= request.temperature <= 2:
            raise RequestError("temperature must be between 0 and 2.", "temperature")
        if not 0 <= request.top_p <= 1:
            raise RequestError("top_p must be between 0 and 1.", "top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(request, name) <= 2:
                raise RequestError(f"{name} must be between -2 and 2.", name)
        if len(request.stop) > MAX_STOPS or any(not isinstance(s, str) or not s for s in request.stop):
            raise RequestError(f"stop must be at most {MAX_STOPS} non-empty strings.", "stop")
        if request.seed is not None and not -(2**63) <= request.seed < 2**63:
            raise RequestError("seed must be a 64-bit integer.", "seed")
        for tok, val in (request.logit_bias or {}).items():
            if not (isinstance(tok, (int, np.integer)) and 0 <= tok < self.vocab):
                raise RequestError(f"logit_bias key {tok} is not a token id in the vocabulary.", "logit_bias")
            if not -100 <= val <= 100:
                raise RequestError(f"logit_bias value for token {tok} must be between -100 and 100.", "logit_bias")
        if request.max_tokens is not None and request.max_tokens < 0:
            raise RequestError("max_tokens must be at least 0.", "max_tokens")
        L = self.context_length
        wanted = P + (request.max_tokens if request.max_tokens is not None else 0)
        if P > L or wanted > L:
            raise RequestError(
                f"This model's maximum context length is {L} tokens, however you requested "
                f"{wanted} tokens ({P} in your prompt; {wanted - P} for the completion). "
                "Please reduce your prompt; or completion length.",
                "max_tokens" if P <= L else "prompt", "context_length_exceeded")

    def submit(self, request: Request, callback: Callable) -> Handle:
        """Queues `request`; `callback(event)` runs on the engine thread (see request.py)."""
        self.check(request)
        if self.queue_depth >= self.max_queue:
            raise QueueFull("The engine's queue is full; retry later.")
        max_new = request.max_tokens if request.max_tokens is not None else self.context_length - len(request.prompt)
        best_of = request.best_of if request.best_of is not None else request.n
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        req = _Req(request=request, callback=callback, max_new=max_new, best_of=best_of, seed=seed)
        with self._lock:
            self._inbox.append(req)
        self._wake.set()
        return Handle(self, req)

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

    def warmup(self, progress: bool = False) -> float:
        """Compiles every prefill bucket, insert and decode window; returns seconds taken."""
        t0 = time.perf_counter()
        jobs = [("prefill", (b, 1), True) for b in self.buckets]
        jobs += [("prefill", (b, p), False) for b in self.buckets for p in self.prefill_rows[b]]
        jobs += [("decode", w, r) for w in self.windows for r in self.row_buckets]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="warm-up (compiling)", unit="program")
        row = self._row_arrays(Request(prompt=[0]), 0, 0)
        started = set()  # start_row compiles once per prefill row count
        for kind, size, flag in jobs:
            if kind == "prefill":
                (bucket, rows) = size
                cache, last, *_ = prefill(
                    self.graphdef, self.params, self.head, np.zeros((rows, bucket), np.int32),
                    np.ones((rows,), np.int32), want_logprobs=flag, top_k=self.top_k, mesh=self.mesh)
                if not flag:  # the echo variant's cache has the same shape as the plain one's
                    self.state = insert(self.state, cache, np.int32(0), np.int32(0), mesh=self.mesh)
                    if rows not in started:
                        started.add(rows)
                        self.state, *_ = start_row(self.state, last, np.int32(0), np.int32(0), np.int32(1),
                                                   row, top_k=self.top_k, mesh=self.mesh)
            else:
                self.state, *_ = decode(self.graphdef, self.params, self.head, self.state,
                                        steps=self.decode_steps, window=size, rows=flag,
                                        top_k=self.top_k, mesh=self.mesh)
            jax.block_until_ready(self.state.tokens)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.state = init_state(self.config, self.slots, self.mesh)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the host loop

    def _loop(self) -> None:
        while self._running:
            try:
                busy = self.step()
            except Exception as exc:  # never leave requests hanging on a dead thread
                logging.getLogger(__name__).exception("engine iteration failed")
                self._fail_all(exc)
                # A failed call may have consumed the donated state: start from a clean one.
                self.state = init_state(self.config, self.slots, self.mesh)
                busy = False
            self._forget_done()
            if not busy:
                # Idle. In multi-host runs the other processes wait in the next broadcast.
                self._wake.wait(timeout=0.02 if self.multihost else 0.05)
                self._wake.clear()
        if self.multihost and not self._stop_sent:
            self._take_inbox()  # carries the stop flag to the other processes
        self._fail_all(RuntimeError("the engine stopped"))

    def step(self) -> bool:
        """One iteration (see the module docstring). Returns False when there is no work."""
        self._take_inbox()
        self._admit()
        if any(c is not None for c in self._slot_choice):
            self._dispatch_decode()
        # Process everything dispatched before the newest decode while the device runs it.
        keep = 1 if self._pending and self._pending[-1][0] == "decode" else 0
        while len(self._pending) > keep:
            self._process(self._pending.popleft())
        if not any(c is not None for c in self._slot_choice):
            while self._pending:
                self._process(self._pending.popleft())
        return bool(self._pending or self._queue or any(c is not None for c in self._slot_choice)
                    or self._inbox)

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        if self.multihost:
            new, aborts = self._sync_inbox(new, aborts)
        together = [req for req in new if self._start_request(req)]
        self._prefill(together, want_logprobs=False)
        for req in together:
            req.waiting.extend(req.choices)
            self._queue.append(req)
        for req in aborts:
            self._release(req)

    # ---------------------------------------------------------------- multi-host

    def _sync_inbox(self, new: list, aborts: list):
        """Process 0 broadcasts this iteration's admissions and aborts; every process then
        makes the same host decisions and so runs the same jitted calls in the same order."""
        from jax.experimental import multihost_utils

        if self.is_leader:
            for req in new:
                self._next_rid += 1
                req.rid = self._next_rid
                self._by_rid[req.rid] = req
            self._stop_sent = not self._running
            msg = pickle.dumps(([(r.rid, r.request, r.max_new, r.best_of, r.seed) for r in new],
                                [r.rid for r in aborts], self._stop_sent))
        else:
            msg = b""
        # Two broadcasts: the length, then the bytes padded to a power of two (few shapes).
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(msg))))
        size = 1 << max(10, (n - 1).bit_length())
        buf = np.zeros((size,), np.uint8)
        buf[: len(msg)] = np.frombuffer(msg, np.uint8)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        if self.is_leader:
            return new, aborts
        items, abort_ids, stop = pickle.loads(buf[:n].tobytes())
        new = []
        for rid, request, max_new, best_of, seed in items:
            req = _Req(request=request, callback=lambda ev: None, max_new=max_new, best_of=best_of, seed=seed)
            req.rid = rid
            self._by_rid[rid] = req
            new.append(req)
        aborts = [self._by_rid[i] for i in abort_ids if i in self._by_rid]
        if stop:
            self._running = False
        return new, aborts

    def run_follower(self) -> None:
        """Processes other than 0: run the same loop, fed by process 0's broadcasts, until it stops."""
        self._running = True
        while self._running:
            self.step()
            self._forget_done()

    def _forget_done(self) -> None:
        for rid in [rid for rid, r in self._by_rid.items() if r.done]:
            del self._by_rid[rid]

    def _abort(self, req: _Req) -> None:
        req.aborted = True
        with self._lock:
            self._aborts.append(req)
        self._wake.set()

    def _start_request(self, req: _Req) -> bool:
        """Sets up a new request. True: it still needs its prefill (the caller batches those
        of one iteration); echo with logprobs is prefilled and queued here, alone."""
        r = req.request
        if req.aborted:
            return False
        echo_ids = r.echo_prompt if r.echo_prompt is not None else r.prompt
        prompt_text = self.tokenizer.decode(echo_ids)
        req.prompt_text = prompt_text if r.echo else ""
        req.prompt_chars = len(prompt_text)
        req.choices = [_Choice(req, i, IncrementalDetokenizer(self.tokenizer)) for i in range(req.best_of)]
        need_prompt_lp = r.echo and r.logprobs is not None
        if not need_prompt_lp:
            if req.max_new == 0:
                self._finish_empty(req)
                return False
            return True
        self._prefill([req], want_logprobs=True)
        if req.max_new == 0:  # scoring a text: the prompt's logprobs are the whole answer
            self._finish_empty(req)
            return False
        req.waiting.extend(req.choices)
        self._queue.append(req)
        return False

    def _finish_empty(self, req: _Req) -> None:
        """max_tokens 0: every choice ends at once with "length"."""
        for c in req.choices:
            c.finish = "length"
        self._finish_request(req)

    def _prefill(self, reqs: list, want_logprobs: bool) -> None:
        """Prefills `reqs`: one call per group of same-bucket prompts (see `prefill_rows`)."""
        by_bucket: dict = {}
        for req in reqs:
            bucket = next(b for b in self.buckets if b >= len(req.request.prompt))
            by_bucket.setdefault(bucket, []).append(req)
        for bucket, group in by_bucket.items():
            most = 1 if want_logprobs else self.prefill_rows[bucket][-1]
            for i in range(0, len(group), most):
                chunk = group[i:i + most]
                rows = next(p for p in self.prefill_rows[bucket] if p >= len(chunk))
                tokens = np.zeros((rows, bucket), np.int32)
                lengths = np.ones((rows,), np.int32)  # padding rows: one token, never read
                for j, req in enumerate(chunk):
                    tokens[j, : len(req.request.prompt)] = req.request.prompt
                    lengths[j] = len(req.request.prompt)
                cache, last, lp, top_ids, top_lps = prefill(
                    self.graphdef, self.params, self.head, tokens, lengths,
                    want_logprobs=want_logprobs, top_k=self.top_k, mesh=self.mesh)
                self.prefill_calls += 1
                for j, req in enumerate(chunk):
                    req.prefix = (cache, last, j, int(lengths[j]))
                if want_logprobs:
                    req = chunk[0]
                    req.prompt_lp = self._prompt_logprobs(req, np.asarray(lp), np.asarray(top_ids),
                                                          np.asarray(top_lps))

    def _prompt_logprobs(self, req: _Req, lp, top_ids, top_lps) -> Logprobs:
        """Echo logprobs of the prompt: first token null, others from the prefill."""
        r = req.request
        ids = r.echo_prompt if r.echo_prompt is not None else r.prompt
        # With a FIM prompt the user's tokens start after <|fim_prefix|> (index 1).
        first = 1 if r.echo_prompt is not None else 0
        out, offset = Logprobs(), 0
        for i, tok in enumerate(ids):
            s = self.tokenizer.token_str(tok)
            out.tokens.append(s)
            out.text_offset.append(offset)
            j = first + i - 1  # index into lp: logprob of prompt token first+i
            if i == 0:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(float(lp[j]))
                out.top_logprobs.append(self._top_dict(tok, float(lp[j]), top_ids[j], top_lps[j], r.logprobs))
            offset += len(self.tokenizer.decode([tok]))
        return out

    def _top_dict(self, tok, tok_lp, top_ids, top_lps, k) -> dict:
        d = {self.tokenizer.token_str(int(t)): float(v) for t, v in zip(top_ids[:k], top_lps[:k])}
        d.setdefault(self.tokenizer.token_str(int(tok)), tok_lp)
        return d

    def _row_arrays(self, r: Request, seed: int, index: int) -> dict:
        bias = np.zeros((self.config.padded_vocab,), np.float32)
        for tok, val in (r.logit_bias or {}).items():
            bias[int(tok)] = val
        if self.config.fim:
            # FIM control tokens only arrange prompts; a completion never produces them.
            bias[[FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]] = -np.inf
        return dict(temperature=np.float32(r.temperature), top_p=np.float32(r.top_p),
                    presence=np.float32(r.presence_penalty), frequency=np.float32(r.frequency_penalty),
                    num_logprobs=np.int32(r.logprobs or 0), key=sampling.row_key(seed, index),
                    bias=bias)

    def _admit(self) -> None:
        free = [s for s, c in enumerate(self._slot_choice) if c is None]
        while free and self._queue:
            req = self._queue[0]
            if req.aborted or not req.waiting:
                self._queue.popleft()
                continue
            choice = req.waiting.popleft()
            if not req.waiting:
                self._queue.popleft()
            slot = free.pop(0)
            cache, last, prow, P = req.prefix
            row = self._row_arrays(req.request, req.seed, choice.index)
            self.state = insert(self.state, cache, np.int32(prow), np.int32(slot), mesh=self.mesh)
            self.state, tok, lp, top_ids, top_lps = start_row(
                self.state, last, np.int32(prow), np.int32(slot), np.int32(P), row, top_k=self.top_k,
                mesh=self.mesh)
            choice.slot = slot
            self._slot_choice[slot] = choice
            self._slot_pos[slot] = P
            # Outputs of one row, one step: row 0 of this item stands for `slot`.
            self._pending.append(("insert", {0: choice}, (tok, lp, top_ids, top_lps)))
            if not req.waiting:
                req.prefix = None  # the last copy is placed: drop the prefill's device buffers

    def _dispatch_decode(self) -> None:
        steps = self.decode_steps
        occupied = [s for s, c in enumerate(self._slot_choice) if c is not None]
        need = min(max(self._slot_pos[s] for s in occupied) + steps + 1, self.context_length)
        window = next(w for w in self.windows if w >= need)
        rows = next(r for r in self.row_buckets if r > occupied[-1])
        self.state, toks, lps, top_ids, top_lps = decode(
            self.graphdef, self.params, self.head, self.state, steps=steps, window=window,
            rows=rows, top_k=self.top_k, mesh=self.mesh)
        self.decode_calls += 1
        owners = {}
        for s, c in enumerate(self._slot_choice):
            if c is not None:
                owners[s] = c
                self._slot_pos[s] = min(self._slot_pos[s] + steps, self.context_length - 1)
        self._pending.append(("decode", owners, (toks, lps, top_ids, top_lps)))

    # ---------------------------------------------------------------- turning tokens into text

    def _process(self, item) -> None:
        kind, owners, outs = item
        toks, lps, top_ids, top_lps = (np.asarray(a) for a in outs)  # waits for that program
        if kind == "insert":  # [1] -> [steps=1, rows=1]
            toks, lps = toks.reshape(1, 1), lps.reshape(1, 1)
            top_ids, top_lps = top_ids.reshape(1, 1, -1), top_lps.reshape(1, 1, -1)
        touched = set()
        for slot, choice in owners.items():
            if choice.finish is not None or choice.req.aborted:
                continue
            for t in range(toks.shape[0]):
                self._add_token(choice, int(toks[t, slot]), float(lps[t, slot]), top_ids[t, slot], top_lps[t, slot])
                if choice.finish is not None:
                    break
            touched.add(choice.req)
        for req in touched:
            if req.request.stream:
                self._stream(req)
            if all(c.finish is not None for c in req.choices):
                self._finish_request(req)

    def _add_token(self, c: _Choice, tok: int, lp: float, top_ids, top_lps) -> None:
        req, r = c.req, c.req.request
        c.generated += 1
        c.logprob_sum += lp
        self.generated_tokens += 1
        cut_by_stop = False
        if tok == self.tokenizer.eos_id:
            c.finish = "stop"  # EOS: its text is not returned
        else:
            c.offsets.append(len(c.text))
            c.token_ids.append(tok)
            if r.logprobs is not None:
                c.lps.append(lp)
                c.tops.append(self._top_dict(tok, lp, top_ids, top_lps, r.logprobs))
            before = len(c.text)
            c.text += c.detok.add([tok])
            cut_by_stop = bool(r.stop) and self._match_stop(c, before)
        if c.finish is None and (c.generated >= req.max_new
                                 or len(r.prompt) + c.generated >= self.context_length):
            c.finish = "length"
        if c.finish is None:
            return
        if not cut_by_stop:
            # Bytes of an unfinished character are all that is left: show them as U+FFFD.
            before = len(c.text)
            c.text += c.detok.flush()
            if r.stop and len(c.text) > before:
                self._match_stop(c, before)
        self._free(c)

    def _match_stop(self, c: _Choice, before: int) -> bool:
        """Cuts the text before the first stop string that text past `before` completes."""
        hits = []
        for s in c.req.request.stop:
            i = c.text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                hits.append(i)
        if hits:
            cut = min(hits)
            c.text = c.text[:cut]
            keep = bisect.bisect_left(c.offsets, cut)
            del c.offsets[keep:], c.token_ids[keep:]
            del c.lps[keep:], c.tops[keep:]
            c.finish = "stop"
        return bool(hits)

    def _holdback(self, c: _Choice) -> int:
        """Characters at the end of the text that could still begin a stop string."""
        if c.finish is not None:
            return 0
        text, hold = c.text, 0
        for s in c.req.request.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _free(self, c: _Choice) -> None:
        if c.slot is not None and self._slot_choice[c.slot] is c:
            self._slot_choice[c.slot] = None
        c.slot = None

    def _logprobs_slice(self, c: _Choice, start: int, end: int) -> Logprobs:
        """Completion logprobs of tokens start..end-1; offsets count the prompt's characters first."""
        return Logprobs(
            tokens=[self.tokenizer.token_str(t) for t in c.token_ids[start:end]],
            token_logprobs=c.lps[start:end],
            top_logprobs=c.tops[start:end],
            text_offset=[c.req.prompt_chars + o for o in c.offsets[start:end]])

    def _stream(self, req: _Req) -> None:
        want_lp = req.request.logprobs is not None
        for c in req.choices:
            text, lp = "", None
            if req.request.echo and not c.echo_sent:
                c.echo_sent = True
                text = req.prompt_text
                if want_lp:
                    lp = Logprobs()
                    lp.extend(req.prompt_lp or Logprobs())
            end = len(c.text) - self._holdback(c)
            if end > c.sent:
                text += c.text[c.sent:end]
                c.sent = end
            if want_lp:
                # offsets ascend: bisect keeps a long stream's per-step work constant.
                n_tok = bisect.bisect_left(c.offsets, end) if c.finish is None else len(c.token_ids)
                if n_tok > c.sent_tokens:
                    lp = lp or Logprobs()
                    lp.extend(self._logprobs_slice(c, c.sent_tokens, n_tok))
                    c.sent_tokens = n_tok
            finished_now = c.finish is not None and not c.final_sent
            if text or (lp is not None and lp.tokens) or finished_now:
                c.final_sent = c.final_sent or finished_now
                self._call(req, Delta(index=c.index, text=text, logprobs=lp,
                                      finish_reason=c.finish if finished_now else None))

    def _finish_request(self, req: _Req) -> None:
        if req.done:
            return
        r = req.request
        for c in req.choices:
            self._free(c)
        if r.stream:
            self._stream(req)
        ranked = req.choices
        if req.best_of > r.n:
            ranked = sorted(req.choices, key=lambda c: -(c.logprob_sum / max(c.generated, 1)))[: r.n]
        choices = []
        for i, c in enumerate(ranked):
            lp = None
            if r.logprobs is not None:
                lp = Logprobs()
                if r.echo and req.prompt_lp is not None:
                    lp.extend(req.prompt_lp)
                lp.extend(self._logprobs_slice(c, 0, len(c.token_ids)))
            text = (req.prompt_text if r.echo else "") + c.text
            choices.append(Choice(index=i, text=text, token_ids=list(c.token_ids),
                                  finish_reason=c.finish or "length", logprobs=lp))
        result = Result(choices=choices, prompt_tokens=len(r.prompt),
                        completion_tokens=sum(c.generated for c in req.choices))
        req.done = True
        self._call(req, result)

    def _release(self, req: _Req) -> None:
        """Abort: free the request's slots and forget its waiting choices."""
        req.aborted = True
        req.waiting.clear()
        req.prefix = None
        for c in req.choices:
            if c.finish is None:
                c.finish = "abort"
            self._free(c)
        req.done = True

    def _fail_all(self, exc: Exception) -> None:
        """Ends every request in flight with `exc` and frees all slots."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        reqs = inbox + list(self._queue) + [c.req for c in self._slot_choice if c is not None]
        self._queue.clear()
        self._pending.clear()
        self._slot_choice = [None] * self.slots
        for req in dict.fromkeys(reqs):
            self._fail(req, exc)

    def _fail(self, req: _Req, exc: Exception) -> None:
        if not req.done:
            req.done = True
            self._call(req, exc)

    def _call(self, req: _Req, event) -> None:
        if req.aborted and not isinstance(event, Exception):
            return
        try:
            req.callback(event)
        except Exception:  # a broken callback must not take the engine down
            logging.getLogger(__name__).exception("request callback failed")
