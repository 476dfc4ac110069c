"""Attention implementations agree: our einsum path and `jax.nn.dot_product_attention` (its XLA
implementation, the one that runs on CPU) on prefill and decode shapes over a cache, in
float32 and within bfloat16 tolerance; the whole model's logits agree under either; "auto"
keeps the einsum path on CPU and picks cuDNN only where it applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpt_jax import attention
from pgpt_jax.model import forward, init_cache, init_model, set_attention

TOL = {"float32": 1e-5, "bfloat16": 3e-2}


def _inputs(B, T, N, W, H, dtype, positions):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    keys, values = (jnp.asarray(rng.standard_normal((B, N, W, H)), dtype) for _ in range(2))
    return q, keys, values, jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_shapes_agree(dtype):
    # Three rows of 6 new tokens over a 16-entry window; rows start at different positions
    # (a row whose earlier entries are already cached), so the mask is not plain causal.
    B, T, N, W, H = 3, 6, 4, 16, 8
    positions = np.array([np.arange(T), np.arange(T) + 3, np.arange(T) + 10])
    args = _inputs(B, T, N, W, H, dtype, positions)
    ours = attention.attend(*args, "einsum")
    theirs = attention.attend(*args, "xla")
    assert ours.shape == (B, T, N, H) and ours.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_shapes_agree(dtype):
    # One token per row at positions 0, 5 and 15 of a 16-entry window (one row sees a single
    # entry, one the whole window).
    B, N, W, H = 3, 4, 16, 8
    args = _inputs(B, 1, N, W, H, dtype, [[0], [5], [15]])
    ours = attention.attend(*args, "einsum")
    theirs = attention.attend(*args, "xla")
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=TOL[dtype])
    # Entries past a row's position must not count: changing them changes neither path.
    q, keys, values, pos = args
    noisy = values.at[0, :, 1:].set(100.0)
    for impl in ("einsum", "xla"):
        np.testing.assert_array_equal(np.asarray(attention.attend(q, keys, noisy, pos, impl)[0]),
                                      np.asarray(attention.attend(q, keys, values, pos, impl)[0]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_logits_agree_with_either_implementation(dtype):
    # A prefill of 7 tokens, then 3 decode steps against the cache it wrote, under each.
    cfg_model = {impl: set_attention(init_model("tiny", seed=0, dtype=dtype), impl) for impl in ("einsum", "xla")}
    cfg = cfg_model["einsum"].config
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    out = {}
    for impl, model in cfg_model.items():
        fwd = jax.jit(lambda t, p, c, m=model: forward(m, t, p, c, 32))
        logits, cache = fwd(tokens[:, :7], np.broadcast_to(np.arange(7), (2, 7)), init_cache(cfg, 2, 32))
        steps = [logits]
        for p in range(7, 10):
            logits, cache = fwd(tokens[:, p:p + 1], np.full((2, 1), p), cache)
            steps.append(logits)
        out[impl] = np.concatenate([np.asarray(s) for s in steps], axis=1)[..., :cfg.vocab_size]
    scale = np.abs(out["einsum"]).max()
    np.testing.assert_allclose(out["xla"], out["einsum"], atol=TOL[dtype] * max(scale, 1.0))


def test_auto_choice():
    # CPU and TPU: einsum; GPU: cuDNN for prompts in bf16/fp16 with a head size it takes, einsum for decode.
    assert attention.choose("auto", "cpu", jnp.bfloat16, 64, 16) == "einsum"
    assert attention.choose("auto", "tpu", jnp.bfloat16, 64, 16) == "einsum"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 64, 16) == "cudnn"
    assert attention.choose("auto", "gpu", jnp.float16, 64, 16) == "cudnn"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 64, 1) == "einsum"
    assert attention.choose("auto", "gpu", jnp.float32, 64, 16) == "einsum"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 60, 16) == "einsum"
    assert attention.choose("xla", "cpu", jnp.float32, 64, 1) == "xla"
    with pytest.raises(ValueError, match="unknown attention"):
        attention.choose("flash", "cpu", jnp.float32, 64, 1)


def test_auto_runs_the_einsum_program_on_cpu(tiny_model):
    # "auto" must be the existing CPU path, not the reference kernel: the same HLO as "einsum".
    assert tiny_model.h[0].attn.implementation == "auto"
    B, T, N, W, H = 2, 1, 4, 16, 16
    args = _inputs(B, T, N, W, H, "float32", [[3], [9]])
    hlo = {impl: jax.jit(lambda q, k, v, p, i=impl: attention.attend(q, k, v, p, i)).lower(*args).as_text()
           for impl in ("auto", "einsum", "xla")}
    assert hlo["auto"] == hlo["einsum"] != hlo["xla"]
    with pytest.raises(ValueError, match="unknown attention"):
        set_attention(init_model("tiny"), "flash")
