"""Attention implementations agree: our einsum path, the blocked decode path, the native CPU
decode kernel and
`jax.nn.dot_product_attention` (its XLA implementation, the one that runs on CPU) on prefill
and decode shapes over a cache, in float32 and within bfloat16 tolerance; the whole model's
logits agree under each; "auto" keeps our paths on CPU and picks cuDNN only where it applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpt_jax import attention, cpu_kernels
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


def _cache_inputs(S, N, L, H, dtype, positions):
    """q for the first len(positions) rows, caches [S, N, L, H] holding noise everywhere."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((len(positions), 1, N, H)), dtype)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((S, N, L, H)), dtype) for _ in range(2))
    return q, k_cache, v_cache, jnp.asarray(positions, jnp.int32)


@pytest.mark.parametrize("impl", ["blocked", "kernel"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_decode_agrees_over_the_cache(dtype, impl):
    # Three rows of a five-row cache, window 192 (several blocks): one row sees only entry 0,
    # one ends inside a later block, one at the window's last entry. (The kernel takes
    # float32; in bfloat16 "kernel" runs the blocked path.)
    B, S, N, L, H, W = 3, 5, 4, 256, 8, 192
    q, k_cache, v_cache, pos = _cache_inputs(S, N, L, H, dtype, [[0], [70], [191]])
    blocked = attention.attend_cache(q, k_cache, v_cache, pos, W, impl)
    reference = attention.attend(q, k_cache[:B, :, :W], v_cache[:B, :, :W], pos, "xla")
    assert blocked.shape == (B, 1, N, H) and blocked.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(blocked, np.float32), np.asarray(reference, np.float32),
                               atol=TOL[dtype])
    # The same numbers through `attend` (keys already cut to the window).
    np.testing.assert_array_equal(np.asarray(attention.attend(q, k_cache[:B, :, :W], v_cache[:B, :, :W], pos,
                                                              impl)), np.asarray(blocked))


@pytest.mark.parametrize("impl", ["blocked", "kernel"])
def test_blocked_decode_reads_nothing_past_a_row_or_its_batch(impl):
    S, N, L, H, W = 4, 2, 256, 8, 256
    q, k_cache, v_cache, pos = _cache_inputs(S, N, L, H, "float32", [[5], [100]])
    out = np.asarray(attention.attend_cache(q, k_cache, v_cache, pos, W, impl))
    # Entries past each row's position, later blocks, and rows past B change nothing.
    noisy_k = k_cache.at[0, :, 6:].set(50.0).at[1, :, 101:].set(-50.0).at[2:].set(9.0)
    noisy_v = v_cache.at[0, :, 6:].set(100.0).at[1, :, 101:].set(100.0).at[2:].set(9.0)
    np.testing.assert_array_equal(np.asarray(attention.attend_cache(q, noisy_k, noisy_v, pos, W, impl)), out)
    # A row's numbers do not depend on how far its neighbours reach (one block alone, more
    # beside the row at 100): bit for bit, the batch-invariance the seeds rely on.
    alone = attention.attend_cache(q[:1], k_cache, v_cache, pos[:1], W, impl)
    np.testing.assert_array_equal(np.asarray(alone)[0], out[0])
    # The window bounds the loop: at window 64 the row at 100 sees entries 0..63 only.
    cut = attention.attend_cache(q, k_cache, v_cache, pos, 64, impl)
    ref = attention.attend(q, k_cache[:2, :, :64], v_cache[:2, :, :64], jnp.minimum(pos, 63), "xla")
    np.testing.assert_allclose(np.asarray(cut), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_logits_agree_with_either_implementation(dtype):
    # A prefill of 7 tokens, then 3 decode steps against the cache it wrote, under each.
    cfg_model = {impl: set_attention(init_model("tiny", seed=0, dtype=dtype), impl)
                 for impl in ("einsum", "blocked", "kernel", "xla")}
    cfg = cfg_model["einsum"].config
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    out = {}
    for impl, model in cfg_model.items():
        # Window 64 (whole blocks of the blocked path); prompts run einsum under "blocked".
        fwd = jax.jit(lambda t, p, c, m=model: forward(m, t, p, c, 64))
        logits, cache = fwd(tokens[:, :7], np.broadcast_to(np.arange(7), (2, 7)), init_cache(cfg, 2, 64))
        steps = [logits]
        for p in range(7, 10):
            logits, cache = fwd(tokens[:, p:p + 1], np.full((2, 1), p), cache)
            steps.append(logits)
        out[impl] = np.concatenate([np.asarray(s) for s in steps], axis=1)[..., :cfg.vocab_size]
    scale = np.abs(out["einsum"]).max()
    for impl in ("xla", "blocked", "kernel"):
        np.testing.assert_allclose(out[impl], out["einsum"], atol=TOL[dtype] * max(scale, 1.0))


def test_the_native_kernel_builds_here():
    # This machine (and CI's) has a C++ compiler: a kernel that silently fell back to the XLA
    # paths would make every CPU figure in docs/benchmarks.md since issue 20 wrong.
    assert cpu_kernels.available(), cpu_kernels.why_not()


def test_auto_choice():
    # CPU: einsum for prompts, the native kernel for decode in float32 (one device), blocked
    # for decode of 8 rows or more otherwise; TPU: einsum; GPU: cuDNN for prompts in
    # bf16/fp16 with a head size it takes, einsum for decode.
    assert attention.choose("auto", "cpu", jnp.bfloat16, 64, 16) == "einsum"
    assert attention.choose("auto", "cpu", jnp.float32, 64, 16) == "einsum"
    assert attention.choose("auto", "cpu", jnp.float32, 64, 1, rows=8) == "kernel"
    assert attention.choose("auto", "cpu", jnp.float32, 64, 1, rows=1) == "kernel"
    assert attention.choose("auto", "cpu", jnp.bfloat16, 64, 1, rows=8) == "blocked"
    assert attention.choose("auto", "cpu", jnp.bfloat16, 64, 1, rows=4) == "einsum"  # few rows: einsum's cheaper
    assert attention.choose("kernel", "cpu", jnp.bfloat16, 64, 1) == "blocked"  # the kernel takes float32
    assert attention.choose("kernel", "gpu", jnp.float32, 64, 1) == "blocked"
    assert attention.choose("auto", "tpu", jnp.float32, 64, 1) == "einsum"
    assert attention.choose("auto", "tpu", jnp.bfloat16, 64, 16) == "einsum"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 64, 16) == "cudnn"
    assert attention.choose("auto", "gpu", jnp.float16, 64, 16) == "cudnn"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 64, 1) == "einsum"
    assert attention.choose("auto", "gpu", jnp.float32, 64, 16) == "einsum"
    assert attention.choose("auto", "gpu", jnp.bfloat16, 60, 16) == "einsum"
    assert attention.choose("xla", "cpu", jnp.float32, 64, 1) == "xla"
    with pytest.raises(ValueError, match="unknown attention"):
        attention.choose("flash", "cpu", jnp.float32, 64, 1)


