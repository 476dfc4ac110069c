"""Checkpoints: import HF GPT-2 safetensors, save and restore our own orbax checkpoints.

`load_model(source)` understands four kinds of source:
  - our orbax dir: `config.json` (GPTConfig fields) + `params/` (written by `save_checkpoint`);
  - an HF GPT-2 dir: `config.json` + `model.safetensors` (any of the four sizes);
    (`save_hf` / `hf_state_dict` write the same names back, for comparisons with HF and llama.cpp)
  - an HF hub id such as "openai-community/gpt2", fetched (or found in the local cache)
    with huggingface_hub;
  - an embedded model's name (`EMBEDDED_MODELS`), or None for the default one
    (`EMBEDDED_NAME`): `assets/<name>/`, an orbax dir shipped inside the package.

Weights are always placed onto `nnx.eval_shape(...)` of the model, so no parameter is first
initialised randomly (for gpt2-xl that would be 1.5B wasted normal draws), and the target's
shardings decide where each array lands: a sharded load needs a `shardings` tree, no new code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpt_jax.config import EOS_ID, GPTConfig
from pgpt_jax.model import GPT

ASSETS = Path(__file__).resolve().parent / "assets"
# The models shipped inside the package (docs/model_card.md): the code model, the default,
# and the older documentation model, kept because it is small and fast (context 256): the
# test suite's engine tests run on it.
EMBEDDED_MODELS = {"pgpt-code": ASSETS / "pgpt-code", "pgpt-tiny": ASSETS / "pgpt-tiny"}
EMBEDDED_NAME = "pgpt-code"  # what `load_model()` and `pgpt-jax serve` load without a model
EMBEDDED_DIR = EMBEDDED_MODELS[EMBEDDED_NAME]
MAX_CHUNK_BYTES = 4 << 20
TARGET_FILE_BYTES = 8 << 20
HF_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json"]
# Causal-mask buffers that older transformers versions saved with the weights.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Our leaf names -> HF's: LayerNorm scale, Linear (Conv1D) kernel and Embed table are all "weight".
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _with_dtype(cfg: GPTConfig, dtype) -> GPTConfig:
    if dtype is None:
        return cfg
    name = jnp.dtype(dtype).name  # "bf16" / jnp.bfloat16 / "bfloat16" -> "bfloat16"
    return cfg.replace(dtype=name, param_dtype=name)


def abstract_model(cfg: GPTConfig) -> GPT:
    """The model with ShapeDtypeStructs for arrays: shapes only, nothing allocated."""
    return nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: GPTConfig):
    """(graphdef, abstract state), cached: tracing the initialisers costs ~1 s for gpt2 (jax
    builds debug text for every output), and nothing here is mutated (merge builds new modules)."""
    return nnx.split(abstract_model(cfg))


def _target_state(abstract_state, shardings=None):
    """ShapeDtypeStructs that also say where each array goes (one device unless `shardings`).

    `shardings` may also be a `jax.sharding.Mesh`: the rules of pgpt_jax.sharding place each param.
    """
    if isinstance(shardings, jax.sharding.Mesh):
        from pgpt_jax import sharding

        shardings = sharding.param_shardings(abstract_state, shardings)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), abstract_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_state, shardings)


def _hf_key(path: tuple) -> str:
    """('h', 0, 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.weight'."""
    return ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_HF[path[-1]]


def _count_params(model: GPT) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


# ---------------------------------------------------------------------------------------------
# HF GPT-2 import


def config_from_hf(hf: dict, name: str = "gpt2") -> GPTConfig:
    """Map an HF GPT-2 config.json onto GPTConfig; a variant our model does not compute is a ValueError."""

    def unsupported(field: str, why: str):
        raise ValueError(f"unsupported HF GPT-2 config: {field}={hf.get(field)!r} ({why})")

    if hf.get("model_type", "gpt2") != "gpt2":
        unsupported("model_type", "only GPT-2 (model_type 'gpt2') checkpoints can be imported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported("activation_function", "the MLP uses the tanh GELU: gelu_new or gelu_pytorch_tanh")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported("n_inner", f"the MLP width is fixed at 4*n_embd={4 * n_embd}")
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(field, False):
            unsupported(field, "only false is supported")
    if not hf.get("scale_attn_weights", True):
        unsupported("scale_attn_weights", "attention scores are always scaled by 1/sqrt(head_dim)")
    if not hf.get("tie_word_embeddings", True):
        unsupported("tie_word_embeddings", "the output layer is the transposed wte")
    # Defaults are GPT2Config's, for config.json files written without them.
    return GPTConfig(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                     n_positions=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), name=name)


def _safetensors_files(d: Path) -> list[Path]:
    """model.safetensors, or the shards an index names (save_pretrained shards large models)."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        return [d / f for f in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{single} not found: an HF GPT-2 checkpoint dir needs config.json and model.safetensors "
        "(a repo with only pytorch_model.bin must be re-saved with safetensors first)")


@contextlib.contextmanager
def _open_safetensors(files: list[Path]) -> Iterator[dict[str, tuple[Any, Path, str]]]:
    """{key without "transformer.": (handle, file, key in file)}; an unreadable file raises with its path."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        tensors = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (named by the checkpoint's safetensors index)")
            try:
                handle = stack.enter_context(safe_open(str(f), framework="np"))
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError, OSError: the message is enough, not the trace
                raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            for key in keys:
                # openai-community/gpt2 has bare keys; GPT2LMHeadModel.save_pretrained adds "transformer."
                tensors[key.removeprefix("transformer.")] = (handle, f, key)
        yield tensors


