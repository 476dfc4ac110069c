"""Where arrays live: one `(data, model)` mesh and one table of rules for params, KV cache and rows;
how a process joins the others (`init_distributed`) and builds the mesh from `--mesh`; and
what a compiled program moves between devices (`collectives`, read from its HLO).

Every array is described by logical axis names; `LOGICAL_RULES` maps them onto mesh axes:
slots go over `data`; attention heads, the MLP hidden and the padded vocabulary over
`model`; the embedding width is replicated. JAX's SPMD partitioner does the rest: we
declare shardings and write no collectives, with one exception: sampling keeps the
vocabulary split by hand, under shard_map (sampling.py), where the partitioner would
gather the [rows, V] logits. On one device every spec is trivially satisfied, so the same
engine code runs on one CPU, a GPU host or a TPU pod slice.

Layouts are chosen so that each layer's only traffic is the two all-reduces of its output
projections (tests/test_sharding.py reads them off the compiled decode program): c_attn is
split by head (see PARAM_AXES), and the KV cache is written row by row (`model._write`).
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
    ("qkv", None),
)

# Parameter path (joined with "/") -> logical axes of that array. The first match of the
# array's rank wins. c_attn comes in two shapes (`model.split_qkv`): the programs' [D, 3, N, H]
# splits N, so a shard holds q, k and v of its own heads and attention moves nothing
# between shards; HF's [D, 3D] (the model as loaded) can only split 3D, whose shards mix
# q, k and v of different heads, and costs two collective-permutes per layer to sort out.
PARAM_AXES = (
    (r"wte/embedding", ("vocab", "embed")),
    (r"wpe/embedding", ("positions", "embed")),
    (r"attn/c_attn/kernel", ("embed", "qkv", "heads", "head_dim")),
    (r"attn/c_attn/kernel", ("embed", "heads")),
    (r"attn/c_attn/bias", ("qkv", "heads", "head_dim")),
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


def param_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in PARAM_AXES:
        if len(axes) == ndim and re.search(pattern, path):
            return axes
    raise KeyError(f"no sharding rule for a rank-{ndim} parameter {path!r}")


def param_shardings(state, mesh: Mesh):
    """A tree like `state` (an nnx.State of params, abstract or real) of NamedShardings."""
    def one(path, leaf):
        axes = param_axes(_path_str(path), len(leaf.shape))
        return NamedSharding(mesh, spec(axes))

    return jax.tree_util.tree_map_with_path(one, state)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(CACHE_AXES))


def pool_sharding(mesh: Mesh) -> NamedSharding:
    """The prefix cache's pool [P, N, Q, H], and a prefill's cache [B, N, T, H] (what fills it
    and what `insert` reads): heads over `model`, rows on every data shard, since any slot may
    read any block or prompt."""
    return NamedSharding(mesh, spec((None, "heads", "seq", "head_dim")))


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


# --------------------------------------------------------------------------- what moves

_COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter|"
                         r"collective-broadcast)(-done)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(condition|body|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_TABLE_ROW = re.compile(r"^(\d+) (?:\"(.*)\"|\{(.*)\})$")


def _source_frames(hlo_text: str) -> dict:
    """stack_frame_id -> the pgpt_jax functions that called the op, outermost first (from the
    FileNames / FunctionNames / FileLocations / StackFrames tables of the HLO text)."""
    tables, table = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
        elif table is not None and (row := _TABLE_ROW.match(line)):
            fields = row.group(2) if row.group(2) is not None else dict(
                kv.split("=") for kv in row.group(3).split())
            table[int(row.group(1))] = fields
        elif table is not None and not line.strip():
            table = None
    files, names = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})

    def chain(frame_id: int) -> list:
        out = []
        while frame_id in frames and len(out) < 64:
            loc = locations.get(int(frames[frame_id]["file_location_id"]), {})
            if "/pgpt_jax/" in files.get(int(loc.get("file_name_id", 0)), ""):
                out.append(names.get(int(loc["function_name_id"]), "?"))
            frame_id = int(frames[frame_id]["parent_frame_id"]) - 1  # 1-based; 0: none
        return out[::-1]

    return {i: chain(i) for i in frames}


def collectives(hlo_text: str) -> list[dict]:
    """The collectives of a compiled program, from `jitted.lower(...).compile().as_text()`.

    One dict per op: `op` (all-reduce, all-gather, collective-permute, ...), `shapes` (its
    result arrays, e.g. [[8, 128]]), `bytes` (their size: what each device receives),
    `loops` (how many while loops hold it: in a decode program 1 is once per step, a
    scan's body, and 2 once per row of a per-row lax.map inside it), `conditional` (only
    reached through a lax.cond branch: it runs when that branch is taken) and `where` (the
    pgpt_jax functions that made it, outermost first). Async pairs count once, at `-done`.
    """
    frames = _source_frames(hlo_text)
    bodies, name, entry = {}, None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()[1] if line.startswith("ENTRY ") else line.split()[0]
            name = head.lstrip("%")
            bodies[name] = []
            entry = name if line.startswith("ENTRY ") else entry
        elif name is not None and line.startswith("  "):
            bodies[name].append(line)
    # How each computation is reached, the least conditional and least nested way: (cond, loops).
    reach, todo = {entry: (False, 0)}, [entry]
    while todo:
        comp = todo.pop()
        cond, loops = reach[comp]
        for line in bodies.get(comp, ()):
            callees = [(c, cond or k.endswith("_computation"), loops + (k in ("body", "condition")))
                       for k, c in _CALLEE.findall(line)]
            callees += [(c.strip().lstrip("%"), True, loops) for group in _BRANCHES.findall(line)
                        for c in group.split(",")]
            for callee, *how in callees:
                if callee not in reach or tuple(how) < reach[callee]:
                    reach[callee] = tuple(how)
                    todo.append(callee)
    found = []
    for comp, (cond, loops) in reach.items():
        for line in bodies.get(comp, ()):
            hit = _COLLECTIVE.search(line)
            if not hit or "-start(" in line:
                continue
            arrays = _ARRAY.findall(hit.group(1))
            shapes = [[int(d) for d in dims.split(",") if d] for _, dims in arrays]
            size = sum(int(np.prod(sh, dtype=np.int64)) * _BYTES.get(t, int(t[1:]) // 8 if t[1:].isdigit() else 4)
                       for sh, (t, _) in zip(shapes, arrays))
            frame = re.search(r"stack_frame_id=(\d+)", line)
            found.append({"op": hit.group(2), "shapes": shapes, "bytes": size, "loops": loops,
                          "conditional": cond, "where": frames.get(int(frame.group(1)) if frame else -1, [])})
    return found
