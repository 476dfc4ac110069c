"""The machine's roofline: memory read bandwidth and peak fp32 GEMM FLOP/s, and the decode bound
they give. The measurement runs in a worker process of its own (workers.py), so no other
library's threads are alive while it runs."""

from __future__ import annotations

import time

from compare import has

GIB_FLOATS = 1 << 28  # a 1 GiB float32 array: far past every cache
GEMM_N = 2048
RUNS = 7


def bound(batch: float, bw_gbs: float, peak_gflops: float, params: int, bytes_per_param: int = 4) -> float:
    """Decode tokens/s at `batch` rows: each step reads every weight once and each token costs
    2 FLOPs per parameter, so min(B * BW / weight_bytes, PEAK / (2 * params))."""
    return min(batch * bw_gbs * 1e9 / (bytes_per_param * params), peak_gflops * 1e9 / (2 * params))


def _best_seconds(fn) -> float:
    """The fastest of RUNS calls: the one least disturbed by anything else on the machine."""
    best = float("inf")
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int) -> dict:
    """Memory read bandwidth and peak fp32 GEMM FLOP/s: the best of several runs, each of several
    libraries (whichever reaches the hardware best on this machine)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    res: dict = {}
    x = np.ones(GIB_FLOATS, np.float32)
    a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N), np.float32)
    flops = 2 * GEMM_N ** 3
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:  # numpy reductions release the GIL: one chunk per core
        res["bw_numpy_gbs"] = round(x.nbytes / _best_seconds(lambda: sum(pool.map(np.sum, chunks))) / 1e9, 2)
    res["gemm_numpy_gflops"] = round(flops / _best_seconds(lambda: a @ a) / 1e9, 1)
    try:
        import jax
        import jax.numpy as jnp

        def jax_read_seconds() -> float:  # its 1 GiB array is freed on return, before the GEMM
            xj = jnp.ones(GIB_FLOATS, jnp.float32)
            total = jax.jit(jnp.sum)
            total(xj).block_until_ready()  # compiles
            return _best_seconds(lambda: total(xj).block_until_ready())

        res["bw_jax_gbs"] = round(x.nbytes / jax_read_seconds() / 1e9, 2)
        aj = jnp.asarray(a)
        mm = jax.jit(jnp.matmul)
        mm(aj, aj).block_until_ready()
        res["gemm_jax_gflops"] = round(flops / _best_seconds(lambda: mm(aj, aj).block_until_ready()) / 1e9, 1)
    except Exception as e:  # noqa: BLE001  (a library that fails here just doesn't count)
        res["jax_error"] = repr(e)[:200]
    if has("torch"):
        import torch

        torch.set_num_threads(threads)
        xt, at = torch.from_numpy(x), torch.from_numpy(a)
        res["bw_torch_gbs"] = round(x.nbytes / _best_seconds(xt.sum) / 1e9, 2)
        torch.mm(at, at)
        res["gemm_torch_gflops"] = round(flops / _best_seconds(lambda: torch.mm(at, at)) / 1e9, 1)
    res["bw_gbs"] = max(v for k, v in res.items() if k.startswith("bw_"))
    res["peak_gflops"] = max(v for k, v in res.items() if k.startswith("gemm_"))
    return res
