"""Attention of new queries over the KV cache, and the one place that picks how it is computed.

Implementations (the same numbers up to rounding; `tests/test_attention.py` holds them to it):

  einsum  our own XLA program: scores, the visibility mask, a float32 softmax, the weighted
          sum. The fallback everywhere, and the CPU default for prompts (T > 1).
  blocked decode (T = 1; prompts run einsum), the CPU default for calls of 8 rows or more
          (BLOCKED_MIN_ROWS; at one row its loop cost 4-9% more than einsum): the cache
          read in blocks of `BLOCK` entries, as many as the batch's furthest row needs (a
          loop whose count is computed on the device, at most the static window), with a
          running softmax. A window is never copied out of the cache, and the entries read
          follow the rows' positions in steps of BLOCK rather than the window's buckets
          (decode steps at 8-32 rows 2-23% faster on CPU, docs/benchmarks.md). Blocks past
          a row's position add exact zeros, so a row's output does not depend on its
          neighbours.
  kernel  decode (T = 1; prompts run einsum) through a native CPU kernel (cpu_kernels.py, a
          jax.ffi custom call built from pgpt_jax/kernels/decode_attention.cc on first use):
          each row's entries 0..its position read where they lie, one pass over the keys and
          one over the values, (row, head) pairs split over XLA's threads; attention 2.5-4.5x
          faster than blocked at 8-32 rows (docs/benchmarks.md). The CPU default for every decode call in
          float32 on one device, when the kernel builds; a mesh of several devices keeps
          blocked (XLA cannot split a custom call's operands over a mesh).
  xla     `jax.nn.dot_product_attention(implementation="xla")`: JAX's reference path (what
          the fused kernels are checked against on CPU).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused (flash)
          kernel. GPU only, bfloat16/float16, head_dim a multiple of 8 up to 128.
  auto    cudnn for prompts (T > 1) on a GPU when the dtype and head size allow it; on CPU
          kernel for decode in float32 on one device, else blocked for decode of 8 rows or
          more; einsum for everything else. Decode stays on
          einsum even on a GPU until measured: the kernels take keys as [B, W, N, H], so
          each decode step would first copy the window out of the [S, N, L, H] cache
          (twice the KV bytes of a step). TPU: the Pallas kernels JAX ships are not wired
          in yet; auto picks einsum there.

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
import numpy as np

from pgpt_jax import cpu_kernels

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "einsum", "blocked", "kernel", "xla", "cudnn")
BLOCK = 32  # cache entries a step of the blocked decode loop reads (32 against 16, 64, 128: docs/benchmarks.md)
BLOCKED_MIN_ROWS = 8  # "auto" decodes fewer rows a call with einsum
CUDNN_DTYPES = ("bfloat16", "float16")


def choose(implementation: str, backend: str, dtype, head_dim: int, tokens: int, rows: int = 1) -> str:
    """The implementation a call runs: `implementation` unless it is "auto" (see the module
    docstring); `tokens` is T, the new tokens per row (1 in decode), `rows` is B."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation in ("blocked", "kernel") and tokens > 1:
        return "einsum"  # decode paths: prompts run einsum
    if implementation == "kernel" and not kernel_fits(backend, dtype):
        return "blocked"
    if implementation != "auto":
        return implementation
    if backend == "gpu" and tokens > 1 and cudnn_fits(dtype, head_dim):
        return "cudnn"
    if tokens == 1 and kernel_fits(backend, dtype) and jax.device_count() == 1:
        return "kernel"
    if backend == "cpu" and tokens == 1 and rows >= BLOCKED_MIN_ROWS:
        return "blocked"
    return "einsum"


def reads_by_position(implementation: str, backend: str, dtype, head_dim: int, rows: int, window: int) -> bool:
    """Whether a decode call of `rows` rows reads only what its rows' positions need (the
    blocked path's blocks, the kernel's entries) at this static window. Such a call costs
    the same whatever its window, so the scheduler gives these calls one window, the
    context (scheduler.py)."""
    chosen = choose(implementation, backend, dtype, head_dim, 1, rows)
    return chosen == "kernel" or (chosen == "blocked" and _blocks_fit(window))


def kernel_fits(backend: str, dtype) -> bool:
    """Whether the native decode kernel takes this call: float32 on CPU, the kernel built."""
    return backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu_kernels.enabled("attention")


