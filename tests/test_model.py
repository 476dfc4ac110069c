"""Model: cached decoding equals a full forward pass (also when the cache has more rows than the
input); the programs' split c_attn layout; the transposed LM head; config presets; padded
vocabulary masked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from pgpt_jax.config import GPTConfig
from pgpt_jax.model import forward, init_cache, lm_head, split_qkv


def test_cached_decoding_equals_full_forward_for_rows_of_different_lengths(tiny_model):
    cfg = tiny_model.config
    rng = np.random.default_rng(0)
    T = 20
    tokens = rng.integers(0, cfg.vocab_size, (3, T)).astype(np.int32)
    full, _ = forward(tiny_model, tokens, np.broadcast_to(np.arange(T), (3, T)), init_cache(cfg, 3, T))

    # Rows prefill different prompt lengths (5, 9, 13), then decode one token at a time;
    # each row reads back its own positions while the others run ahead or behind.
    lengths = np.array([5, 9, 13])
    fwd = jax.jit(lambda toks, pos, cache, w: forward(tiny_model, toks, pos, cache, w), static_argnums=3)
    cache = init_cache(cfg, 3, 32)
    got = np.zeros_like(np.asarray(full))
    P = int(lengths.max())
    pos = np.minimum(np.arange(P)[None, :], lengths[:, None] - 1)  # pad by repeating the last position
    toks = np.take_along_axis(tokens, pos, axis=1)
    logits, cache = fwd(toks, pos, cache, 32)
    for r, n in enumerate(lengths):
        got[r, :n] = np.asarray(logits[r, :n])
    for step in range(T - lengths.min()):
        p = np.minimum(lengths + step, T - 1)
        logits, cache = fwd(tokens[np.arange(3), p][:, None], p[:, None], cache, 32)
        for r in range(3):
            if lengths[r] + step < T:
                got[r, p[r]] = np.asarray(logits[r, 0])
    real = slice(0, cfg.vocab_size)
    np.testing.assert_allclose(got[..., real], np.asarray(full)[..., real], atol=1e-5, rtol=0)


def test_window_reads_only_the_prefix_it_needs(tiny_model):
    cfg = tiny_model.config
    tokens = np.arange(1, 11, dtype=np.int32)[None]
    pos = np.arange(10)[None]
    a, _ = forward(tiny_model, tokens, pos, init_cache(cfg, 1, 128))
    b, _ = forward(tiny_model, tokens, pos, init_cache(cfg, 1, 128), window=16)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_decode_with_fewer_rows_than_the_cache_uses_its_first_rows(tiny_model):
    # The engine decodes the occupied prefix of its slots against the whole cache: 2 input rows
    # on a 4-row cache must equal the same 2 rows on a 2-row cache, and leave rows 2-3 untouched.
    cfg = tiny_model.config
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    pos = np.arange(5)[None].repeat(2, 0)
    _, small = forward(tiny_model, prompt, pos, init_cache(cfg, 2, 32))
    big = tuple((jnp.concatenate([k, k + 7.0]), jnp.concatenate([v, v - 7.0])) for k, v in small)
    step_tok, step_pos = np.array([[7], [8]], np.int32), np.array([[5], [5]], np.int32)
    want, small = forward(tiny_model, step_tok, step_pos, small, 16)
    got, big_after = forward(tiny_model, step_tok, step_pos, big, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for (k, v), (k2, v2), (bk, bv) in zip(small, big_after, big):
        np.testing.assert_allclose(np.asarray(k2[:2]), np.asarray(k), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(k2[2:]), np.asarray(bk[2:]))
        np.testing.assert_array_equal(np.asarray(v2[2:]), np.asarray(bv[2:]))


def test_split_qkv_is_a_reshape_that_attention_reads_alike(tiny_model):
    """The programs' c_attn layout [D, 3, N, H] holds HF's [q | k | v] columns unmoved, and
    the model gives the same logits and cache from either layout; it leaves other params
    alone and a split state as it is."""
    cfg = tiny_model.config
    D, N, H = cfg.n_embd, cfg.n_head, cfg.head_dim
    graphdef, params = nnx.split(tiny_model)
    split = split_qkv(params, cfg)
    w, sw = params["h"][0]["attn"]["c_attn"]["kernel"][...], split["h"][0]["attn"]["c_attn"]["kernel"][...]
    assert sw.shape == (D, 3, N, H) and split["h"][0]["attn"]["c_attn"]["bias"][...].shape == (3, N, H)
    np.testing.assert_array_equal(sw[:, 1, 2], w[:, D + 2 * H: D + 3 * H])  # k of head 2
    assert split["h"][0]["mlp"]["c_fc"]["kernel"][...] is params["h"][0]["mlp"]["c_fc"]["kernel"][...]
    assert jax.tree.map(jnp.shape, split_qkv(split, cfg)) == jax.tree.map(jnp.shape, split)
    tokens, pos = np.array([[5, 6, 7, 8]], np.int32), np.arange(4)[None]
    want, want_cache = forward(tiny_model, tokens, pos, init_cache(cfg, 1, 8))
    got, got_cache = forward(nnx.merge(graphdef, split), tokens, pos, init_cache(cfg, 1, 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_cache[1][1]), np.asarray(want_cache[1][1]), atol=1e-6)


def test_transposed_lm_head_gives_the_tied_embedding_logits(tiny_model):
    hidden = jax.random.normal(jax.random.key(0), (3, tiny_model.config.n_embd))
    head = lm_head(tiny_model)
    assert head.shape == (tiny_model.config.n_embd, tiny_model.config.padded_vocab)
    np.testing.assert_allclose(np.asarray(tiny_model.logits(hidden, head)),
                               np.asarray(tiny_model.logits(hidden)), atol=1e-5)


def test_padded_vocabulary_is_masked(tiny_model):
    cfg = tiny_model.config
    assert cfg.padded_vocab == 50304 and cfg.padded_vocab % 64 == 0
    logits, _ = forward(tiny_model, np.array([[1, 2]]), np.array([[0, 1]]), init_cache(cfg, 1, 4))
    assert np.all(np.isneginf(np.asarray(logits[..., cfg.vocab_size:])))
    assert np.all(np.isfinite(np.asarray(logits[..., : cfg.vocab_size])))
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(jnp.sum(probs[..., cfg.vocab_size:])) == 0.0


def test_presets_and_config_errors():
    assert (GPTConfig.preset("gpt2").n_layer, GPTConfig.preset("gpt2").n_embd) == (12, 768)
    assert (GPTConfig.preset("gpt2-medium").n_layer, GPTConfig.preset("gpt2-medium").n_head) == (24, 16)
    assert GPTConfig.preset("gpt2-large").n_embd == 1280
    assert GPTConfig.preset("gpt2-xl").n_head == 25
    assert all(GPTConfig.preset(p).n_positions == 1024 for p in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"))
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layer": 2, "rotary": True})
    with pytest.raises(ValueError, match="fim_order must be"):
        GPTConfig(fim=True, vocab_size=50260, fim_order="pms")
    assert GPTConfig.from_dict({"fim": True, "vocab_size": 50260, "fim_order": "spm"}).fim_order == "spm"
    assert GPTConfig.from_dict({"n_layer": 2}).fim_order == "psm"  # checkpoints written before the field
    cfg = GPTConfig.preset("tiny")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
