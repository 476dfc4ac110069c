"""Native kernels for XLA:CPU, built from C++ source on this machine at first use.

Two `jax.ffi` custom calls, each split over XLA's intra-op threads (docs/benchmarks.md):

  pgpt_decode_attention  (kernels/decode_attention.cc) XLA:CPU runs decode attention as
          multiply and reduce fusions over dynamic slices of the cache, at a quarter of the
          memory speed or less; this reads each row's cache entries up to that row's
          position where they lie (attention.py).
  pgpt_dense  (kernels/dense.cc) XLA:CPU's dots repack the weights on every call, and at
          the few rows of a decode step stream them at half the speed a one-row product
          gets; this multiplies by weights packed once, at load, in column panels (dense.py).

The sources are compiled with the system's C++ compiler (`$CXX`, else g++, c++ or clang++)
for this CPU (`-march=native`) against the XLA FFI headers jaxlib ships, into
`$XDG_CACHE_HOME/pgpt-jax/kernels/` (a few seconds, once per source, compiler, jaxlib and CPU),
then loaded and registered. Without a compiler, or with `PGPT_CPU_KERNELS=0`, `available()`
is False and attention and dense layers keep their XLA paths; the reason is logged once.
`PGPT_CPU_KERNELS=attention` (or `dense`) turns on only the one named (`enabled`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import threading
from typing import Optional

import jax

log = logging.getLogger(__name__)

KERNELS = pathlib.Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "decode_attention.cc", KERNELS / "dense.cc")
HEADERS = (KERNELS / "parallel.h",)
DECODE_ATTENTION = "pgpt_decode_attention"  # the FFI targets' names
DENSE = "pgpt_dense"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None until the first call of available()
_why_not = ""


def user_cache_dir(*parts: str) -> str:
    """$XDG_CACHE_HOME (or ~/.cache)/pgpt-jax/<parts>."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pgpt-jax", *parts)


def cpu_fingerprint() -> str:
    """A short id of this machine's CPU (model name and instruction-set flags): compiled CPU
    code is only valid on CPUs with the features it was compiled for."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def available() -> bool:
    """Whether the kernels are built, loaded and registered (built on the first call)."""
    global _loaded, _why_not
    with _lock:
        if _loaded is None:
            try:
                _register(_build())
                _loaded = True
            except Exception as exc:  # no compiler, a failed build, a refused library
                _loaded, _why_not = False, f"{type(exc).__name__}: {exc}"
                log.warning("native CPU kernels unavailable (%s); attention and dense layers use XLA's paths",
                            _why_not)
        return _loaded


def enabled(kernel: str) -> bool:
    """Whether the kernel named ("attention" or "dense") is to be used: the kernels available
    and `PGPT_CPU_KERNELS` unset, "1", or a comma-separated list that names it."""
    wanted = os.environ.get("PGPT_CPU_KERNELS", "1")
    return (wanted == "1" or kernel in wanted.split(",")) and available()


def why_not() -> str:
    """Why `available()` is False ("" when it is True or has not been asked)."""
    return _why_not


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = name and shutil.which(name)
        if path:
            return path
    raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")


def _build() -> pathlib.Path:
    """The shared library for these sources, compiler, jaxlib and CPU: from the cache, else built."""
    if os.environ.get("PGPT_CPU_KERNELS", "1") == "0":
        raise RuntimeError("PGPT_CPU_KERNELS=0")
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([*(f.read_text() for f in SOURCES + HEADERS), " ".join(FLAGS), version, jax.__version__,
                                    cpu_fingerprint()]).encode()).hexdigest()[:16]
    out = pathlib.Path(user_cache_dir("kernels")) / f"pgpt-kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # another process building the same key at once writes the same bytes
    return out


def _register(path: pathlib.Path) -> None:
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.PgptDecodeAttention), platform="cpu")
    jax.ffi.register_ffi_target(DENSE, jax.ffi.pycapsule(lib.PgptDense), platform="cpu")
