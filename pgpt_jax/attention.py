"""Attention of new queries over the KV cache, and the one place that picks how it is computed.

Implementations (the same numbers up to rounding; `tests/test_attention.py` holds them to it):

  einsum  our own XLA program: scores, the visibility mask, a float32 softmax, the weighted
          sum. The fallback everywhere, and the CPU default (its decode form is the one
          measured fastest on CPU, docs/benchmarks.md).
  xla     `jax.nn.dot_product_attention(implementation="xla")`: JAX's reference path (what
          the fused kernels are checked against on CPU).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused (flash)
          kernel. GPU only, bfloat16/float16, head_dim a multiple of 8 up to 128.
  auto    cudnn for prompts (T > 1) on a GPU when the dtype and head size allow it, einsum
          for everything else. Decode stays on einsum even on a GPU until measured: the
          kernels take keys as [B, W, N, H], so each decode step would first copy the
          window out of the [S, N, L, H] cache (twice the KV bytes of a step). TPU: the
          Pallas kernels JAX ships are not wired in yet; auto picks einsum there.

The implementation is a plain string on each `model.Attention` (part of the graphdef, so a
jitted program compiled for one is never reused for another); "auto" is resolved here at
trace time from `jax.default_backend()`.

Shape letters as in model.py: B rows, T new tokens per row, N heads, H head_dim, W the
window of cache entries read. A query at position p sees cache entries 0..p of its row.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")


def choose(implementation: str, backend: str, dtype, head_dim: int, tokens: int) -> str:
    """The implementation a call runs: `implementation` unless it is "auto" (see the module
    docstring); `tokens` is T, the new tokens per row (1 in decode)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if backend == "gpu" and tokens > 1 and cudnn_fits(dtype, head_dim):
        return "cudnn"
    return "einsum"


def cudnn_fits(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this dtype and head size (Ampere's limits)."""
    return jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128


def attend(q, keys, values, positions, implementation: str = "auto"):
    """q [B, T, N, H], keys and values [B, N, W, H] (the cache's layout, any dtype), positions
    i32[B, T] -> y [B, T, N, H] in q's dtype: each query attends to entries 0..its position."""
    B, T, N, H = q.shape
    chosen = choose(implementation, jax.default_backend(), q.dtype, H, T)
    if chosen == "einsum":
        return _einsum(q, keys, values, positions)
    if chosen == "cudnn" and implementation == "auto":
        try:
            return _fused(q, keys, values, positions, "cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:  # raised while tracing
            log.warning("cuDNN attention unavailable for q%s %s (%s); using einsum", q.shape, q.dtype, e)
            return _einsum(q, keys, values, positions)
    return _fused(q, keys, values, positions, chosen)


def visible(positions, window: int):
    """positions i32[B, T] -> bool[B, 1, T, W]: cache entry w is visible to the query at p when w <= p."""
    return jnp.arange(window)[None, None, None, :] <= positions[:, None, :, None]


def _einsum(q, keys, values, positions):
    B, T, N, H = q.shape
    W = keys.shape[2]
    if T == 1:
        # Decode: multiply-and-reduce instead of einsum. XLA fuses the cache slices into
        # these reductions; as dots they are copied out of the cache first (measured 30%
        # slower on CPU at 32 rows, docs/benchmarks.md).
        scores = jnp.sum(q[:, 0, :, None, :] * keys.astype(q.dtype), axis=-1)[:, :, None]
    else:
        # Heads ahead of tokens on both sides, as the cache holds them: dots in their
        # natural [B, N] batch layout (XLA:CPU's batched dots ran a prefill's attention
        # 25% slower with the transposes inside them; docs/benchmarks.md, "Scoring").
        scores = jnp.einsum("BNTH,BNWH->BNTW", q.transpose(0, 2, 1, 3), keys.astype(q.dtype))
    scores = scores.astype(jnp.float32) * (H**-0.5)
    scores = jnp.where(visible(positions, W), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, N, T, W]
    if T == 1:
        return jnp.sum(probs[:, :, 0, :, None] * values.astype(q.dtype), axis=2)[:, None]
    return jnp.einsum("BNTW,BNWH->BNTH", probs, values.astype(q.dtype)).transpose(0, 2, 1, 3)


def _fused(q, keys, values, positions, implementation: str):
    """Through `jax.nn.dot_product_attention`, which takes keys and values as [B, W, N, H]."""
    T, W = q.shape[1], keys.shape[2]
    k, v = (a.swapaxes(1, 2).astype(q.dtype) for a in (keys, values))  # [B, W, N, H]
    if T == 1:
        # One query per row at position p: its row's first p + 1 entries, a length per row
        # (the kernels' padding mask, cheaper than a [B, 1, 1, W] mask).
        lengths = jnp.minimum(positions[:, 0] + 1, W).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=visible(positions, W), implementation=implementation)
