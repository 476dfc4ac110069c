"""How one token is drawn from a row's weights, the pieces `sampling._sample_rows` puts together.

Weights are exp((x - x_max) / T) of processed logits x (`weight`), computed where needed
rather than kept as another [B, V] array. Drawing from a [V] distribution uses inverse-CDF
in two levels (`draw`: blocks of 128 tokens, then a token inside the chosen block), with
one uniform per level: no [B, V] cumulative sum and no [B, V] of random bits. The nucleus
(top_p) draws: `nucleus_draw` from tokens already in nucleus order (the prefilter's top-k,
or a sorted row), `rejection_row` for one row the prefilter could not settle, and
`sorted_draw`, the full stable sort of one row that keeps the law exact when every
rejection candidate fell outside. Every cumulative sum is row by row (`cumsum`), so a row's
draw does not depend on the rows beside it.

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
    come from the whole distribution (`token` is the first); the first inside the nucleus
    is a draw from the nucleus. Each is inside with probability >= top_p. If none is, an
    independent draw from the sorted nucleus keeps the law exact.
    """
    tries = u.shape[0] - 1
    cands = jnp.stack([token] + [draw(x, x_max, inv_t, block_mass, u[r][None], vocab)[0]
                                 for r in range(1, tries)])  # [R]
    xc = vocab.take(x, cands[None])[0][:, None]  # [R, 1]
    ids = vocab.ids(x.shape)  # [1, V]
    ahead = (x > xc) | ((x == xc) & (ids < cands[:, None]))  # [R, V]: strictly before in order
    inside = vocab.sum(jnp.where(ahead, weight(x, x_max, inv_t), 0.0)) < mass[0]
    drawn = cands[jnp.argmax(inside)]
    return lax.cond(vocab.any(~jnp.any(inside)),
                    lambda: jnp.where(jnp.any(inside), drawn,
                                      sorted_draw(vocab.gather(x), x_max, inv_t, mass, u[tries][None])[0]),
                    lambda: drawn)


def nucleus_draw(weights, ids, mass, u):
    """Draw from a nucleus given its tokens in nucleus order: weights f32[B, K] (unnormalised,
    descending), ids i32[B, K], mass f32[B, 1] = top_p * total weight, u f32[B] ->
    (token i32[B], covered bool[B]). The nucleus ends at the first token whose cumulative
    weight reaches `mass` (so it holds at least one); covered says it ends within these K.
    """
    cum = cumsum(weights)
    reached = cum >= mass
    last = jnp.argmax(reached, axis=-1)  # the first index that reaches
    inside = jnp.arange(weights.shape[-1]) <= last[:, None]
    pick = invert(jnp.where(inside, weights, 0.0), u)
    token = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), jnp.any(reached, axis=-1)


def sorted_draw(x, x_max, inv_t, mass, u):
    """Exact nucleus by a full stable sort (the slow path), then a draw inside it: i32[B].
    x is the whole vocabulary [B, V]."""
    ids = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    neg, ids = lax.sort((-x, ids), dimension=1, is_stable=True, num_keys=1)
    return nucleus_draw(weight(-neg, x_max, inv_t), ids, mass, u[:, 0])[0]


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
    positions = jnp.arange(n, dtype=jnp.int32)
    beyond = (cum > (u * cum[:, -1])[:, None]) & (w > 0)
    first = jnp.min(jnp.where(beyond, positions, n), axis=-1)
    last_positive = jnp.max(jnp.where(w > 0, positions, 0), axis=-1)
    return jnp.where(first < n, first, last_positive).astype(jnp.int32)


def cumsum(w):
    """Inclusive cumulative sum over the last axis, each row on its own: a row sums to the same
    bits whatever other rows share the call, so a seeded draw does not depend on its batch.
    (A triangular matmul did not: XLA:CPU rounds a row of a matmul differently with the
    number of rows and the row's place among them.) Short rows (64, 128 and V/128 entries in
    `_invert` and `_nucleus_draw`) add left to right in a loop, which also keeps the sum of
    non-negative weights non-decreasing; the sort fallback's [1, V] uses jnp.cumsum (an
    associative scan of element-wise adds, row by row as well)."""
    n = w.shape[-1]
    if n > 512:
        return jnp.cumsum(w, axis=-1)

    def add(total, column):
        total = total + column
        return total, total

    _, out = lax.scan(add, jnp.zeros(w.shape[:-1], w.dtype), jnp.moveaxis(w, -1, 0))
    return jnp.moveaxis(out, 0, -1)
