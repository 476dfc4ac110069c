"""The device programs: the decode state, and the jitted prefill / insert / start_row / decode.

Nothing else lives here: the host loop (`engine.py`) decides what to run, these compute it.
Every function is a module-level jit of explicit arguments (params passed in, the state
donated), so two engines of one shape share their compiled programs. Only shapes and
flags are static; every request parameter is a value in an array.

Shape letters, used the same way in every module (model, sampling, programs, engine):

    S  slots: the rows of the decode state          B  rows of one call (prompts in
    T  tokens per row in one call (a prompt            prefill; the occupied prefix of
       bucket in prefill, 1 in decode)                 the slots in decode)
    L  cache length (the context, n_positions)      W  attention window: the prefix of
    D  n_embd   N  heads   H  head_dim                 the cache attention reads (W <= L)
    F  MLP hidden (4 D)    V  padded vocabulary     K  top-logprobs width (the engine's cap)

Programs (what the engine calls, in order, for one request):
  prefill    tokens i32[B, T] -> per-prompt KV and last logits (B prompts of one bucket share a call),
             and with prompt logprobs those of every prompt position
  insert     one prompt's KV -> one slot of the state's cache, and its row of the last logits
  start_row  that slot's sampling row, and its first token sampled from the prefill's logits
  decode     `steps` tokens for the first B slots, attention over the first W cache entries
  verify     speculative decoding: up to K proposed tokens a row checked in one forward pass

While a constrained row (structured output) runs, decode goes in two halves, one token a
call: `forward` (the model, logits left on the device) and `sample_next` (sampling under
the masks the host filled meanwhile).

The prefix cache's programs (a pool of KV blocks, `extend`) are in `pool_programs.py`; the
compiler settings every program is compiled with (XLA:CPU option sets, the compile cache,
the compile count) in `xla_options.py`; compiling them all before serving, and timing the
option sets, in `precompile.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pgpt_jax import dense, sampling, sharding
from pgpt_jax.xla_options import StaticGraph, merge
from pgpt_jax.xla_options import program as _program
from pgpt_jax.model import init_cache, lm_head, split_qkv


# --------------------------------------------------------------------------- device state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries on the device, one pytree donated to every call."""

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
        return jax.device_put(make(), jax.local_devices()[0])  # committed, as the params (see precompile.zeros_like)
    return jax.jit(make, out_shardings=sharding.state_shardings(jax.eval_shape(make), mesh))()


def _constrain(state: DecodeState, outs: tuple, mesh: Optional[Mesh]):
    """Keeps the state on its shardings and makes host-bound outputs readable by every process."""
    if mesh is None:
        return state, outs
    state = jax.lax.with_sharding_constraint(state, sharding.state_shardings(state, mesh))
    outs = jax.lax.with_sharding_constraint(outs, sharding.replicated(mesh))
    return state, outs


def program_params(model, mesh: Optional[Mesh] = None, *, packed: Optional[bool] = None):
    """(graphdef, params, head): the model split for the programs (its GraphDef as a
    `StaticGraph`), and its transposed LM head.

    The programs' copy of the params is laid out for them, once, here; the model and its
    checkpoints keep HF's layout. c_attn is seen as [D, 3, N, H] (`model.split_qkv`: a
    reshape), so that a mesh splits it by head. On CPU, params stored narrower than the
    compute dtype are upcast: XLA:CPU has no native bf16 matmul and would convert stored
    bf16 weights on every call (the embedded model ships bf16). With a mesh, params land on
    their shardings (already-placed ones stay). Where the native dense kernel fits (one CPU
    device, float32; `dense.fits`) or `packed` says so, the dense weights and the head are
    packed in its column panels (`dense.pack_params`).
    """
    graphdef, params = nnx.split(model)
    graphdef = StaticGraph(graphdef)  # hashed once, not on every call
    params = split_qkv(params, model.config)
    if jax.default_backend() == "cpu":
        compute = jnp.dtype(model.config.dtype)
        params = jax.tree.map(lambda a: a.astype(compute) if a.dtype.itemsize < compute.itemsize else a, params)
    # Placed (committed) in every case, on the mesh's shardings or on this process's first
    # device: whether a program's inputs are committed is part of its jit cache key, and
    # params that were or were not committed depending on where the model came from (a
    # restored checkpoint is, a freshly initialised model is not) made warm-up's key differ
    # from serving's.
    params = jax.device_put(params, sharding.param_shardings(params, mesh) if mesh is not None
                            else jax.local_devices()[0])
    head = transposed_head(graphdef, params, mesh=mesh)
    if dense.fits(model.config.dtype, mesh) if packed is None else packed:
        params, head = dense.pack_params(params, head)
    return graphdef, params, head