def test_auto_runs_our_programs_on_cpu(tiny_model):
    # "auto" must be our CPU paths, not the reference kernel: the same HLO as "kernel" for
    # decode in float32 (any rows, any window), as "blocked" for decode of 8 rows in
    # bfloat16 and "einsum" for fewer, and as "einsum" for prompts.
    assert tiny_model.h[0].attn.implementation == "auto"

    def hlo(args, impl):
        return jax.jit(lambda q, k, v, p: attention.attend(q, k, v, p, impl)).lower(*args).as_text()

    decode = _inputs(8, 1, 4, 128, 16, "float32", [[p] for p in range(3, 11)])
    assert hlo(decode, "auto") == hlo(decode, "kernel") not in (hlo(decode, "einsum"), hlo(decode, "blocked"))
    assert cpu_kernels.DECODE_ATTENTION in hlo(decode, "auto")
    few = _inputs(2, 1, 4, 16, 16, "float32", [[3], [9]])
    assert hlo(few, "auto") == hlo(few, "kernel") != hlo(few, "einsum")
    decode16 = _inputs(8, 1, 4, 128, 16, "bfloat16", [[p] for p in range(3, 11)])
    assert hlo(decode16, "auto") == hlo(decode16, "blocked") != hlo(decode16, "einsum")
    few16 = _inputs(2, 1, 4, 128, 16, "bfloat16", [[3], [9]])
    assert hlo(few16, "auto") == hlo(few16, "einsum") != hlo(few16, "blocked")
    prompt = _inputs(2, 4, 4, 16, 16, "float32", [[0, 1, 2, 3], [5, 6, 7, 8]])
    assert hlo(prompt, "auto") == hlo(prompt, "blocked") == hlo(prompt, "einsum") != hlo(prompt, "xla")
    with pytest.raises(ValueError, match="unknown attention"):
        set_attention(init_model("tiny"), "flash")


def test_free_slots_do_not_widen_a_decode_calls_reads(tiny_model):
    """A decode call's `span` (the scheduler's need) bounds what the blocked path reads, however
    far the free slots among its rows have run on: their positions are held below it. V is
    NaN from entry 32 on, so a read of any block past the first would turn the occupied row's
    logprob into NaN (a weight of exactly 0 times NaN)."""
    from pgpt_jax import programs

    graphdef, params, head = programs.program_params(set_attention(init_model("tiny", seed=0), "blocked"))
    rows = attention.BLOCKED_MIN_ROWS

    def call(span):
        state = programs.init_state(tiny_model.config, rows)
        cache = tuple((k, v.at[:, :, attention.BLOCK:].set(jnp.nan)) for k, v in state.cache)
        positions = jnp.full((rows,), 120, jnp.int32).at[0].set(10)  # row 0 occupied; the rest free, far on
        state = programs.DecodeState(cache, state.tokens, positions, state.rows)
        state, tokens, logprobs, *_ = programs.decode(graphdef, params, head, state, np.int32(span), steps=1,
                                                      window=128, rows=rows, top_k=1)
        return np.asarray(state.positions), np.asarray(logprobs)[0]

    positions, logprobs = call(span=12)  # row 0 at 10, one step: entries 0..10 (12 covers them)
    assert positions.tolist() == [11] + [12] * (rows - 1)
    assert np.isfinite(logprobs[0])
    positions, logprobs = call(span=128)  # the whole window: the free rows reach block 3, and row 0 reads it
    assert positions.tolist() == [11] + [121] * (rows - 1)
    assert np.isnan(logprobs[0])
