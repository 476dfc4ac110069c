"""One sampling step for every row at once: logits [B, V] -> next tokens and their raw logprobs.

Every parameter is a per-row array (`SamplingRows`), so a new request never compiles a new
program; only `top_k` (the logprobs cap) and the prefilter widths are static. Per row:

    raw logits -> + logit_bias -> - penalties -> / temperature -> nucleus (top_p) -> sample

Penalties follow OpenAI: `mu[j] - c[j]*frequency - (c[j] > 0)*presence`, with c the counts
of tokens this row has *generated*. Temperature 0 is the argmax of the processed logits.
Reported logprobs are, per row (`SamplingRows.processed`, vLLM's `logprobs_mode`), the
model's raw ones (log_softmax of the logits, before any of that) or the processed ones: the
log-probabilities of the distribution the token was drawn from (after bias, penalties,
temperature and top_p; a greedy row's is the temperature-1 distribution after bias and
penalties, untruncated). Under top_p a token outside the nucleus has a processed logprob of
-inf; the host leaves such alternatives out (`outputs.py`).

The nucleus is the shortest prefix of the tokens in descending order of processed logit,
ties broken by lower token id (the order a stable sort gives), whose mass reaches top_p; it
always holds at least one token. A full sort of [32, 50304] costs more than a GPT-2 forward
pass on CPU, so the nucleus is found in three exact stages, each entered (lax.cond) only
when some row still needs it:
  1. `lax.top_k` prefilter, all rows at once: if the top `nucleus_k` tokens already hold
     mass >= top_p, the nucleus lies inside them and its boundary is read off directly
     (peaked distributions, the common case).
  2. Rejection, row by row for the rows left: draw candidates from the untruncated
     distribution and keep the first one inside the nucleus (membership is one masked
     sum). Each try succeeds with probability >= top_p, so flat distributions with a
     large top_p rarely go further.
  3. Bisection of that one row, when all its candidates fell outside (`draws.nucleus`): the
     nucleus' last value is found by halving the range of float keys, one masked sum over
     the row a halving, and the row draws from the tokens inside it as from a whole row.
     No sort: a row's sort and the [V] cumulative sum after it were many kernels to compile,
     in every program that samples (docs/benchmarks.md, "A sampler with fewer kernels").
A row's token depends only on its own logits, parameters and key, whichever stage other
rows need, so a seeded request gives the same tokens whatever else shares the batch.

Drawing from a [V] distribution uses inverse-CDF in two levels (blocks of 128 tokens, then
a token inside the chosen block; pgpt_jax/draws.py), with one uniform per level: no [B, V]
cumulative sum and no [B, V] of random bits. Keys are derived, never stored per step: a row's step key is
fold_in(row key, position), the row key being fold_in(key(seed), choice_index).

On a mesh, `sample` runs under shard_map: each device samples its own rows when `data`
splits them and, when `model` splits the vocabulary (the logits arrive split), its own
columns, so that no device ever holds another's [rows, V]. The vocabulary's shards combine
small pieces (`pgpt_jax/vocab.py`): a max, a sum and a first index per row; their top-k candidates,
merged into the global top k (logprobs, the prefilter); partial block masses, summed into
the [B, V/128] block masses; the chosen block's 128 weights. The draw is the same function
of the same uniforms, so the tokens are the single device's; sums that span shards are
added in another order, which can move a logprob or a mass by a rounding error. No stage
gathers a row's [V]: the bisection adds one scalar per row over the shards a halving.

Shape letters as in pgpt_jax/programs.py: B rows of the call (the slots a decode step runs),
V vocabulary (padded), K a top-k width (logprobs, or the nucleus prefilter); R rejection tries.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from pgpt_jax import draws, sharding
from pgpt_jax.vocab import Vocab

# Prefilter width. lax.top_k over [32, 50304] on a 2-core CPU: ~5 ms at K=64, 9 at 256, 23 at
# 1024; a wider prefilter only spares rejection to rows whose nucleus has 64..K tokens.
NUCLEUS_K = 64
# Rejection candidates per row before the bisection. One (the row's draw from the whole
# distribution, already made) settles a flat row with probability >= top_p in one masked sum;
# more tries cost a draw each and compile to more kernels in every sampling program.
REJECTION_TRIES = 1
MIN_TEMPERATURE = 1e-6  # a smaller (but > 0) temperature is clamped, so 1/T stays finite
MAX_LOGPROBS = 20  # the largest top-logprobs cap (`top_k`) a caller may ask for


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling parameters and state, B rows; a pytree of arrays.

    temperature, top_p, presence, frequency: f32[B]
    bias: f32[B, V] dense logit_bias;  counts: i32[B, V] tokens generated so far by the row
    num_logprobs: i32[B] top logprobs wanted (0..top_k);  key: u32[B, 2] raw key data
    (`jax.random.key_data`) of fold_in(key(seed), choice_index), see `row_key`.
    processed: bool[B] report processed logprobs rather than raw ones (see the module docstring).
    mask: u32[B, V/32] tokens a constrained row may sample next, bit j of word w for token
    32 w + j (`grammar.py`); read only for the rows with constrained: bool[B] set, and not at
    all when no row is.
    """

    temperature: jax.Array
    top_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    bias: jax.Array
    counts: jax.Array
    num_logprobs: jax.Array
    key: jax.Array
    processed: jax.Array
    mask: jax.Array
    constrained: jax.Array


