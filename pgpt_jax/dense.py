"""Dense layers (x @ w) and the one place that decides how their weights are laid out.

XLA:CPU multiplies by a weight [K, N] by repacking it on every call; at the few rows of a
decode step that streams the weights at about half the memory speed a one-row product gets,
and a decode step reads every weight once (docs/benchmarks.md, "Packed dense layers"). So on
CPU, in float32 on one device with the native kernels built (cpu_kernels.py), the programs'
copy of the params holds each dense weight packed once, at load, in column panels
[N / PANEL, K, PANEL] (`pack`), and `matmul` multiplies by them with the `pgpt_dense`
custom call (pgpt_jax/kernels/dense.cc), prompts and decode alike. A 2-D weight is
multiplied by XLA as before, so the model, its checkpoints, meshes and other backends keep
HF's layout; only `programs.program_params` packs (`pack_params`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pgpt_jax import cpu_kernels

PANEL = 32  # columns of a packed panel (the kernel's layout)


def fits(dtype, mesh=None) -> bool:
    """Whether the programs' weights are packed for the kernel: float32 on one CPU device
    (no mesh: XLA cannot split a custom call's operands), the kernels built."""
    return (mesh is None and jax.default_backend() == "cpu" and jax.device_count() == 1
            and jnp.dtype(dtype) == jnp.float32 and cpu_kernels.enabled("dense"))


def pack(w):
    """w [K, N] (N a multiple of PANEL) -> [N / PANEL, K, PANEL]: panel p is columns
    PANEL p .. PANEL (p + 1) - 1 of every row, contiguous."""
    K, N = w.shape
    if N % PANEL:
        raise ValueError(f"cannot pack a [{K}, {N}] weight: N is not a multiple of {PANEL}")
    return w.reshape(K, N // PANEL, PANEL).transpose(1, 0, 2)


def is_packed(w) -> bool:
    return w.ndim == 3 and w.shape[-1] == PANEL


def matmul(x, w):
    """x [..., K] @ w -> [..., N], w either HF's [K, N] (an XLA dot; a [K, ...] weight such as
    c_attn's split [D, 3, N, H] is taken as [K, N]) or packed ([N / PANEL, K, PANEL], the
    kernel; x is taken as float32)."""
    if not is_packed(w):
        return jnp.dot(x, w.reshape(w.shape[0], -1))
    lead, K = x.shape[:-1], x.shape[-1]
    N = w.shape[0] * PANEL
    flat = x.reshape(-1, K).astype(jnp.float32)
    y = jax.ffi.ffi_call(cpu_kernels.DENSE, jax.ShapeDtypeStruct((flat.shape[0], N), jnp.float32))(flat, w)
    return y.reshape(*lead, N).astype(x.dtype)


def pack_params(params, head):
    """(params, head) with every dense weight packed: each `kernel` (c_attn's seen as [D, 3D]
    whatever its shape) and the [D, V] LM head. A weight whose N is not a multiple of PANEL
    stays as it is (and `matmul` gives it to XLA).

    A weight at a time (one small program per shape), so that packing holds one weight's
    copy more at once, not a second model. The packed weights are a copy: where the model
    object is kept too (an Engine's caller holds it), the weights are in memory twice,
    once in HF's layout and once packed (docs/operating.md)."""

    def one(path, a):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]  # [..., "kernel"(, "value")]
        if "kernel" not in names[-2:] or a.ndim < 2:
            return a
        flat = a.reshape(a.shape[0], -1)
        return _pack(flat) if flat.shape[1] % PANEL == 0 else a

    params = jax.tree_util.tree_map_with_path(one, params)
    return params, (_pack(head) if head.shape[-1] % PANEL == 0 else head)


_pack = jax.jit(pack)
