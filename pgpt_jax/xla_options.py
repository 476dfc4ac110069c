"""XLA compiler settings of the device programs: the XLA:CPU option sets a program may be
compiled with and which one is chosen (per decode row count), the persistent compilation
cache and where measured choices are remembered beside it, and the count of compilations.

`programs.py` and `pool_programs.py` declare their programs with `program(...)`: a jax.jit
per option set, the set picked per call. Nothing here knows what the programs compute.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Optional

import jax
from flax import nnx

from pgpt_jax.cpu_kernels import cpu_fingerprint, user_cache_dir

# --------------------------------------------------------------------------- compiler settings


# XLA:CPU option sets a program may be compiled with. Which is fastest depends on the CPU: the
# YNNPACK dot fusion (XLA's default) ran decode's small-batch matmuls 2-2.5x slower on AMD
# Zen 3, and 32-row matmuls 1.2-1.6x faster on Zen 4 (docs/benchmarks.md). Passed to jit per
# program, never through XLA_FLAGS: importing pgpt_jax changes no environment variable.
CPU_OPTION_SETS = {
    "xla-default": {},
    "no-ynn-fusion": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
FALLBACK_OPTION_SET = "no-ynn-fusion"  # before a measurement chose (what Zen 3 measured)

_choice = {"default": FALLBACK_OPTION_SET, "decode": {}}  # decode: rows -> set name


def user_sets_options() -> bool:
    """A user's XLA_FLAGS that name an option of the sets win: every program compiles with none."""
    flags = os.environ.get("XLA_FLAGS", "")
    return any(k in flags for opts in CPU_OPTION_SETS.values() for k in opts)


def compiler_options(name: Optional[str] = None) -> Optional[dict]:
    """The jit compiler_options of option set `name` (default: the chosen default set)."""
    if user_sets_options() or jax.default_backend() != "cpu":
        return None  # other backends' compilers have their own defaults
    return dict(CPU_OPTION_SETS[name or _choice["default"]]) or None


def choose_options(default: str, decode_by_rows: Optional[dict] = None) -> None:
    """Sets the option set programs compile with from now on: `decode_by_rows` per decode row
    count, `default` for every other program (and decode rows not listed)."""
    for name in [default, *(decode_by_rows or {}).values()]:
        if name not in CPU_OPTION_SETS:
            raise ValueError(f"unknown XLA:CPU option set {name!r}; known: {', '.join(CPU_OPTION_SETS)}")
    _choice["default"], _choice["decode"] = default, dict(decode_by_rows or {})


def chosen_options() -> dict:
    return {"default": _choice["default"], "decode": dict(_choice["decode"])}


def default_compile_cache_dir() -> str:
    """$XDG_CACHE_HOME (or ~/.cache)/pgpt-jax/xla/<cpu fingerprint>."""
    return user_cache_dir("xla", cpu_fingerprint())


def use_compile_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`, for every program however quick to
    compile: a second start loads what the first compiled instead of compiling it again.
    Call before the first compilation (the CLI does, for serve, bench and generate)."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def no_compile_cache() -> None:
    """No persistent compilation cache, even where JAX_COMPILATION_CACHE_DIR names one."""
    jax.config.update("jax_enable_compilation_cache", False)


class Program:
    """A module-level program: one jax.jit of `fn` per XLA:CPU option set, the set chosen per
    call (`choose_options`; decode's by its `rows`). `.lower` and calls go to that jit;
    `.with_options(name)` is the jit of one set (for measuring them)."""

    def __init__(self, fn, jit_kwargs: dict):
        functools.update_wrapper(self, fn)
        self.fn, self.jit_kwargs, self._jits = fn, jit_kwargs, {}

    def with_options(self, name: Optional[str]):
        if name not in self._jits:
            self._jits[name] = jax.jit(self.fn, compiler_options=compiler_options(name), **self.jit_kwargs)
        return self._jits[name]

    def _pick(self, kwargs: dict):
        name = _choice["decode"].get(kwargs.get("rows")) if self.__name__ in ("decode", "forward") else None
        return self.with_options(name or _choice["default"])

    def __call__(self, *args, **kwargs):
        return self._pick(kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick(kwargs).lower(*args, **kwargs)


def program(**jit_kwargs):
    """A `Program` decorator: jax.jit with the chosen compiler options."""
    return lambda fn: Program(fn, jit_kwargs)


class StaticGraph:
    """The model's nnx GraphDef as the programs' static jit argument, hashed once.

    jit hashes its static arguments on every call, and hashing a GraphDef walks the whole
    graph: 0.65 ms for GPT-2 124M on a Zen 5, half of a decode call's host time, paid once a
    token when decode runs one step a call. Equal when the GraphDefs are (the same object
    first), so every engine of one model shares the compiled programs as before."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (other.graphdef is self.graphdef or other.graphdef == self.graphdef)


def merge(graphdef, params):
    """nnx.merge of a program's (graphdef or StaticGraph, params)."""
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef, params)


# --------------------------------------------------------------------------- compile counting

_compiles = 0
_compiles_lock = threading.Lock()


def _on_event(name: str, *_args, **_kwargs) -> None:
    global _compiles
    if name == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles_so_far() -> int:
    """XLA compilations in this process since pgpt_jax.programs was imported."""
    return _compiles



def option_choices_path() -> Optional[str]:
    """Where measured choices are remembered: beside the persistent compile cache (which is
    per CPU), or nowhere when there is none."""
    directory = jax.config.jax_compilation_cache_dir
    return os.path.join(directory, "xla_options.json") if directory else None


def remembered_choice(key: str) -> Optional[dict]:
    path = option_choices_path()
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            choice = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    if not choice or any(n not in CPU_OPTION_SETS for n in [choice["default"], *choice["decode"].values()]):
        return None
    return {"default": choice["default"], "decode": {int(r): n for r, n in choice["decode"].items()}}


def remember_choice(key: str, choice: dict) -> None:
    path = option_choices_path()
    if path is None:
        return
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    known[key] = choice
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(known, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