def cudnn_fits(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this dtype and head size (Ampere's limits)."""
    return jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128


def attend_cache(q, k_cache, v_cache, positions, window: int, implementation: str = "auto"):
    """Attention of q [B, T, N, H] over the first `window` (static) entries of the cache's
    first B rows (k_cache, v_cache [S, N, L, H], S >= B, L >= window) -> y [B, T, N, H].

    The kernel and the blocked decode path read the cache where it lies; the others take the
    window out of it first (a copy on CPU)."""
    B, T, N, H = q.shape
    chosen = choose(implementation, jax.default_backend(), q.dtype, H, T, B)
    if chosen == "kernel" and k_cache.dtype == v_cache.dtype == jnp.float32:
        return _kernel(q, k_cache, v_cache, positions, window)
    if chosen in ("kernel", "blocked") and _blocks_fit(window):
        return _blocked(q, k_cache, v_cache, positions, window)
    keys, values = k_cache[:B, :, :window], v_cache[:B, :, :window]  # [B, N, W, H]
    return attend(q, keys, values, positions, implementation)


def attend(q, keys, values, positions, implementation: str = "auto"):
    """q [B, T, N, H], keys and values [B, N, W, H] (the cache's layout, any dtype), positions
    i32[B, T] -> y [B, T, N, H] in q's dtype: each query attends to entries 0..its position."""
    B, T, N, H = q.shape
    chosen = choose(implementation, jax.default_backend(), q.dtype, H, T, B)
    if chosen == "kernel" and keys.dtype == values.dtype == jnp.float32:
        return _kernel(q, keys, values, positions, keys.shape[2])
    if chosen in ("kernel", "blocked"):
        W = keys.shape[2]
        return _blocked(q, keys, values, positions, W) if _blocks_fit(W) else _einsum(q, keys, values, positions)
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


def _blocks_fit(window: int) -> bool:
    return window % BLOCK == 0


def _blocked(q, k_cache, v_cache, positions, window: int):
    """Decode attention (T = 1) read block by block from the first B rows of the cache
    ([S, N, L, H]): blocks 0..n-1 where n covers the furthest row's position (at most
    window / BLOCK), each taken with a dynamic slice of the cache itself, combined with a
    running max and sum (the softmax of all the entries, up to rounding).

    A block wholly past a row's position scores `finfo.min` for that row: its weights are
    exactly 0 and its running max, sum and output stay exactly as they were, so how many
    blocks the batch needs never changes a row's numbers. The count comes from every one of
    the B rows; the decode programs hold a free slot's position (which runs on after its
    request ends) below the call's span, the scheduler's need (programs._forward), so free
    slots do not widen the read.
    """
    B, _, N, H = q.shape
    lowest = jnp.finfo(jnp.float32).min
    query = q[:, 0].astype(jnp.float32) * (H**-0.5)  # [B, N, H]
    pos = positions[:, 0]
    blocks = jnp.minimum(jnp.max(pos) // BLOCK + 1, window // BLOCK)

    def block(i, carry):
        top, total, acc = carry  # [B, N], [B, N], [B, N, H]
        start = i * BLOCK
        k, v = (jax.lax.dynamic_slice(c, (0, 0, start, 0), (B, N, BLOCK, H)).astype(jnp.float32)
                for c in (k_cache, v_cache))
        scores = jnp.sum(query[:, :, None, :] * k, axis=-1)  # [B, N, BLOCK]
        seen = start + jnp.arange(BLOCK)[None, None, :] <= pos[:, None, None]
        scores = jnp.where(seen, scores, lowest)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        weights = jnp.exp(scores - new_top[..., None])
        rescale = jnp.exp(top - new_top)
        return (new_top, total * rescale + jnp.sum(weights, axis=-1),
                acc * rescale[..., None] + jnp.sum(weights[..., None] * v, axis=2))

    init = (jnp.full((B, N), lowest), jnp.zeros((B, N)), jnp.zeros((B, N, H)))
    _, total, acc = jax.lax.fori_loop(0, blocks, block, init)
    return (acc / total[..., None])[:, None].astype(q.dtype)


def _kernel(q, k_cache, v_cache, positions, window: int):
    """Decode attention (T = 1) by the native CPU kernel over the first B rows of the float32
    cache ([S, N, L, H]): row b reads entries 0..min(its position, window - 1)."""
    B, _, N, H = q.shape
    call = jax.ffi.ffi_call(cpu_kernels.DECODE_ATTENTION, jax.ShapeDtypeStruct((B, N, H), jnp.float32))
    y = call(q[:, 0].astype(jnp.float32), k_cache, v_cache, positions[:, 0].astype(jnp.int32),
             window=np.int64(window), scale=np.float32(H**-0.5))
    return y[:, None].astype(q.dtype)


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
