"""Where arrays live: one `(data, model)` mesh and one table of rules for params, KV cache and rows;
and how a process joins the others (`init_distributed`) and builds the mesh from `--mesh`.

Every array is described by logical axis names; `LOGICAL_RULES` maps them onto mesh axes:
slots go over `data`; attention heads, the MLP hidden and the padded vocabulary over
`model`; the embedding width is replicated. JAX's SPMD partitioner does the rest: we
declare shardings, we do not write collectives. On one device every spec is trivially
satisfied, so the same engine code runs on one CPU, a GPU host or a TPU pod slice.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_RULES = (
    ("slots", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("positions", None),
    ("seq", None),
    ("head_dim", None),
)

# Parameter path (joined with "/") -> logical axes of that array. The first match wins.
# c_attn's output is [q | k | v], each heads x head_dim: splitting it over `model` keeps
# whole heads on a shard when the model axis divides the head count.
PARAM_AXES = (
    (r"wte/embedding", ("vocab", "embed")),
    (r"wpe/embedding", ("positions", "embed")),
    (r"attn/c_attn/kernel", ("embed", "heads")),
    (r"attn/c_attn/bias", ("heads",)),
    (r"attn/c_proj/kernel", ("heads", "embed")),
    (r"mlp/c_fc/kernel", ("embed", "mlp")),
    (r"mlp/c_fc/bias", ("mlp",)),
    (r"mlp/c_proj/kernel", ("mlp", "embed")),
    (r"(bias|scale)$", ("embed",)),  # LayerNorms and the output-projection biases
)

CACHE_AXES = ("slots", "heads", "seq", "head_dim")  # k and v: [S, N, L, H]
ROW_AXES = {1: ("slots",), 2: ("slots", "vocab")}  # per-slot arrays by rank; keys are [S, 2]


def spec(axes: Sequence[Optional[str]]) -> P:
    """Logical axes -> PartitionSpec through LOGICAL_RULES."""
    rules = dict(LOGICAL_RULES)
    return P(*(rules.get(a) if a is not None else None for a in axes))


def make_mesh(data: Optional[int] = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over all devices (every process's, in multi-host runs).

    `data` defaults to all devices left after `model`. Raises ValueError when data * model
    differs from the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    data = data if data is not None else len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} = {data * model} differs from the "
                         f"{len(devices)} devices available")
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def parse_mesh(text: str) -> dict:
    """'data=4,model=2' -> {'data': 4, 'model': 2} (the --mesh CLI flag)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in ("data", "model") or not value.isdigit():
            raise ValueError(f"--mesh expects data=D,model=M; got {text!r}")
        out[name] = int(value)
    return out


def mesh_from_flag(text: Optional[str]) -> Optional[Mesh]:
    """The --mesh flag ('data=4,model=2') -> a Mesh over every process's devices; None without
    it. A mesh the devices cannot form raises ValueError with the reason."""
    if not text:
        return None
    return make_mesh(**parse_mesh(text))


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Joins a multi-process run before anything touches a device. With a coordinator
    (HOST:PORT of process 0) the process count and id are given; with `auto` (TPU pods)
    jax.distributed finds them. Returns False (and does nothing) when neither is asked for."""
    if not (coordinator or num_processes or auto):
        return False
    # CPU processes talk over gloo; GPU and TPU use their own collectives and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


def check_mesh(mesh: Mesh, cfg, slots: int) -> None:
    """Clear errors for meshes the model cannot use."""
    m, d = mesh.shape["model"], mesh.shape["data"]
    if cfg.n_head % m:
        raise ValueError(f"the model axis ({m}) must divide the head count ({cfg.n_head})")
    if (4 * cfg.n_embd) % m or cfg.padded_vocab % m:
        raise ValueError(f"the model axis ({m}) must divide the MLP width and the padded vocabulary")
    if slots % d:
        raise ValueError(f"the data axis ({d}) must divide the number of slots ({slots})")


def _path_str(path) -> str:
    """A pytree path -> 'h/0/attn/c_attn/kernel' (nnx Variables add a trailing '.value')."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(n for n in names if n not in ("value", "raw_value"))


def param_axes(path: str) -> tuple:
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            return axes
    raise KeyError(f"no sharding rule for parameter {path!r}")


def param_shardings(state, mesh: Mesh):
    """A tree like `state` (an nnx.State of params, abstract or real) of NamedShardings."""
    def one(path, leaf):
        axes = param_axes(_path_str(path))
        assert len(axes) == len(leaf.shape), (path, axes, leaf.shape)
        return NamedSharding(mesh, spec(axes))

    return jax.tree_util.tree_map_with_path(one, state)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(CACHE_AXES))


def state_shardings(state, mesh: Mesh):
    """Shardings for the engine's DecodeState: the cache and every per-slot row by slot."""
    def one(path, leaf):
        if "cache" in _path_str(path):
            return cache_sharding(mesh)
        if leaf.ndim == 2 and leaf.shape[1] <= 4:  # PRNG key data [S, 2]
            return NamedSharding(mesh, spec(("slots", None)))
        return NamedSharding(mesh, spec(ROW_AXES[leaf.ndim]))

    return jax.tree_util.tree_map_with_path(one, state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