# --------------------------------------------------------------------------- programs


@_program(static_argnames=("graphdef", "mesh"))
def transposed_head(graphdef, params, *, mesh=None):
    """The LM head as its own [D, V] array (`model.lm_head`), vocabulary over `model`."""
    head = lm_head(merge(graphdef, params))
    if mesh is not None:
        head = jax.lax.with_sharding_constraint(
            head, NamedSharding(mesh, sharding.spec(("embed", "vocab"))))
    return head


@_program(static_argnames=("graphdef", "want_logprobs", "top_k", "mesh"))
def prefill(graphdef, params, head, tokens, true_len, wanted, *, want_logprobs: bool, top_k: int, mesh=None):
    """tokens i32[B, T] (B prompts padded to a bucket T), true_len i32[B] -> their KV and logits.

    Returns (cache: per layer ([B, N, T, H], [B, N, T, H]), last_logits f32[B, V],
    prompt logprobs f32[B, T-1] of each row's tokens 1..T-1, top ids i32[B, T-1, K], top
    logprobs f32[B, T-1, K], ranks i32[B, T-1] of those tokens (`sampling.token_ranks`)); the
    prompt-logprob arrays are empty unless `want_logprobs` (echo and prompt_logprobs: logits
    at every prompt position, the costly part). `wanted` i32[2] says, as values, what the
    rows will read of them: how many top entries (0..K; columns past it are unspecified) and
    whether ranks (else zeros), so that a call skips the passes over [B, T-1, V] nobody reads
    without a program per combination. Prompts that arrive together share one call: B rows
    of T tokens make one [B*T, D] matmul per weight.
    """
    model = merge(graphdef, params)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, cache = model(tokens, positions, init_cache(model.config, B, T))
    last_hidden = jnp.take_along_axis(hidden, (true_len - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    last_logits = model.logits(last_hidden, head)
    if want_logprobs:
        lp, top_ids, top_lps, ranks = _prompt_logprobs(model, hidden[:, :-1], head, tokens[:, 1:], wanted,
                                                       top_k, split_vocab=mesh is not None and mesh.shape["model"] > 1)
    else:
        lp, ranks = jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
        top_ids, top_lps = jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(
            cache, sharding.pool_sharding(mesh))
        last_logits, lp, top_ids, top_lps, ranks = jax.lax.with_sharding_constraint(
            (last_logits, lp, top_ids, top_lps, ranks), sharding.replicated(mesh))
    return cache, last_logits, lp, top_ids, top_lps, ranks


HEAD_BLOCK = 1024  # columns of the LM head a `head_logprobs` step covers, at most (a divisor of V)


def head_logprobs(hidden, head, ids, k: int, vocab_size: int, never=()):
    """Raw logprobs of `ids` and the most likely token, straight from the LM head, without writing
    the [..., V] logits out: hidden [..., D], head [D, V] (`model.lm_head`), ids i32[...] ->
    (logprob f32[...], top_ids i32[..., k], top_logprobs f32[..., k]), the top entry in column 0
    (later columns zero). The same numbers, up to float rounding, as `sampling.logprobs_of(
    logits, ids, k, never, wanted=1)` on `GPT.logits(hidden, head)`: the same logits, their max
    and first index of the max (tokens in `never` left out of it), log-sum-exp.

    A `lax.fori_loop` over blocks of columns: each step multiplies by a [D, C] block of the
    head and reduces the [..., C] logits while they are in cache (running max and sum of
    exponentials, first index of the max, the token's own logit). On CPU, the reductions over
    written-out [255, V] logits of one prompt ran at ~4.5 ns an element (they stream 51 MB
    from memory, three times); a block at a time they cost about nothing beside the matmul
    (docs/benchmarks.md, "Scoring"). Whole vocabulary only (no `model` split of V).
    """
    packed = dense.is_packed(head)  # [V / PANEL, D, PANEL]: blocks of whole panels
    lead, D = ids.shape, hidden.shape[-1]
    V = head.shape[0] * dense.PANEL if packed else head.shape[-1]
    h = hidden.reshape(-1, D).astype(head.dtype)  # [N, D]
    flat = ids.reshape(-1)
    unit = dense.PANEL if packed else 1
    C = next(c for c in range(min(HEAD_BLOCK, V), 0, -1) if V % c == 0 and c % unit == 0)
    never = jnp.asarray(never, jnp.int32)

    def columns(off):  # the head's columns off..off+C-1
        if packed:
            return jax.lax.dynamic_slice_in_dim(head, off // unit, C // unit, axis=0)
        return jax.lax.dynamic_slice_in_dim(head, off, C, axis=1)

    def step(i, carry):
        m, s, best, first, own = carry
        off = i * C
        x = dense.matmul(h, columns(off)).astype(jnp.float32)  # [N, C]
        col = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) + off
        x = jnp.where(col < vocab_size, x, -jnp.inf)  # padded vocabulary
        shown = jnp.where(jnp.isin(col, never), -jnp.inf, x) if never.size else x
        f = jnp.argmax(shown, axis=-1).astype(jnp.int32)  # first index of the block's max
        b = jnp.take_along_axis(shown, f[:, None], axis=-1)[:, 0]
        bm = jnp.max(x, axis=-1) if never.size else b  # the log-sum-exp counts every token
        new_m = jnp.maximum(m, bm)
        safe = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
        s = s * jnp.exp(m - safe) + jnp.sum(jnp.exp(x - safe[:, None]), axis=-1)
        here = (flat >= off) & (flat < off + C)
        mine = jnp.take_along_axis(x, jnp.clip(flat - off, 0, C - 1)[:, None], axis=-1)[:, 0]
        better = b > best  # ties keep the earlier block: the lower id
        return (new_m, s, jnp.where(better, b, best), jnp.where(better, f + off, first),
                jnp.where(here, mine, own))

    N = h.shape[0]
    minus = jnp.full((N,), -jnp.inf, jnp.float32)
    m, s, best, first, own = jax.lax.fori_loop(
        0, V // C, step, (minus, jnp.zeros((N,), jnp.float32), minus, jnp.zeros((N,), jnp.int32), minus))
    lse = jnp.log(s) + jnp.where(jnp.isfinite(m), m, 0.0)
    top_ids = jnp.zeros((N, k), jnp.int32)
    top_logprobs = jnp.zeros((N, k), jnp.float32)
    if k:
        top_ids, top_logprobs = top_ids.at[:, 0].set(first), top_logprobs.at[:, 0].set(best - lse)
    return ((own - lse).reshape(lead), top_ids.reshape(lead + (k,)), top_logprobs.reshape(lead + (k,)))


def _prompt_logprobs(model, hidden, head, ids, wanted, top_k: int, split_vocab: bool):
    """hidden [B, T-1, D] -> what prefill returns of the logprobs of ids i32[B, T-1] (the
    tokens each position predicts). Top 0 or 1 without ranks, scoring's ask, goes straight
    from the LM head a block of columns at a time (`head_logprobs`); anything more
    writes the [B, T-1, V] logits out and reduces them (`sampling.logprobs_of`, `token_ranks`).
    Which, is decided by the values in `wanted`: both are in the program."""
    never, B, T1 = model.config.never_emitted, ids.shape[0], ids.shape[1]
    no_ranks = jnp.zeros((B, T1), jnp.int32)

    def written_out():
        logits = model.logits(hidden, head)  # [B, T-1, V]
        lp, top_ids, top_lps = sampling.logprobs_of(logits, ids, top_k, never, wanted=wanted[0])
        ranks = jax.lax.cond(wanted[1] > 0, lambda: sampling.token_ranks(logits, ids, never), lambda: no_ranks)
        return lp, top_ids, top_lps, ranks

    if split_vocab:  # the head's columns are split over devices: no blocks of them here
        return written_out()
    return jax.lax.cond((wanted[0] <= 1) & (wanted[1] == 0),
                        lambda: (*head_logprobs(hidden, head, ids, top_k, model.config.vocab_size, never),
                                 no_ranks),
                        written_out)


@_program(static_argnames=("mesh",), donate_argnums=(0,))
def insert(state: DecodeState, prompt_cache, last_logits, index, slot, *, mesh=None):
    """Copies prompt `index` of a prefill's KV (per layer ([B, N, T, H], ...)) into `slot`, and
    picks that prompt's row of the prefill's last logits f32[B, V]: returns (state, f32[1, V]).

    One program per prefill shape (B, T), and nothing else in it: sampling the first token
    is `start_row`'s job, on the one row, so the sampler in it compiles once, not once per B.
    """
    def put(full, prompt):
        one = jax.lax.dynamic_slice_in_dim(prompt, index, 1, axis=0)
        return jax.lax.dynamic_update_slice(full, one.astype(full.dtype), (slot, 0, 0, 0))

    cache = tuple((put(k, pk), put(v, pv)) for (k, v), (pk, pv) in zip(state.cache, prompt_cache))
    last = jax.lax.dynamic_slice_in_dim(last_logits, index, 1, axis=0)
    state, (last,) = _constrain(dataclasses.replace(state, cache=cache), (last,), mesh)
    return state, last


@_program(static_argnames=("top_k", "mesh"), donate_argnums=(0,))
def start_row(state: DecodeState, last_logits, slot, true_len, row: sampling.SamplingRows, *,
              top_k: int, mesh=None):
    """Sets `slot`'s sampling row and samples its first token from its prompt's last logits.

    last_logits f32[1, V] (`insert` picks it from the prefill's); `row` is one row of sampling
    parameters (`sampling.request_row`, counts None: a new row has generated nothing).
    Returns (state, token i32[1], logprob f32[1], top ids i32[1, K], top logprobs f32[1, K]).
    """
    rows = state.rows
    one = dataclasses.replace(row, counts=jnp.zeros((1, rows.counts.shape[1]), rows.counts.dtype),
                              key=row.key.astype(rows.key.dtype))
    tok, lp, top_ids, top_lps, one = sampling.sample(last_logits, one, jnp.reshape(true_len, (1,)), top_k=top_k,
                                                     mesh=mesh)
    rows = jax.tree.map(lambda all_rows, new: all_rows.at[slot].set(new[0]), rows, one)
    state = dataclasses.replace(state, tokens=state.tokens.at[slot].set(tok[0]),
                                positions=state.positions.at[slot].set(true_len), rows=rows)
    state, outs = _constrain(state, (tok, lp, top_ids, top_lps), mesh)
    return (state, *outs)


@_program(static_argnames=("graphdef", "steps", "window", "rows", "top_k", "mesh"), donate_argnums=(3,))
def decode(graphdef, params, head, state: DecodeState, span, *, steps: int, window: int, rows: int, top_k: int,
           mesh=None):
    """Runs `steps` decode steps for the first `rows` (B) slots in one program.

    Attention reads only the first `window` (W) cache entries and only the first B slots
    run (the host picks buckets that cover every occupied slot; free slots past B cost
    nothing). `span` (i32, a value: 1..W) is how many cache entries the occupied rows read
    in this call, the scheduler's need; a free slot among the B rows is held below it
    (`_forward`). No row may be constrained: a constrained row's next mask needs the host
    between steps (`forward` and `sample_next` run those). Returns (state, tokens
    i32[steps, B], logprobs f32[steps, B], top ids i32[steps, B, K], top logprobs f32[steps, B, K]).
    """
    model = merge(graphdef, params)

    def one_step(carry, _):
        cache, tokens, positions, sampling_rows = carry
        logits, cache, new_pos = _forward(model, head, cache, tokens, positions, window, span)
        tok, lp, top_ids, top_lps, sampling_rows = sampling.sample(
            logits, sampling_rows, new_pos, top_k=top_k, mesh=mesh)
        return (cache, tok, new_pos, sampling_rows), (tok, lp, top_ids, top_lps)

    first = lambda a: a[:rows]  # noqa: E731
    carry = (state.cache, first(state.tokens), first(state.positions), jax.tree.map(first, state.rows))
    (cache, tokens, positions, sampling_rows), outs = jax.lax.scan(one_step, carry, None, length=steps)
    state = DecodeState(cache, _put(state.tokens, tokens), _put(state.positions, positions),
                        jax.tree.map(_put, state.rows, sampling_rows))
    state, outs = _constrain(state, outs, mesh)
    return (state, *outs)


def _forward(model, head, cache, tokens, positions, window: int, span):
    """One token of each of B rows through the model: (logits f32[B, V], cache, next positions).

    Positions are held below `span`: an occupied row's is already (the host's need covers
    it), a free slot's runs on from where its last request ended and would otherwise set
    how far the blocked attention reads (the furthest row's position). Its output is
    garbage either way, and what it writes into its own slot's cache at span - 1 is
    written again before any row reads it (by the next prompt's insert, or by that row's
    own step at that position: a row reads only entries up to its position)."""
    positions = jnp.minimum(positions, span - 1)
    hidden, cache = model(tokens[:, None], positions[:, None], cache, window)
    logits = model.logits(hidden[:, 0], head)  # [B, V]
    new_pos = jnp.minimum(positions + 1, model.config.n_positions - 1)  # free slots may run on; clamp them
    return logits, cache, new_pos


def _put(full, part):
    """`part` [B, ...] written over the first B rows of `full` [S, ...]."""
    return jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)


@_program(static_argnames=("graphdef", "window", "rows", "mesh"), donate_argnums=(3,))
def forward(graphdef, params, head, state: DecodeState, span, *, window: int, rows: int, mesh=None):
    """The first half of a decode step that waits for masks: the first `rows` (B) slots' last
    tokens through the model (their KV written, positions advanced), sampling nothing;
    `span` as `decode`'s.

    Structured output: a constrained row's next mask depends on the token it sampled last,
    which the host reads while this runs (its input token is already on the device), so that
    filling the masks overlaps the forward pass; `sample_next` then samples under them.
    Returns (state, logits f32[B, V]), the logits left on the device for `sample_next`.
    """
    model = merge(graphdef, params)
    logits, cache, new_pos = _forward(model, head, state.cache, state.tokens[:rows], state.positions[:rows], window,
                                      span)
    state = dataclasses.replace(state, cache=cache, positions=_put(state.positions, new_pos))
    if mesh is not None:
        state = jax.lax.with_sharding_constraint(state, sharding.state_shardings(state, mesh))
    return state, logits


@_program(static_argnames=("top_k", "mesh"), donate_argnums=(0,))
def sample_next(state: DecodeState, logits, masks, *, top_k: int, mesh=None):
    """The second half: samples the B rows `forward` ran from its logits f32[B, V] under masks
    u32[B, V/32], the next-token masks of the constrained rows among them (other rows' are
    never read). Returns what `decode` returns at steps=1."""
    rows = logits.shape[0]
    first = jax.tree.map(lambda a: a[:rows], state.rows)
    first = dataclasses.replace(first, mask=masks.astype(jnp.uint32))
    tok, lp, top_ids, top_lps, sampling_rows = sampling.sample(logits, first, state.positions[:rows], top_k=top_k,
                                                               mesh=mesh)
    state = dataclasses.replace(state, tokens=_put(state.tokens, tok), rows=jax.tree.map(_put, state.rows, sampling_rows))
    state, outs = _constrain(state, tuple(a[None] for a in (tok, lp, top_ids, top_lps)), mesh)
    return (state, *outs)


@_program(static_argnames=("graphdef", "window", "rows", "top_k", "mesh"), donate_argnums=(3,))
def verify(graphdef, params, head, state: DecodeState, proposals, lengths, *, window: int, rows: int, top_k: int,
           mesh=None):
    """Speculative decoding: checks up to K proposed tokens for each of the first `rows` (B)
    slots in one forward pass, and takes 1..K+1 tokens a row.

    proposals i32[B, K] (row b's first lengths[b] are real, i32[B] in 0..K; the rest is
    padding). Each row's last token and its proposals go through the model at positions
    p..p+K (their KV written; entries past what the row keeps are garbage that later calls
    overwrite before anything reads them: a query sees only entries up to its position).
    Then, for j = 0..K, the row samples position p+1+j from the logits after its j-th input
    exactly as `decode` would (`sampling.sample`: the same processed distribution, counts
    that include the tokens taken before, the same key for that position), and goes on only
    while that token equals proposal j. So a greedy row takes argmaxes while they match the
    proposals, then the argmax at the first mismatch (or a bonus token after all K), and a
    sampled row accepts proposal x exactly when its own draw is x, which happens with
    probability p(x); at the first rejection its token is that draw, distributed as p with x
    removed and renormalised (top_p's nucleus computed with x in it). Every row's tokens are
    the ones plain decoding gives with the same keys, up to the rounding of logits computed
    K+1 positions at a time.

    Returns (state, tokens i32[K+1, B], logprobs f32[K+1, B], top ids i32[K+1, B, K'], top
    logprobs f32[K+1, B, K'], taken i32[B]): row b's first taken[b] tokens are its output
    (K' is top_k); the state holds each row's last taken token and position p + taken.
    """
    model = merge(graphdef, params)
    B, K = proposals.shape
    L = model.config.n_positions
    start = state.positions[:rows]
    tokens = jnp.concatenate([state.tokens[:rows, None], proposals], axis=1)  # [B, K+1]
    positions = start[:, None] + jnp.arange(K + 1, dtype=jnp.int32)  # past L: written nowhere
    hidden, cache = model(tokens, positions, state.cache, window)
    logits = model.logits(hidden, head)  # [B, K+1, V]
    after = jnp.concatenate([proposals, jnp.full((B, 1), -1, jnp.int32)], axis=1)  # what step j must equal

    def one_step(carry, xs):
        sampling_rows, alive = carry
        step_logits, proposal, j = xs
        tok, lp, top_ids, top_lps, sampled = sampling.sample(
            step_logits, sampling_rows, jnp.minimum(start + j + 1, L - 1), top_k=top_k, mesh=mesh)
        sampling_rows = dataclasses.replace(
            sampled, counts=jnp.where(alive[:, None], sampled.counts, sampling_rows.counts))
        return (sampling_rows, alive & (j < lengths) & (tok == proposal)), (tok, lp, top_ids, top_lps, alive)

    first = jax.tree.map(lambda a: a[:rows], state.rows)
    xs = (jnp.moveaxis(logits, 1, 0), after.T, jnp.arange(K + 1, dtype=jnp.int32))
    (sampling_rows, _), (toks, lps, top_ids, top_lps, alive) = jax.lax.scan(
        one_step, (first, jnp.ones((B,), bool)), xs)
    taken = jnp.sum(alive, axis=0, dtype=jnp.int32)  # [B], >= 1
    last = jnp.take_along_axis(toks, (taken - 1)[None], axis=0)[0]
    state = DecodeState(cache, _put(state.tokens, last), _put(state.positions, jnp.minimum(start + taken, L - 1)),
                        jax.tree.map(_put, state.rows, sampling_rows))
    state, outs = _constrain(state, (toks, lps, top_ids, top_lps, taken), mesh)
    return (state, *outs)


def no_masks(rows: int, state: DecodeState) -> np.ndarray:
    """Zeros u32[rows, V/32]: `sample_next`'s masks when none of its rows is constrained, a
    host array as the engine passes them (the same jit cache entry)."""
    return np.zeros((rows, state.rows.mask.shape[1]), np.uint32)
