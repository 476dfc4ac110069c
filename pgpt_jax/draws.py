"""How one token is drawn from a row's weights, the pieces `sampling._sample_rows` puts together.

Weights are exp((x - x_max) / T) of processed logits x (`weight`), computed where needed
rather than kept as another [B, V] array. Drawing from a [V] distribution uses inverse-CDF
in two levels (`draw`: blocks of 128 tokens, then a token inside the chosen block), with
one uniform per level: no [B, V] cumulative sum and no [B, V] of random bits. The nucleus
(top_p): `nucleus_draw` draws from tokens already in nucleus order (the prefilter's top-k),
`rejection_row` for one row the prefilter could not settle, and `bisected_draw`, which finds
that row's nucleus by bisection (`nucleus`) when every rejection candidate fell outside, and
keeps the law exact. Every cumulative sum is row by row (`cumsum`), so a row's draw does not
depend on the rows beside it.

Shape letters as in pgpt_jax/sampling.py: B rows, V vocabulary (padded), K a top-k width,
R rejection tries, M the entries of one inverse-CDF level.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pgpt_jax.vocab import BLOCK, Vocab


def weight(v, x_max, inv_t):
    """Unnormalised probability exp((v - x_max) / T); -inf gives exactly 0."""
    return jnp.exp((v - x_max) * inv_t)


def rejection_row(token, x, x_max, inv_t, block_mass, mass, u, vocab: Vocab):
    """A draw from one row's nucleus when the prefilter could not find it: i32[].

    x [1, V], x_max, inv_t, mass [1, 1], block_mass [1, V / BLOCK], u [R+1, 2]. Candidates
    come from the whole distribution (`token` is the first, the others one draw of R - 1
    rows); the first inside the nucleus is a draw from the nucleus. Each is inside with
    probability >= top_p. If none is, an independent draw from the nucleus found by
    bisection keeps the law exact.
    """
    tries = u.shape[0] - 1
    cands = token[None]
    if tries > 1:
        others = draw(jnp.broadcast_to(x, (tries - 1, x.shape[1])), x_max, inv_t,
                      jnp.broadcast_to(block_mass, (tries - 1, block_mass.shape[1])), u[1:tries], vocab)
        cands = jnp.concatenate([cands, others])  # [R]
    xc = vocab.take(x, cands[None])[0][:, None]  # [R, 1]
    ids = vocab.ids(x.shape)  # [1, V]
    ahead = (x > xc) | ((x == xc) & (ids < cands[:, None]))  # [R, V]: strictly before in order
    inside = vocab.sum(jnp.where(ahead, weight(x, x_max, inv_t), 0.0)) < mass[0]
    first = first_index(inside)  # R: none
    drawn = cands[jnp.minimum(first, tries - 1)]

    def last_resort():
        return jnp.where(first < tries, drawn, bisected_draw(x, x_max, inv_t, mass[0], u[tries][None], vocab)[0])

    return lax.cond(vocab.any(first == tries), last_resort, lambda: drawn)


def bisected_draw(x, x_max, inv_t, mass, u, vocab: Vocab):
    """A draw from each row's nucleus, found by bisection (`nucleus`): x [B, V], x_max, inv_t
    [B, 1], mass [B], u [B, 2] -> i32[B]. Tokens outside it become -inf; the rest draw as a
    whole row does."""
    inside = jnp.where(nucleus(x, x_max, inv_t, mass, vocab), x, -jnp.inf)
    return draw(inside, x_max, inv_t, block_mass(inside, x_max, inv_t, vocab), u, vocab)


def block_mass(x, x_max, inv_t, vocab: Vocab):
    """The weight of each block of `draw`: x [B, V], x_max, inv_t [B, 1] -> f32[B, V / BLOCK]."""
    x3, first = vocab.blocks(x)
    return vocab.block_sums(jnp.sum(weight(x3, x_max[:, :, None], inv_t[:, :, None]), axis=-1), first)


def nucleus(x, x_max, inv_t, mass, vocab: Vocab):
    """The nucleus of each row, found by bisection rather than by sorting: bool[B, V].

    x [B, V] processed logits, x_max and inv_t [B, 1], mass [B] = top_p x the row's total
    weight. The nucleus is the shortest prefix, in descending x with ties by lower id, whose
    weight reaches `mass` (at least one token). Its last token's value is the largest key c
    (`order_key`, x's order as unsigned integers) such that the tokens at or above c weigh at
    least `mass`: 32 halvings of the key range find it, each one masked sum over the row
    (monotone in c: a fixed summation order with terms set to 0 never rounds up). Of the
    tokens tied at that value, which all weigh alike, the nucleus takes as many as it needs,
    lowest ids first (a second bisection, over ids, only when it takes some but not all).
    No [V] sort and no [V] cumulative sum: a few small loops to compile, and on a split
    vocabulary each halving adds one scalar per row over the shards. About 0.7 ms a row of
    50,304 on a 2-core Zen 3, a few times one rejection candidate's: the last resort.
    """
    w = weight(x, x_max, inv_t)
    key = order_key(x)
    mass = jnp.maximum(mass, jnp.finfo(jnp.float32).tiny)  # top_p = 0: the first token alone

    def halve(_, bounds):  # invariant: the tokens at or above lo reach mass, those at or above hi do not
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        reach = vocab.sum(jnp.where(key >= mid[:, None], w, 0.0)) >= mass
        return jnp.where(reach, mid, lo), jnp.where(reach, hi, mid)

    B = x.shape[0]
    # hi: 0xFFFFFFFF is a NaN's key, never a token's, so nothing is at or above it.
    bounds = (jnp.zeros((B,), jnp.uint32), jnp.full((B,), 0xFFFFFFFF, jnp.uint32))
    lo, _ = lax.fori_loop(0, 32, halve, bounds)
    lo = lo[:, None]
    tied = key == lo
    # Counts are float sums (exact below 2**24; see `first_index`).
    n_tied = vocab.sum(tied.astype(jnp.float32)).astype(jnp.int32)  # 0 only if rounding kept the whole row short
    above = vocab.sum(jnp.where(key > lo, w, 0.0))
    tie_weight = weight(vocab.max(jnp.where(tied, x, -jnp.inf)), x_max[:, 0], inv_t[:, 0])
    need = jnp.ceil((mass - above) / jnp.where(n_tied > 0, tie_weight, 1.0)).astype(jnp.int32)
    need = jnp.clip(need, jnp.minimum(n_tied, 1), n_tied)
    ids = vocab.ids(x.shape)

    def first_ids():  # the smallest end with `need` tied tokens below it, by bisection over ids
        def halve_ids(_, bounds):  # tied tokens below lo: fewer than need; below hi: enough
            lo, hi = bounds
            mid = (lo + hi) // 2
            enough = vocab.sum((tied & (ids < mid[:, None])).astype(jnp.float32)) >= need
            return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

        steps = max(1, (vocab.size - 1).bit_length())
        bounds = (jnp.zeros((B,), jnp.int32), jnp.full((B,), vocab.size, jnp.int32))
        return lax.fori_loop(0, steps, halve_ids, bounds)[1]

    end = lax.cond(vocab.any(need < n_tied), first_ids, lambda: jnp.full((B,), vocab.size, jnp.int32))
    return (key > lo) | (tied & (ids < end[:, None]))


def order_key(x):
    """u32 keys in the order of the floats x (no NaN): larger x, larger key; -0.0 is 0.0."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def nucleus_draw(weights, ids, mass, u):
    """Draw from a nucleus given its tokens in nucleus order: weights f32[B, K] (unnormalised,
    descending), ids i32[B, K], mass f32[B, 1] = top_p * total weight, u f32[B] ->
    (token i32[B], covered bool[B]). The nucleus ends at the first token whose cumulative
    weight reaches `mass` (so it holds at least one); covered says it ends within these K.
    """
    K = weights.shape[-1]
    last = first_index(cumsum(weights) >= mass)  # the first index that reaches; K: none does
    inside = jnp.arange(K) <= last[:, None]
    pick = invert(jnp.where(inside, weights, 0.0), u)
    token = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]  # invert picks < K
    return token.astype(jnp.int32), last < K


