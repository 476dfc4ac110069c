"""HF GPT-2 import against transformers' own logits, orbax round trips, convert, and bad input.

tests/fixtures/hf_tiny/ is made by scripts/make_hf_fixture.py (transformers + torch, which are
not needed here): a random 2-layer GPT-2 with n_embd=16 and HF's logits for three sequences.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pgpt_jax import checkpoint
from pgpt_jax.checkpoint import convert, load_model, restore_checkpoint, save_checkpoint
from pgpt_jax.model import forward, init_cache

HF_DIR = pathlib.Path(__file__).parent / "fixtures" / "hf_tiny"
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(HF_DIR / "reference.npz"))


@pytest.fixture(scope="module")
def hf_model():
    return load_model(HF_DIR)


@pytest.fixture(scope="module")
def hf_tensors():
    return load_file(HF_DIR / "model.safetensors")


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    """tokens i32[B, T] -> f32[B, T, V]; one compiled program (op-by-op eager is ~4x slower here)."""
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return forward(model, tokens, positions, init_cache(model.config, B, T))[0]


def parity_error(model, ref) -> float:
    """Max |ours - HF| over the stored logit columns; also checks full-vocab argmax and logsumexp."""
    # Rows are right-padded; attention is causal, so the padding changes no valid position.
    logits = np.asarray(_logits(*nnx.split(model), jnp.asarray(ref["tokens"])))
    logits = logits[..., : model.config.vocab_size]
    err = 0.0
    for i, n in enumerate(ref["lengths"]):
        row = logits[i, :n]
        np.testing.assert_array_equal(row.argmax(-1), ref["argmax"][i, :n])
        top = row.max(-1)
        lse = top + np.log(np.exp(row - top[:, None]).sum(-1))
        np.testing.assert_allclose(lse, ref["logsumexp"][i, :n], atol=ATOL)
        err = max(err, float(np.abs(row[:, ref["columns"]] - ref["logits"][i, :n]).max()))
    return err


def flat_params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def hf_copy(tmp_path, tensors=None, config=None, name="hf") -> pathlib.Path:
    """A copy of the fixture dir with some tensors or config fields replaced."""
    d = tmp_path / name
    d.mkdir()
    hf = json.loads((HF_DIR / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, **(config or {})}))
    if tensors is None:
        shutil.copy(HF_DIR / "model.safetensors", d / "model.safetensors")
    else:
        save_file(tensors, d / "model.safetensors")
    return d


# --- HF import --------------------------------------------------------------------------------


def test_hf_import_matches_transformers(hf_model, ref):
    cfg = hf_model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (2, 4, 16, 128, 50257)
    assert cfg.name == "hf_tiny"
    wte = np.asarray(hf_model.wte.embedding.get_value())
    assert wte.shape == (cfg.padded_vocab, 16) == (50304, 16)
    assert not wte[cfg.vocab_size:].any()  # padding rows are zeros
    err = parity_error(hf_model, ref)
    print(f"HF parity max abs error: {err:.3g}")
    assert err < ATOL


def test_hf_bare_keys_buffers_and_tied_lm_head(tmp_path, hf_model, hf_tensors):
    # openai-community/gpt2's layout: no "transformer." prefix, mask buffers, sometimes lm_head.
    tensors = {k.removeprefix("transformer."): v for k, v in hf_tensors.items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((128, 128), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    model = load_model(hf_copy(tmp_path, tensors))
    ours, expected = flat_params(model), flat_params(hf_model)
    assert ours.keys() == expected.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], expected[path], err_msg=str(path))


def test_hf_export_writes_the_names_import_reads(tmp_path, hf_model, hf_tensors):
    # save_hf is load_hf run backwards: the fixture's own tensors come back under its names
    # (bare, wte cut to the real vocabulary), and importing the export gives the same model.
    exported = checkpoint.hf_state_dict(hf_model)
    assert set(exported) == {k.removeprefix("transformer.") for k in hf_tensors if not k.endswith(".attn.bias")
                             and not k.endswith(".attn.masked_bias")}
    for key, value in hf_tensors.items():
        name = key.removeprefix("transformer.")
        if name in exported:
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
    back = load_model(checkpoint.save_hf(hf_model, tmp_path / "export"))
    assert back.config.replace(name="hf_tiny") == hf_model.config
    for path, value in flat_params(hf_model).items():
        np.testing.assert_array_equal(flat_params(back)[path], value)


def test_hf_untied_lm_head_is_refused(tmp_path, hf_tensors):
    tensors = dict(hf_tensors, **{"lm_head.weight": hf_tensors["transformer.wte.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_model(hf_copy(tmp_path, tensors))


def test_dtype_casts_params_and_config(hf_model):
    model = load_model(HF_DIR, dtype=jnp.bfloat16)
    assert (model.config.dtype, model.config.param_dtype) == ("bfloat16", "bfloat16")
    got, f32 = flat_params(model), flat_params(hf_model)
    for path, value in got.items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, f32[path].astype(jnp.bfloat16))


# --- our orbax checkpoints ----------------------------------------------------------------------


def test_orbax_round_trip_is_exact(tmp_path, hf_model):
    path = save_checkpoint(hf_model, tmp_path / "ckpt")
    assert path.is_absolute() and (path / "config.json").is_file() and (path / "params").is_dir()
    restored = restore_checkpoint(tmp_path / "ckpt")
    assert restored.config == hf_model.config
    ours, expected = flat_params(restored), flat_params(hf_model)
    assert ours.keys() == expected.keys()
    for p in ours:
        assert ours[p].dtype == expected[p].dtype
        np.testing.assert_array_equal(ours[p], expected[p], err_msg=str(p))
    with pytest.raises(FileExistsError, match="not empty"):
        save_checkpoint(hf_model, tmp_path / "ckpt")
    save_checkpoint(restored, tmp_path / "ckpt", overwrite=True)

    # Restoring with a dtype casts; explicit shardings land each array where they say.
    half = restore_checkpoint(tmp_path / "ckpt", dtype="bfloat16")
    assert half.config == hf_model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
    assert half.h[0].mlp.c_fc.kernel.get_value().dtype == jnp.bfloat16
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, nnx.state(checkpoint.abstract_model(hf_model.config)))
    sharded = restore_checkpoint(tmp_path / "ckpt", shardings=shardings)
    assert sharded.wte.embedding.get_value().sharding == replicated


def test_convert_end_to_end(tmp_path, ref, capsys):
    from pgpt_jax.cli import main

    dst = tmp_path / "converted"
    assert main(["convert", str(HF_DIR), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["n_embd"] == 16
    model = load_model(dst)  # found to be an orbax dir by its params/
    assert parity_error(model, ref) < ATOL
    with pytest.raises(FileExistsError):
        convert(HF_DIR, dst)


def test_embedded_model(tmp_path, monkeypatch, hf_model):
    name = checkpoint.EMBEDDED_NAME
    monkeypatch.setattr(checkpoint, "EMBEDDED_DIR", tmp_path / name)
    for source in (None, name):
        with pytest.raises(FileNotFoundError, match=f"embedded model '{name}' is not shipped yet"):
            load_model(source)
    save_checkpoint(hf_model, tmp_path / name)
    assert load_model(None).config == hf_model.config


# --- HF hub ids ---------------------------------------------------------------------------------


def test_hub_id_falls_back_to_the_local_cache(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, local_files_only=False):
        calls.append((repo_id, local_files_only))
        assert "model.safetensors" in allow_patterns and "config.json" in allow_patterns
        if not local_files_only:
            raise ConnectionError("no internet")
        return str(HF_DIR)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("some-org/tiny-gpt2")
    assert calls == [("some-org/tiny-gpt2", False), ("some-org/tiny-gpt2", True)]
    assert model.config.name == "some-org/tiny-gpt2"


def test_hub_id_unavailable_says_how_to_get_it(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError,
                       match=r"cannot get the HF model 'openai-community/gpt2'.*not in the local Hugging Face "
                             r"cache.*huggingface-cli download openai-community/gpt2"):
        load_model("openai-community/gpt2")


# --- bad input ----------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    d = hf_copy(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"hf/model.safetensors not found"):
        load_model(d)
    d = hf_copy(tmp_path, name="noconfig")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"noconfig/config.json not found"):
        load_model(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is neither a pgpt-jax checkpoint"):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "params").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ck/config.json not found: not a pgpt-jax checkpoint"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("content", [b"\x00garbage" * 100, None], ids=["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, content):
    d = hf_copy(tmp_path)
    data = (HF_DIR / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(content if content is not None else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"hf/model.safetensors: not a readable safetensors file \(SafetensorError"):
        load_model(d)


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"),
    ("n_inner", 100),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("add_cross_attention", True),
    ("model_type", "gpt_neox"),
    ("scale_attn_weights", False),
    ("tie_word_embeddings", False),
])
def test_unsupported_config(tmp_path, field, value):
    d = hf_copy(tmp_path, config={field: value})
    with pytest.raises(ValueError, match=f"unsupported HF GPT-2 config: {field}={value!r}"):
        load_model(d)


def test_supported_config_variants(tmp_path, hf_model):
    d = hf_copy(tmp_path, config={"activation_function": "gelu_pytorch_tanh", "n_inner": 64})
    assert load_model(d).config == hf_model.config.replace(name="hf")


def test_wrong_shape(tmp_path, hf_tensors):
    tensors = dict(hf_tensors)
    tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((16, 63), np.float32)
    with pytest.raises(ValueError, match=r"tensor 'h.1.mlp.c_fc.weight' has shape \(16, 63\), expected \(16, 64\)"):
        load_model(hf_copy(tmp_path, tensors))


def test_unknown_and_missing_tensors(tmp_path, hf_tensors):
    extra = dict(hf_tensors, **{"transformer.h.2.ln_1.weight": np.ones(16, np.float32)})
    with pytest.raises(ValueError, match=r"unknown tensors for a GPT-2 model: \['h.2.ln_1.weight'\]"):
        load_model(hf_copy(tmp_path, extra, name="extra"))
    fewer = {k: v for k, v in hf_tensors.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match=r"missing tensors: \['ln_f.bias'\]"):
        load_model(hf_copy(tmp_path, fewer, name="fewer"))


def test_bfloat16_safetensors(tmp_path, hf_model, hf_tensors):
    # numpy has no bfloat16: such files are read through safetensors' flax loader.
    from safetensors.flax import save_file as save_flax

    d = hf_copy(tmp_path)
    save_flax({k: jnp.asarray(v, jnp.bfloat16) for k, v in hf_tensors.items()}, d / "model.safetensors")
    got, f32 = flat_params(load_model(d)), flat_params(hf_model)
    for path, value in got.items():
        assert value.dtype == np.float32  # the config's param_dtype, not the file's
        np.testing.assert_array_equal(value, f32[path].astype(jnp.bfloat16).astype(np.float32))