def _read(handle, f: Path, key: str) -> np.ndarray:
    try:
        if handle.get_slice(key).get_dtype() == "BF16":
            # numpy has no bfloat16; jax's array converts to an ml_dtypes bfloat16 ndarray.
            from safetensors import safe_open

            with safe_open(str(f), framework="flax") as fx:
                return np.asarray(fx.get_tensor(key))
        return handle.get_tensor(key)
    except Exception as e:
        raise ValueError(f"{f}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def load_hf(directory, *, dtype=None, name: str | None = None, shardings=None, progress: bool = False) -> GPT:
    """An HF GPT-2 dir (config.json + model.safetensors) -> GPT; wte zero-padded to padded_vocab."""
    d = Path(directory).expanduser()
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: an HF GPT-2 checkpoint dir needs config.json "
                                "and model.safetensors")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = _with_dtype(config_from_hf(hf, name=name or d.resolve().name), dtype)
    files = _safetensors_files(d)

    graphdef, abstract_state = _abstract_split(cfg)
    flat = nnx.to_flat_state(_target_state(abstract_state, shardings))
    expected = {}  # HF key -> (our path, HF shape)
    for path, var in flat:
        shape = (cfg.vocab_size, cfg.n_embd) if path == ("wte", "embedding") else var.shape
        expected[_hf_key(path)] = (path, tuple(shape))

    with _open_safetensors(files) as tensors:
        where = files[0] if len(files) == 1 else d
        present = {k for k in tensors if not k.endswith(HF_BUFFERS)}
        unknown = sorted(present - set(expected) - {"lm_head.weight"})
        missing = sorted(set(expected) - present)
        if unknown:
            raise ValueError(f"{where}: unknown tensors for a GPT-2 model: {unknown[:8]}"
                             + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
        if missing:
            raise ValueError(f"{where}: missing tensors: {missing[:8]}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        # Check every shape from the headers before reading any data: a mismatch fails in ms.
        for key, (path, shape) in expected.items():
            handle, f, raw = tensors[key]
            got = tuple(handle.get_slice(raw).get_shape())
            if got != shape:
                raise ValueError(f"{f}: tensor {key!r} has shape {got}, expected {shape} for {_describe(cfg)}")

        from tqdm.auto import tqdm

        # Each tensor goes to its device as soon as it is read, so host memory peaks at about
        # one model, not two (gpt2-xl in float32 is 6.2 GB).
        variables, placed = dict(flat), {}
        for key, (path, _) in tqdm(expected.items(), desc=f"loading {d.name}", unit="tensor",
                                   disable=not progress):
            arr = _read(*tensors[key])
            if key == "wte.weight":
                wte = arr
                if "lm_head.weight" in tensors:
                    lm_head = _read(*tensors["lm_head.weight"])
                    if lm_head.shape != arr.shape or not np.array_equal(lm_head, arr):
                        raise ValueError(f"{tensors['lm_head.weight'][1]}: lm_head.weight differs from "
                                         "wte.weight; only a tied output layer is supported")
                arr = np.zeros((cfg.padded_vocab, cfg.n_embd), arr.dtype)
                arr[: cfg.vocab_size] = wte  # padded rows are zero; their logits are masked anyway
            target = variables[path].get_value()  # ShapeDtypeStruct: dtype and sharding to load into
            placed[path] = jax.device_put(arr.astype(target.dtype, copy=False), target.sharding)

    leaves = [(path, var.replace(placed[path])) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """GPT -> HF GPT-2 tensors (bare names, as openai-community/gpt2 stores them), through the
    same name mapping `load_hf` reads with; wte is cut back to the real vocabulary."""
    cfg = model.config
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        arr = np.asarray(jax.device_get(var.get_value()))
        if path == ("wte", "embedding"):
            arr = arr[: cfg.vocab_size]
        out[_hf_key(path)] = arr
    return out


def hf_config(cfg: GPTConfig) -> dict:
    """The config.json transformers writes for a GPT2LMHeadModel of `cfg`'s shape (plus `n_ctx`,
    which llama.cpp's GPT-2 converter reads and transformers 5 no longer writes)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions, "vocab_size": cfg.vocab_size,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
            "tie_word_embeddings": True}


def save_hf(model: GPT, directory) -> Path:
    """Write `model` as an HF GPT-2 dir (config.json + model.safetensors) that `load_hf` and
    transformers' `from_pretrained` both read. bfloat16 params are written as float32: numpy's
    safetensors writer has no bfloat16."""
    from safetensors.numpy import save_file

    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v if v.dtype.itemsize >= 4 else v.astype(np.float32))
               for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    return d


def _describe(cfg: GPTConfig) -> str:
    return (f"n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd}, "
            f"n_positions={cfg.n_positions}, vocab_size={cfg.vocab_size}")


def download_hub(repo_id: str) -> Path:
    """An HF hub id -> a local snapshot dir with config.json + model.safetensors.

    Online it downloads (or revalidates) the files; offline it falls back to the local cache.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_FILES + ["model-*.safetensors"]))
    except Exception as online:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HF_FILES + ["model-*.safetensors"],
                                          local_files_only=True))
        except Exception:
            why = (str(online).splitlines() or [""])[0]
            raise FileNotFoundError(
                f"cannot get the HF model {repo_id!r}: it is not a local directory, the Hugging Face Hub "
                f"did not provide it ({type(online).__name__}: {why}), and it is not in the local "
                "Hugging Face cache. On a machine with internet run `huggingface-cli download "
                f"{repo_id} config.json model.safetensors --local-dir DIR` (or `pgpt-jax convert "
                f"{repo_id} DIR`), copy DIR here and pass its path instead") from None


