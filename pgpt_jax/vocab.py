"""Reductions over the vocabulary axis of a sampling step's [B, V] arrays, written once for
the whole axis (one device) and for one device's columns of it (inside shard_map, the axis
split over a mesh axis), where each is the local reduction plus one small collective.

`sampling.sample` is the user: it never holds another device's [rows, V] logits; the shards
combine maxima, sums, first indices, top-k candidates and block masses (see its docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
from jax import lax

BLOCK = 128  # tokens per block of the two-level inverse-CDF draw (50304 = 393 * 128)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The last axis of a call's [B, V] arrays: the whole vocabulary, or (inside shard_map)
    this device's columns `offset .. offset + local` of it.

    Each method is a reduction over the vocabulary written once for both cases: on the whole
    axis, plain jnp; on a shard, the local reduction and one small collective over `axis`.
    A lax.cond whose branches hold a collective takes its predicate from `any`, which agrees
    on every device (reduced over the row shards as well), so all of them take the branch.
    """

    size: int  # V
    local: Optional[int] = None  # columns held here (V when whole)
    axis: Optional[str] = None  # the mesh axis V is split over; None: whole
    row_axis: Optional[str] = None  # the mesh axis rows are split over, if any

    @property
    def width(self) -> int:
        return self.local or self.size

    @property
    def offset(self):
        """Global id of local column 0: 0, or i32[] on a shard."""
        return 0 if self.axis is None else lax.axis_index(self.axis) * self.width

    def ids(self, shape, dtype=jnp.int32):
        """Global token ids along the last axis of `shape`."""
        iota = lax.broadcasted_iota(dtype, shape, len(shape) - 1)
        return iota if self.axis is None else iota + self.offset.astype(dtype)

    def max(self, x):
        m = jnp.max(x, axis=-1)
        return m if self.axis is None else lax.pmax(m, self.axis)

    def min(self, x):
        m = jnp.min(x, axis=-1)
        return m if self.axis is None else lax.pmin(m, self.axis)

    def sum(self, x):
        total = jnp.sum(x, axis=-1)
        return total if self.axis is None else lax.psum(total, self.axis)

    def any(self, pred):
        """bool[]: pred anywhere, on every device alike."""
        hit = jnp.any(pred)
        axes = tuple(a for a in (self.row_axis, self.axis) if a is not None)
        return lax.pmax(hit.astype(jnp.int32), axes) > 0 if axes else hit

    def take(self, x, ids):
        """x [B, V], global ids i32[B, J] -> x[b, ids[b, j]]: f32[B, J], exactly (one shard
        holds each entry; the others offer -inf to a max)."""
        if self.axis is None:
            return jnp.take_along_axis(x, ids, axis=-1)
        local = ids - self.offset
        held = (local >= 0) & (local < self.width)
        got = jnp.take_along_axis(x, jnp.clip(local, 0, self.width - 1), axis=-1)
        return lax.pmax(jnp.where(held, got, -jnp.inf), self.axis)

    def top_k(self, x, k: int):
        """The k largest of x [B, V] and their global ids, ties by lower id (lax.top_k's
        order): each shard's own top k, gathered ([B, shards * k]) and merged. Gathered in
        shard order, equal values keep lower ids first, so the merge is exact."""
        values, ids = lax.top_k(x, min(k, self.width))
        if self.axis is None:
            return values, ids.astype(jnp.int32)
        ids = ids.astype(jnp.int32) + self.offset
        values = lax.all_gather(values, self.axis, axis=x.ndim - 1, tiled=True)
        ids = lax.all_gather(ids, self.axis, axis=x.ndim - 1, tiled=True)
        values, pick = lax.top_k(values, k)
        return values, jnp.take_along_axis(ids, pick, axis=-1)

    def blocks(self, x):
        """x [B, V] -> (x3 f32[B, nb, BLOCK], first): this device's columns on the global grid
        of BLOCK-token blocks, -inf where it holds nothing; x3[:, j] is global block first + j.
        Shards need not start on a block boundary (50304 / 8 = 49.125 blocks): a block may
        straddle two shards, each holding part of it."""
        B = x.shape[0]
        if self.axis is None or self.width % BLOCK == 0:
            nb = -(-self.width // BLOCK)
            if nb * BLOCK != self.width:  # whole blocks: padding is -inf, weight 0, never drawn
                x = jnp.pad(x, ((0, 0), (0, nb * BLOCK - self.width)), constant_values=-jnp.inf)
            return x.reshape(B, nb, BLOCK), (0 if self.axis is None else self.offset // BLOCK)
        nb = -(-(self.width + BLOCK - 1) // BLOCK)  # covers any start within a block
        lead = self.offset % BLOCK
        grid = jnp.full((B, nb * BLOCK), -jnp.inf, x.dtype)
        grid = lax.dynamic_update_slice(grid, x, (jnp.int32(0), lead))
        return grid.reshape(B, nb, BLOCK), self.offset // BLOCK

    def block_sums(self, part, first):
        """Per-block sums f32[B, nb] of this device's blocks (global blocks first..) -> the
        global f32[B, size / BLOCK]: each shard places its own and the shards' are added."""
        if self.axis is None:
            return part
        B, nb = part.shape
        grid = jnp.zeros((B, -(-self.size // BLOCK)), part.dtype)  # the last shard's spare blocks: dropped
        return lax.psum(grid.at[:, first + jnp.arange(nb)].add(part, mode="drop"), self.axis)

    def pieces(self, x):
        """The whole of an array that each shard holds part of, zeros elsewhere: a sum, exact
        (every entry is one shard's value plus zeros)."""
        return x if self.axis is None else lax.psum(x, self.axis)

    def add_one(self, counts, tokens):
        """counts i32[B, V] with counts[b, tokens[b]] += 1 (in place when donated)."""
        B = counts.shape[0]
        if self.axis is not None:
            local = tokens - self.offset
            tokens = jnp.where((local >= 0) & (local < self.width), local, self.width)  # past the end: dropped
        return counts.at[jnp.arange(B), tokens].add(1, mode="drop")
