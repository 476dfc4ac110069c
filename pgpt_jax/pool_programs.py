"""The prefix cache's device programs: the pool of KV blocks, and prefill from a cached prefix.

`prefix_cache.py` (process 0's host) decides which blocks a prompt reads and which it saves;
these compute it, on every process. The pool holds P blocks of Q tokens, per layer (k, v)
each [P, N, Q, H] (shape letters as in programs.py), heads over `model` on a mesh like a
prefill's cache, every block on every data shard (any slot may read any block).

  gather_blocks  pool blocks -> the first entries of a prefill cache [B, N, T, H]
  empty_cache    zeros shaped and placed like a gather's (chunked prefill's start, no pool needed)
  extend         a prefill of tokens at positions [p, p + R) over a cache already holding
                 [0, p): a prompt's rest after its cached prefix, or one chunk of a long prompt
  save_blocks    a prefill's whole blocks -> the pool (donated, updated in place)

A hit runs gather_blocks then extend, and its cache then goes into a slot through `insert`
exactly as a prefill's does (same shape); any prefill may be followed by save_blocks. A
chunked prefill (`--prefill-chunk`, planner.py) runs empty_cache or gather_blocks, then one
extend of C tokens per engine iteration over the same cache, kept between iterations.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pgpt_jax import sharding
from pgpt_jax.model import init_cache
from pgpt_jax.xla_options import merge
from pgpt_jax.xla_options import program as _program

def init_pool(cfg, blocks: int, block_tokens: int, mesh: Optional[Mesh] = None) -> tuple:
    """The prefix cache's device pool: per layer (k, v), each [P, N, Q, H] (P blocks of Q
    tokens), zeros; heads over `model` like the prefill caches (`sharding.pool_sharding`)."""
    def make():
        return init_cache(cfg, blocks, block_tokens)

    if mesh is None:
        return jax.device_put(make(), jax.local_devices()[0])
    return jax.jit(make, out_shardings=sharding.pool_sharding(mesh))()


@_program(static_argnames=("length", "mesh"))
def gather_blocks(pool, reads, *, length: int, mesh=None):
    """A prefill cache whose first entries come from the pool: reads i32[B, M] pool ids ->
    per layer ([B, N, T, H], ...) with T = `length`, block m of row b at positions
    [m Q, (m+1) Q), zeros past M Q. Ids past a row's cached prefix are read and overwritten
    (or never attended to) by the `extend` that follows."""
    B, M = reads.shape

    def one(p):
        blocks = jnp.take(p, reads.reshape(-1), axis=0, mode="clip")  # [B M, N, Q, H]
        _, N, Q, H = blocks.shape
        c = blocks.reshape(B, M, N, Q, H).transpose(0, 2, 1, 3, 4).reshape(B, N, M * Q, H)
        return jnp.pad(c, ((0, 0), (0, 0), (0, length - M * Q), (0, 0)))

    cache = tuple((one(k), one(v)) for k, v in pool)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.pool_sharding(mesh))
    return cache


def empty_cache(config, rows: int, length: int, mesh: Optional[Mesh] = None) -> tuple:
    """Zeros per layer ([B, N, T, H], ...) with B = `rows`, T = `length`: a prefill cache
    that holds nothing yet, placed as `gather_blocks`'s (a chunked prompt's first chunk with
    no cached prefix `extend`s it). Committed to the device, as a program's results with
    committed arguments are (part of `extend`'s jit cache key)."""
    cache = empty_cache_program(config=config, rows=rows, length=length, mesh=mesh)
    return cache if mesh is not None else jax.device_put(cache, jax.local_devices()[0])


@_program(static_argnames=("config", "rows", "length", "mesh"))
def empty_cache_program(*, config, rows: int, length: int, mesh=None):
    cache = init_cache(config, rows, length)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.pool_sharding(mesh))
    return cache


@_program(static_argnames=("graphdef", "mesh"), donate_argnums=(3,))
def extend(graphdef, params, head, cache, tokens, start, true_len, *, mesh=None):
    """Prefill that goes on from a cache already holding each row's first `start` positions:
    tokens i32[B, R] at positions start[b] + [0, R) attend to the cache's entries up to their
    own position (the cached ones and each other) and are written into it. cache per layer
    ([B, N, T, H], ...), donated; true_len i32[B] counts the cached tokens too. Returns
    (cache, last_logits f32[B, V]) as `prefill` does: the same numbers, up to float
    rounding, as a prefill of the whole prompt. Padding tokens past a row's true length must
    stay within T (start + R <= T): their writes would be dropped, their positions not.

    The prefix cache's hits run it after `gather_blocks`; any prefix cache of the right shape
    will do (chunked prefill: `empty_cache` or `gather_blocks`, then a prompt's earlier chunks)."""
    model = merge(graphdef, params)
    B, R = tokens.shape
    positions = start[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]
    hidden, cache = model(tokens, positions, cache)
    last = jnp.take_along_axis(hidden, (true_len - start - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    last_logits = model.logits(last, head)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, sharding.pool_sharding(mesh))
        last_logits = jax.lax.with_sharding_constraint(last_logits, sharding.replicated(mesh))
    return cache, last_logits


@_program(static_argnames=("mesh",), donate_argnums=(0,))
def save_blocks(pool, cache, writes, *, mesh=None):
    """Copies whole blocks of a prefill's cache (per layer ([B, N, T, H], ...)) into the pool:
    writes i32[B, M] says where block m of row b goes (an id past the pool: nowhere). The
    pool is donated and updated in place."""
    B, M = writes.shape

    def one(p, c):
        _, N, Q, H = p.shape
        blocks = c[:, :, :M * Q].reshape(B, N, M, Q, H).transpose(0, 2, 1, 3, 4).reshape(B * M, N, Q, H)
        return p.at[writes.reshape(-1)].set(blocks.astype(p.dtype), mode="drop")

    pool = tuple((one(pk, ck), one(pv, cv)) for (pk, pv), (ck, cv) in zip(pool, cache))
    if mesh is not None:
        pool = jax.lax.with_sharding_constraint(pool, sharding.pool_sharding(mesh))
    return pool