# ---------------------------------------------------------------------------------------------
# Our orbax checkpoints


def save_checkpoint(model: GPT, path, *, overwrite: bool = False) -> Path:
    """Write `path/params` (orbax StandardCheckpointer) and then `path/config.json`."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()  # orbax refuses relative paths
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
        (path / "config.json").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    # A plain nested dict ({"h": {0: {"attn": {"c_attn": {"kernel": ...}}}}}) keeps the files
    # independent of how NNX flattens its Variable objects.
    params = nnx.to_pure_dict(nnx.state(model))
    # Arrays in chunks of <= 4 MB, data files of ~8 MB: a checkpoint can go in git (no file
    # over 16 MB) and a big embedding is not one file.
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=MAX_CHUNK_BYTES), params)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "params", args=ocp.args.PyTreeSave(
            params, save_args=save_args, ocdbt_target_data_file_size=TARGET_FILE_BYTES), force=overwrite)
    # config.json last: a dir that has it holds a complete checkpoint.
    (path / "config.json").write_text(model.config.to_json() + "\n")
    return path


def restore_checkpoint(path, dtype=None, shardings=None) -> GPT:
    """Our orbax dir -> GPT, restored onto an abstract target (cast to `dtype` if given).

    `shardings`: a tree like `nnx.state(model)` of `jax.sharding.Sharding`, one per param;
    default: everything on the first device.
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    cfg_file, params = path / "config.json", path / "params"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a pgpt-jax checkpoint (config.json + params/)")
    if not params.is_dir():
        raise FileNotFoundError(f"{params} not found: not a pgpt-jax checkpoint (config.json + params/)")
    try:
        cfg = GPTConfig.from_dict(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_file}: not a GPTConfig ({e})") from None
    cfg = _with_dtype(cfg, dtype)
    graphdef, abstract_state = _abstract_split(cfg)
    state = _target_state(abstract_state, shardings)  # a fresh tree: the cached one stays abstract
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params, nnx.to_pure_dict(state))
    except Exception as e:
        raise ValueError(f"{params}: cannot restore the params for {_describe(cfg)} "
                         f"({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Entry points


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a wrong path.
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _load(source, dtype, shardings, progress: bool) -> GPT:
    if source is None or source in EMBEDDED_MODELS:
        name = source or EMBEDDED_NAME
        where = EMBEDDED_DIR if name == EMBEDDED_NAME else EMBEDDED_MODELS[name]
        if not (where / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded model {name!r} is not shipped yet (expected at {where}); "
                "pass a model instead: an HF hub id such as 'openai-community/gpt2', an HF GPT-2 dir, "
                "or a dir made by `pgpt-jax convert`")
        return restore_checkpoint(where, dtype, shardings)
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "params").is_dir():
            return restore_checkpoint(path, dtype, shardings)
        if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists() \
                or (path / "config.json").is_file():
            return load_hf(path, dtype=dtype, shardings=shardings, progress=progress)
        raise FileNotFoundError(f"{path} is neither a pgpt-jax checkpoint (config.json + params/) nor an "
                                "HF GPT-2 checkpoint (config.json + model.safetensors)")
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint's directory")
    if _looks_like_path(source):
        raise FileNotFoundError(f"{path} does not exist")
    return load_hf(download_hub(source), dtype=dtype, name=source, shardings=shardings, progress=progress)


def load_model(source=None, *, dtype=None, shardings=None) -> GPT:
    """Our orbax dir, an HF GPT-2 dir, an HF hub id, or an embedded model (its name; None: the default) -> GPT.

    `dtype` casts the params and sets the config's dtype and param_dtype.
    """
    return _load(source, dtype, shardings, progress=False)


def convert(src, dst, dtype=None, *, overwrite: bool = False) -> Path:
    """HF GPT-2 (dir or hub id) -> our orbax checkpoint at `dst`; what `pgpt-jax convert` runs."""
    t0 = time.perf_counter()
    model = _load(src, dtype, None, progress=True)
    t1 = time.perf_counter()
    dst = save_checkpoint(model, dst, overwrite=overwrite)
    print(f"wrote {dst}: {_count_params(model) / 1e6:.1f}M params ({model.config.param_dtype}); "
          f"read {t1 - t0:.1f} s, saved {time.perf_counter() - t1:.1f} s")
    return dst
