"""Dense layers by the native kernel on packed weights (pgpt_jax/dense.py): the same numbers
as XLA's dot, a row's result independent of its batch, and the programs' params packed on
CPU (no XLA dot left in a decode step) with the same tokens as HF's layout."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from pgpt_jax import cpu_kernels, dense, programs, sampling
from pgpt_jax.model import init_model


def _weights(K, N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((K, N)).astype(np.float32) * 0.1


def test_pack_is_column_panels():
    w = _weights(5, 64)
    p = np.asarray(dense.pack(jnp.asarray(w)))
    assert p.shape == (2, 5, dense.PANEL)
    np.testing.assert_array_equal(p[1, 3], w[3, 32:64])  # panel 1, row 3: columns 32..63
    np.testing.assert_array_equal(p.transpose(1, 0, 2).reshape(5, 64), w)  # every column, once
    with pytest.raises(ValueError, match="multiple of 32"):
        dense.pack(jnp.zeros((4, 48)))


@pytest.mark.parametrize("K", [24, 100, 128])
def test_kernel_agrees_with_xla(K):
    assert cpu_kernels.available(), cpu_kernels.why_not()
    w = _weights(K, 96)
    packed = dense.pack(jnp.asarray(w))
    for M in (1, 3, 8, 9, 17, 40):  # whole blocks of rows, part blocks, several of each
        x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
        got = np.asarray(jax.jit(dense.matmul)(x, packed))
        np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    x3 = np.random.default_rng(0).standard_normal((2, 5, K)).astype(np.float32)  # leading dims kept
    np.testing.assert_allclose(np.asarray(dense.matmul(x3, packed)), x3 @ w, rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_its_batch():
    # Each row's sums run over K in the same order whatever the batch: bit-identical alone
    # or among 12 others (a decode step's rows must not change with their neighbours).
    w = dense.pack(jnp.asarray(_weights(256, 64)))
    x = np.random.default_rng(1).standard_normal((13, 256)).astype(np.float32)
    batch = np.asarray(dense.matmul(x, w))
    for m in (0, 7, 8, 12):
        np.testing.assert_array_equal(np.asarray(dense.matmul(x[m:m + 1], w))[0], batch[m])


def test_fits_float32_on_one_cpu_device(monkeypatch):
    assert dense.fits("float32")
    assert not dense.fits("bfloat16")
    assert not dense.fits("float32", mesh=object())
    monkeypatch.setenv("PGPT_CPU_KERNELS", "attention")  # only the attention kernel
    assert not dense.fits("float32") and cpu_kernels.enabled("attention")
    monkeypatch.setenv("PGPT_CPU_KERNELS", "dense")
    assert dense.fits("float32") and not cpu_kernels.enabled("attention")


def test_programs_run_on_packed_weights():
    model = init_model("tiny", seed=0, dtype="float32")
    graphdef, params, head = programs.program_params(model)
    kernels = [a for path, a in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == 4 * model.config.n_layer and all(dense.is_packed(k) for k in kernels)
    assert dense.is_packed(head) and head.shape == (model.config.padded_vocab // dense.PANEL, model.config.n_embd,
                                                    dense.PANEL)
    plain = programs.program_params(model, packed=False)
    assert not dense.is_packed(plain[2])

    # A decode step: every product is the kernel's, none is XLA's dot.
    state = programs.init_state(model.config, 4)
    hlo = programs.decode.lower(graphdef, params, head, state, np.int32(64), steps=1, window=64, rows=4,
                                top_k=2).compile().as_text()
    assert hlo.count(f'custom_call_target="{cpu_kernels.DENSE}"') == 4 * model.config.n_layer + 1
    assert " dot(" not in hlo

    # A prompt and 6 greedy tokens: the same from packed weights as from HF's layout.
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 8)).astype(np.int32)
    outs = []
    for g, p, h in ((graphdef, params, head), plain):
        cache, last, *_ = programs.prefill(g, p, h, tokens, np.array([8], np.int32), np.zeros(2, np.int32),
                                           want_logprobs=False, top_k=2)
        outs.append((np.asarray(last)[:, :model.config.vocab_size], [int(np.argmax(last))]))
        st = programs.init_state(model.config, 1)
        st, last = programs.insert(st, cache, last, np.int32(0), np.int32(0))
        row = sampling.request_row(temperature=0.0, top_p=1.0, presence=0.0, frequency=0.0, logit_bias=None,
                                   banned=(), num_logprobs=0, seed=0, choice_index=0, vocab=model.config.padded_vocab)
        st = programs.start_row(st, last, np.int32(0), np.int32(8), row, top_k=2)[0]
        st, toks, *_ = programs.decode(g, p, h, st, np.int32(64), steps=6, window=64, rows=1, top_k=2)
        outs[-1][1].extend(np.asarray(toks)[:, 0].tolist())
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    assert outs[0][1] == outs[1][1]


def test_head_logprobs_from_packed_head():
    model = init_model("tiny", seed=0, dtype="float32")
    _, _, head = programs.program_params(model)
    _, _, plain = programs.program_params(model, packed=False)
    hidden = np.random.default_rng(3).standard_normal((2, 3, model.config.n_embd)).astype(np.float32)
    ids = np.array([[1, 2, 3], [40, 50, 60]], np.int32)
    got = programs.head_logprobs(hidden, head, ids, 1, model.config.vocab_size)
    want = programs.head_logprobs(hidden, plain, ids, 1, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_the_avx2_build_agrees(tmp_path):
    # Machines without AVX-512 (the Zen 3 kind) build the kernel with 8-lane vectors and
    # blocks of 6 rows: built here for x86-64-v3 (AVX2) and held to the same numbers.
    import ctypes
    import platform
    import subprocess

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    out = tmp_path / "dense_avx2.so"
    flags = [f for f in cpu_kernels.FLAGS if f != "-march=native"]
    subprocess.run([cpu_kernels._compiler(), *flags, "-march=x86-64-v3", "-I", jax.ffi.include_dir(),
                    str(cpu_kernels.SOURCES[1]), "-o", str(out)], check=True, timeout=300)
    assert "zmm" not in subprocess.run(["objdump", "-d", str(out)], capture_output=True, text=True).stdout
    jax.ffi.register_ffi_target("pgpt_dense_avx2_test", jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(out)).PgptDense),
                                platform="cpu")
    w = _weights(100, 64)
    packed = dense.pack(jnp.asarray(w))
    for M in (1, 6, 7, 13):
        x = np.random.default_rng(M).standard_normal((M, 100)).astype(np.float32)
        got = jax.ffi.ffi_call("pgpt_dense_avx2_test", jax.ShapeDtypeStruct((M, 64), jnp.float32))(x, packed)
        np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