def draw(x, x_max, inv_t, block_mass, u, vocab: Vocab):
    """Inverse-CDF draw from the weights exp((x - x_max) / T), x [B, V], with block sums
    block_mass [B, V / BLOCK]: u [B, 2] holds one uniform to pick a block in proportion to
    its mass, one to pick a token inside it. -> i32[B]. On a split vocabulary every shard
    picks the same block; the one or two holding it supply its weights."""
    x3, first = vocab.blocks(x)
    block = invert(block_mass, u[:, 0])
    here = block - first
    xb = jnp.take_along_axis(x3, jnp.clip(here, 0, x3.shape[1] - 1)[:, None, None], axis=1)[:, 0]
    wb = weight(xb, x_max, inv_t)  # [B, BLOCK]
    if vocab.axis is not None:
        wb = vocab.pieces(jnp.where(((here >= 0) & (here < x3.shape[1]))[:, None], wb, 0.0))
    return block * BLOCK + invert(wb, u[:, 1])


def invert(w, u):
    """Index i32[B] with P(i) = w[i] / sum(w) for weights w [B, M] >= 0, u [B] in [0, 1).

    Takes the first positive weight whose cumulative sum exceeds u * total. Asking for a
    positive weight matters: a rounded cumulative sum need not be monotone, and a zero
    weight (a -inf logit) must never be taken. Rounding that pushes u * total past the end
    falls back to the last positive weight.
    """
    n = w.shape[-1]
    cum = cumsum(w)
    first = first_index((cum > (u * cum[:, -1])[:, None]) & (w > 0))
    last_positive = jnp.max(jnp.where(w > 0, jnp.arange(n, dtype=jnp.float32), 0.0), axis=-1).astype(jnp.int32)
    return jnp.where(first < n, first, last_positive)


def first_index(pred):
    """The first index along the last axis where pred [..., M] holds, M where it never does:
    i32[...]. A float min (exact below 2**24): XLA:CPU splits an integer or boolean reduction
    over more than 32 entries into a chain of reduce-windows, each a kernel to compile."""
    n = pred.shape[-1]
    return jnp.min(jnp.where(pred, jnp.arange(n, dtype=jnp.float32), float(n)), axis=-1).astype(jnp.int32)


def cumsum(w):
    """Inclusive cumulative sum over the last axis, each row on its own: a row sums to the same
    bits whatever other rows share the call, so a seeded draw does not depend on its batch.
    (A triangular matmul did not: XLA:CPU rounds a row of a matmul differently with the
    number of rows and the row's place among them.) The rows are short (64, 128 and V/128
    entries in `invert` and `nucleus_draw`): they add left to right in a loop, which also
    keeps the sum of non-negative weights non-decreasing."""

    def add(total, column):
        total = total + column
        return total, total

    _, out = lax.scan(add, jnp.zeros(w.shape[:-1], w.dtype), jnp.moveaxis(w, -1, 0))
    return jnp.moveaxis(out, 0, -1)