def init_rows(slots: int, vocab: int) -> SamplingRows:
    """Defaults for S=slots rows over V=vocab: temperature 1, top_p 1, no bias or penalties."""
    key_width = jax.random.key_data(jax.random.key(0)).shape[-1]
    return SamplingRows(
        temperature=jnp.ones((slots,), jnp.float32),
        top_p=jnp.ones((slots,), jnp.float32),
        presence=jnp.zeros((slots,), jnp.float32),
        frequency=jnp.zeros((slots,), jnp.float32),
        bias=jnp.zeros((slots, vocab), jnp.float32),
        counts=jnp.zeros((slots, vocab), jnp.int32),
        num_logprobs=jnp.zeros((slots,), jnp.int32),
        key=jnp.zeros((slots, key_width), jnp.uint32),
        processed=jnp.zeros((slots,), bool),
        mask=jnp.zeros((slots, mask_words(vocab)), jnp.uint32),
        constrained=jnp.zeros((slots,), bool),
    )


def mask_words(vocab: int) -> int:
    """u32 words of a mask row over V=vocab tokens: ceil(V / 32). (A padded vocabulary is a
    multiple of 64, so a `model` split of it splits the words evenly too.)"""
    return -(-vocab // 32)


def row_key(seed: int, choice_index: int) -> np.ndarray:
    """u32[2]: key data of fold_in(key(seed), choice_index), the key of one choice of a request.

    Every bit of the signed 64-bit seed counts: threefry's key data is the seed's high and low
    32-bit words, which `jax.random.key(seed)` would cut to the low word without 64-bit mode
    (seeds 5 and 5 + 2**32 would sample alike). Seeds in [0, 2**32) keep their old keys.

    Computed on the host (`_threefry2x32`, what `jax.random.fold_in` computes for threefry
    keys): a device computation here would queue behind the programs in flight, and reading
    its result made placing a new request wait for its prefill (and every earlier call).
    """
    u = seed % 2**64
    # fold_in(key, data) is threefry2x32 of the counter (0, data) under the key.
    return np.array(_threefry2x32((u >> 32, u & 0xFFFFFFFF), (0, choice_index % 2**32)), np.uint32)


def _threefry2x32(key: tuple[int, int], count: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2,
    3", SC 2011), as JAX's PRNG defines it: one block of two 32-bit words."""
    m = 0xFFFFFFFF
    ks = (key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA)
    x0, x1 = (count[0] + ks[0]) & m, (count[1] + ks[1]) & m
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = (x0 + x1) & m
            x1 = (((x1 << r) | (x1 >> (32 - r))) & m) ^ x0
        x0 = (x0 + ks[(i + 1) % 3]) & m
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & m
    return x0, x1


def request_row(*, temperature: float, top_p: float, presence: float, frequency: float,
                logit_bias: Optional[Mapping[int, float]], banned: Sequence[int], num_logprobs: int,
                seed: int, choice_index: int, vocab: int, processed: bool = False,
                mask: Optional[np.ndarray] = None) -> SamplingRows:
    """One row (host numpy arrays of leading size 1) for one choice of a request: what
    `programs.start_row` writes into a slot. `banned` tokens get a -inf bias (tokens the model
    must never produce); counts is None (a new row has generated nothing). `mask` u32[V/32]:
    the tokens a constrained choice may sample first (its grammar's start), None: no constraint."""
    bias = np.zeros((1, vocab), np.float32)
    for tok, val in (logit_bias or {}).items():
        bias[0, int(tok)] = val
    bias[0, list(banned)] = -np.inf

    def one(value, dtype):
        return np.full((1,), value, dtype)

    return SamplingRows(temperature=one(temperature, np.float32), top_p=one(top_p, np.float32),
                        presence=one(presence, np.float32), frequency=one(frequency, np.float32),
                        bias=bias, counts=None, num_logprobs=one(num_logprobs, np.int32),
                        key=row_key(seed, choice_index)[None], processed=one(processed, bool),
                        mask=(np.zeros((1, mask_words(vocab)), np.uint32) if mask is None
                              else np.asarray(mask, np.uint32).reshape(1, -1)),
                        constrained=one(mask is not None, bool))


def logprobs_of(logits, ids, k: int, never=(), wanted=None):
    """Raw log-probabilities: logits f32[..., V], ids i32[...] ->
    (logprob f32[...], top_ids i32[..., k], top_logprobs f32[..., k]), k static (may be 0).
    Tokens in `never` (static: control tokens the model never produces) are left out of the top k.

    `wanted` (i32[], a value: no compile per value) is how many top entries the caller will
    read; columns past it are unspecified. It spares prompt logprobs, where [..., V] holds a
    row per prompt position, the passes it does not need: none for 0, and for 1 (scoring's
    usual ask) the row max the log-softmax computes anyway plus one pass for its first index,
    instead of lax.top_k. None: all k.
    """
    vocab = Vocab(logits.shape[-1])
    m = vocab.max(logits)
    lse = _logsumexp(logits, vocab, m)
    logprob = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - lse
    shown = logits.at[..., jnp.asarray(never, jnp.int32)].set(-jnp.inf) if never else logits
    if wanted is None or k == 0:
        top_ids, top_logprobs = _top_logprobs(shown, lse, k, vocab)
        return logprob, top_ids, top_logprobs

    def top_one():
        best = vocab.max(shown) if never else m
        first = _first_index_of(shown, best[..., None], vocab)
        pad = lambda a: jnp.pad(a[..., None], [(0, 0)] * a.ndim + [(0, k - 1)])  # noqa: E731
        return pad(first), pad(best - lse)

    none = lambda: (jnp.zeros(logits.shape[:-1] + (k,), jnp.int32),  # noqa: E731
                    jnp.zeros(logits.shape[:-1] + (k,), jnp.float32))
    top_ids, top_logprobs = lax.switch(jnp.clip(wanted, 0, 2), [none, top_one,
                                                                lambda: _top_logprobs(shown, lse, k, vocab)])
    return logprob, top_ids, top_logprobs


def token_ranks(logits, ids, never=()):
    """logits f32[..., V], ids i32[...] -> rank i32[...]: 1 + the number of tokens with a strictly
    higher logit (so a strictly higher logprob) than `ids`' own. Tokens in `never` (static) do
    not count, as they never enter `logprobs_of`'s top k; -inf padding never counts."""
    own = jnp.take_along_axis(logits, ids[..., None], axis=-1)  # [..., 1]
    shown = logits.at[..., jnp.asarray(never, jnp.int32)].set(-jnp.inf) if never else logits
    return 1 + jnp.sum(shown > own, axis=-1, dtype=jnp.int32)


def sample(logits, rows: SamplingRows, positions, *, top_k: int = 5,
           nucleus_k: int = NUCLEUS_K, rejection_tries: int = REJECTION_TRIES, mesh=None):
    """One step for all rows. logits f32[B, V], positions i32[B] (where the new token goes) ->
    (tokens i32[B], logprob f32[B], top_ids i32[B, top_k], top_logprobs f32[B, top_k], rows).

    logprob and top_logprobs are raw (log_softmax of `logits`), or processed on the rows that
    ask (`rows.processed`; then top_ids are the most likely tokens of the processed
    distribution, -inf past the nucleus); entries past a row's own num_logprobs are
    unspecified (the host trims). The returned rows have
    counts[s, tokens[s]] += 1. top_k, nucleus_k and rejection_tries are static; the last
    two change speed only, never which tokens can come out or with what probability.
    With a `mesh`, each device samples its own rows (rows split over `data`) and, when the
    `model` axis splits the vocabulary, its own columns of the [B, V] arrays (logits, bias,
    counts; see the module docstring); the results are the same as on one device.
    """
    B, V = logits.shape
    if not 0 <= top_k <= min(MAX_LOGPROBS, V):
        raise ValueError(f"top_k={top_k} must be in 0..{min(MAX_LOGPROBS, V)}")
    step = functools.partial(_sample, top_k=top_k, nucleus_k=nucleus_k, tries=max(rejection_tries, 1))
    rules = dict(sharding.LOGICAL_RULES)
    axis, row_axis = rules["vocab"], rules["slots"]
    shards, row_shards = (mesh.shape[axis], mesh.shape[row_axis]) if mesh is not None else (1, 1)
    row_axis = row_axis if row_shards > 1 and B % row_shards == 0 else None
    if shards == 1 and row_axis is None:
        return step(logits, rows, positions, vocab=Vocab(V))
    if V % shards:
        raise ValueError(f"the {axis} axis ({shards}) must divide the vocabulary ({V})")
    # Rows split over `data` run under shard_map too: left to the partitioner, lax.top_k and
    # the per-row slow paths gathered every row's [V] onto every device.
    vocab = Vocab(V, V // shards, axis if shards > 1 else None, row_axis)
    per_row, per_token = P(row_axis), P(row_axis, axis)
    row_specs = SamplingRows(temperature=per_row, top_p=per_row, presence=per_row, frequency=per_row,
                             bias=per_token, counts=per_token, num_logprobs=per_row, key=P(row_axis, None),
                             processed=per_row, mask=per_token, constrained=per_row)
    top = P(row_axis, None)
    # check_vma=False: the merged results (tokens, top k) are the same on every shard by
    # construction, but jax types an all_gather's result as varying over the axis and would
    # refuse to return them unsplit. tests/test_sharding.py checks them against one device.
    return jax.shard_map(functools.partial(step, vocab=vocab), mesh=mesh,
                         in_specs=(per_token, row_specs, per_row),
                         out_specs=(per_row, per_row, top, top, row_specs),
                         check_vma=False)(logits, rows, positions)


def _sample(logits, rows: SamplingRows, positions, *, vocab: Vocab, top_k: int, nucleus_k: int,
            tries: int):
    """`sample` on one device's block of rows and (with a split vocabulary) of columns."""
    B = logits.shape[0]
    logits = logits.astype(jnp.float32)
    lse = _logsumexp(logits, vocab)

    x = processed_logits(logits, rows)  # [B, V], materialised once for every consumer
    x_max = vocab.max(x)[:, None]  # [B, 1]
    x_max = jnp.where(jnp.isfinite(x_max), x_max, 0.0)  # an all -inf row: no NaN below

    greedy = rows.temperature <= 0
    step_keys = jax.vmap(lambda k, p: jax.random.fold_in(jax.random.wrap_key_data(k), p))(
        rows.key, positions)
    tokens = lax.cond(
        ~vocab.any(~greedy),
        lambda: jnp.zeros((B,), jnp.int32),  # no row samples: skip the whole sampling path
        lambda: _sample_rows(x, x_max, rows, step_keys, nucleus_k, tries, vocab),
    )
    tokens = lax.cond(
        vocab.any(greedy),
        lambda: jnp.where(greedy, _first_index_of(x, x_max, vocab), tokens),
        lambda: tokens,
    )

    logprob = vocab.take(logits, tokens[:, None])[:, 0] - lse
    # Tokens a row may never produce (a -inf bias: control tokens) are never among its top k.
    top_ids, top_logprobs = lax.cond(
        vocab.any(rows.num_logprobs > 0),
        lambda: _top_logprobs(jnp.where(rows.bias == -jnp.inf, -jnp.inf, logits), lse, top_k, vocab),
        lambda: (jnp.zeros((B, top_k), jnp.int32), jnp.zeros((B, top_k), jnp.float32)),
    )
    raw = (logprob, top_ids, top_logprobs)
    logprob, top_ids, top_logprobs = lax.cond(
        vocab.any(rows.processed),
        lambda: jax.tree.map(lambda p, r: jnp.where(rows.processed.reshape((B,) + (1,) * (r.ndim - 1)), p, r),
                             _processed_logprobs(x, x_max, rows, tokens, top_k, nucleus_k, vocab), raw),
        lambda: raw,
    )
    counts = vocab.add_one(rows.counts, tokens)  # in place when the caller donates rows
    return tokens, logprob, top_ids, top_logprobs, dataclasses.replace(rows, counts=counts)


def processed_logits(logits, rows: SamplingRows):
    """logits f32[B, V] + logit_bias - penalties (OpenAI's formula), before temperature: f32[B, V];
    then -inf where a constrained row's mask forbids the token.

    Every term added is finite, so a -inf logit stays -inf and nothing becomes NaN.
    """
    x = _biased(logits, rows)
    # The mask is unpacked only when some row is constrained: other batches never read it.
    return lax.cond(jnp.any(rows.constrained), lambda: _masked(x, rows), lambda: x)


def _masked(x, rows: SamplingRows):
    """x f32[B, V] with -inf where rows.constrained and the token's bit in rows.mask is unset.
    On a split vocabulary each device holds the mask words of its own columns."""
    B, V = x.shape
    bits = (rows.mask[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, V/32, 32]
    allowed = bits.reshape(B, -1)[:, :V].astype(bool)
    return jnp.where(rows.constrained[:, None] & ~allowed, -jnp.inf, x)


def _biased(logits, rows: SamplingRows):
    def penalized():
        c = rows.counts
        return (logits + rows.bias
                - c * rows.frequency[:, None] - (c > 0) * rows.presence[:, None])

    # Reading counts [B, V] costs as much as the rest of this: skip it when no row needs it.
    # Each branch writes the whole result, so neither copies the other's output.
    return lax.cond(jnp.any((rows.frequency != 0) | (rows.presence != 0)), penalized,
                    lambda: logits + rows.bias)


def _processed_logprobs(x, x_max, rows: SamplingRows, tokens, top_k: int, nucleus_k: int, vocab: Vocab):
    """Log-probabilities of the distribution each row's token was drawn from: processed logits
    x [B, V] with their row max x_max [B, 1], tokens i32[B] -> (logprob f32[B], top ids
    i32[B, top_k], top logprobs f32[B, top_k]), as `_sample` returns raw ones.

    The distribution is softmax(x / T) restricted to the nucleus and renormalised; a greedy
    row's is softmax(x) (its token was an argmax: a point mass would say nothing). The top
    tokens, in nucleus order (lax.top_k's), are inside the nucleus while the cumulative mass
    before them is short of top_p; past it their logprob is -inf. The nucleus' mass is read off
    the prefilter when it ends there, or else summed over the row's nucleus (`draws.nucleus`,
    row by row as in `_sample_rows`: the rare row whose nucleus is wider than the prefilter).
    """
    greedy = rows.temperature <= 0
    inv_t = 1.0 / jnp.where(greedy, 1.0, jnp.maximum(rows.temperature, MIN_TEMPERATURE))[:, None]
    total = vocab.sum(draws.weight(x, x_max, inv_t))  # [B]
    nucleus = (rows.top_p < 1) & ~greedy
    mass = (rows.top_p * total)[:, None]  # [B, 1]
    width = min(max(top_k, nucleus_k), vocab.size)
    values, ids = vocab.top_k(x, width)  # [B, width], nucleus order
    cum = draws.cumsum(draws.weight(values, x_max, inv_t))
    last = draws.first_index(cum >= mass)  # width: the nucleus ends further on
    kept = jnp.take_along_axis(cum, jnp.minimum(last, width - 1)[:, None], axis=-1)[:, 0]
    settled = (last < width) | ~nucleus

    def one_row(args):
        settled, kept, x, x_max, inv_t, mass = args
        return lax.cond(~vocab.any(~settled), lambda: kept,
                        lambda: jnp.where(settled, kept,
                                          _nucleus_mass(x[None], x_max[None], inv_t[None], mass, vocab)))

    kept = lax.cond(vocab.any(~settled), lambda: lax.map(one_row, (settled, kept, x, x_max, inv_t, mass)),
                    lambda: kept)
    log_kept = jnp.log(jnp.where(nucleus, kept, total))[:, None]  # [B, 1]
    logprob = (vocab.take(x, tokens[:, None]) - x_max) * inv_t - log_kept
    inside = (jnp.arange(width) <= last[:, None]) | ~nucleus[:, None]
    top = jnp.where(inside, (values - x_max) * inv_t - log_kept, -jnp.inf)
    return logprob[:, 0], ids[:, :top_k], top[:, :top_k]


def _nucleus_mass(x, x_max, inv_t, mass, vocab: Vocab):
    """The weight held by one row's nucleus: x [1, V], x_max, inv_t [1, 1], mass [1] (top_p x
    total weight) -> f32[]."""
    inside = draws.nucleus(x, x_max, inv_t, mass, vocab)
    return vocab.sum(jnp.where(inside, draws.weight(x, x_max, inv_t), 0.0))[0]


def _first_index_of(x, value, vocab: Vocab):
    """First index along the last axis where x == value [..., 1]: i32[...]; with the row max,
    the argmax. XLA:CPU runs jnp.argmax's (value, index) reduction unvectorised, about 3x
    slower than this float min; the float iota is exact for V < 2**24."""
    iota = vocab.ids(x.shape, jnp.float32)
    return vocab.min(jnp.where(x == value, iota, jnp.inf)).astype(jnp.int32)


def _logsumexp(logits, vocab: Vocab, m=None):
    """f32[..., V] -> f32[...]; -inf entries contribute nothing. `m`: the row max, if known."""
    m = (vocab.max(logits) if m is None else m)[..., None]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # an all -inf row gives -inf, not NaN
    return jnp.log(vocab.sum(jnp.exp(logits - m))) + m[..., 0]


def _top_logprobs(logits, lse, k: int, vocab: Vocab):
    if k == 0:
        shape = logits.shape[:-1] + (0,)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)
    values, ids = vocab.top_k(logits, k)
    return ids, values - lse[..., None]


def _sample_rows(x, x_max, rows: SamplingRows, step_keys, nucleus_k: int, tries: int, vocab: Vocab):
    """Token i32[B] for the rows with temperature > 0, from processed logits x [B, V] and
    their row max x_max [B, 1].

    Weights are exp((x - x_max) / T) (`draws.weight`), computed from x where needed rather than
    kept as another [B, V] array. Nucleus order is by x, ties by lower id (dividing by a
    positive T keeps that order).
    """
    B = x.shape[0]
    # Greedy rows take the argmax elsewhere; here they divide by 1 so nothing overflows.
    inv_t = 1.0 / jnp.where(rows.temperature > 0,
                            jnp.maximum(rows.temperature, MIN_TEMPERATURE), 1.0)[:, None]
    block_mass = draws.block_mass(x, x_max, inv_t, vocab)  # [B, V / 128]: one mass per block of the draw
    mass = rows.top_p[:, None] * jnp.sum(block_mass, axis=-1, keepdims=True)  # [B, 1]
    # Uniforms: pair 0 for the main draw (also rejection candidate 0), pairs 1..R-1 for
    # the other candidates, pair R for the bisection's draw; all from the row's own key.
    u = jax.vmap(lambda k: jax.random.uniform(k, (tries + 1, 2)))(step_keys)  # [B, R+1, 2]
    tokens = draws.draw(x, x_max, inv_t, block_mass, u[:, 0], vocab)  # from the whole distribution

    nucleus = (rows.top_p < 1) & (rows.temperature > 0)

    def prefiltered():
        # Ties in lax.top_k's order (lower index first): the nucleus order.
        values, ids = vocab.top_k(x, min(nucleus_k, vocab.size))
        drawn, covered = draws.nucleus_draw(draws.weight(values, x_max, inv_t), ids, mass, u[:, 0, 0])
        # Only nucleus rows take the prefilter's draw: a top_p=1 row whose top tokens hold all
        # its mass (a constrained row, say) would otherwise sample another token from the same
        # uniform depending on whether a neighbour has top_p < 1.
        return jnp.where(covered & nucleus, drawn, tokens), covered

    tokens, settled = lax.cond(vocab.any(nucleus), prefiltered,
                               lambda: (tokens, jnp.ones((B,), bool)))
    settled = settled | ~nucleus

    # The slow paths go row by row (lax.map), each row entering them only if it needs to:
    # a batch with one unsettled row pays for one row, and their temporaries are [V], not
    # [B, V]. That matters twice on CPU: XLA:CPU allocates a call's temporaries afresh each
    # time, and above glibc's 32 MB mmap threshold they come as new pages whose faults cost
    # more than the work (batched slow paths made the whole step 2x slower at 32 rows).
    # With rows split over devices, row i of every row shard enters if one needs to.
    def one_row(args):
        settled, token, x, x_max, inv_t, block_mass, mass, u = args
        return lax.cond(~vocab.any(~settled), lambda: token, lambda: jnp.where(settled, token, draws.rejection_row(
            token, x[None], x_max[None], inv_t[None], block_mass[None], mass[None], u, vocab)))

    return lax.cond(
        vocab.any(~settled),
        lambda: lax.map(one_row, (settled, tokens, x, x_max, inv_t, block_mass, mass, u)),
        lambda: tokens,
    )
