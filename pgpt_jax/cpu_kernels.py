"""Native kernels for XLA:CPU, built from C++ source on this machine at first use.

XLA:CPU runs decode attention as multiply and reduce fusions over dynamic slices of the
cache, at a quarter of the memory speed or less (docs/benchmarks.md, issue 20). The one
kernel here, `decode_attention` (pgpt_jax/kernels/decode_attention.cc), is a `jax.ffi`
custom call: it reads each row's cache entries up to that row's position where they lie,
splitting (row, head) pairs over XLA's intra-op threads.

The source is compiled with the system's C++ compiler (`$CXX`, else g++, c++ or clang++)
for this CPU (`-march=native`) against the XLA FFI headers jaxlib ships, into
`$XDG_CACHE_HOME/pgpt-jax/kernels/` (a few seconds, once per source, compiler, jaxlib and CPU),
then loaded and registered. Without a compiler, or with `PGPT_CPU_KERNELS=0`, `available()`
is False and attention keeps its XLA paths (attention.py); the reason is logged once.
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

SOURCE = pathlib.Path(__file__).parent / "kernels" / "decode_attention.cc"
DECODE_ATTENTION = "pgpt_decode_attention"  # the FFI target's name
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
                log.warning("native CPU kernels unavailable (%s); attention uses its XLA paths", _why_not)
        return _loaded


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
    """The shared library for this source, compiler, jaxlib and CPU: from the cache, else built."""
    if os.environ.get("PGPT_CPU_KERNELS", "1") == "0":
        raise RuntimeError("PGPT_CPU_KERNELS=0")
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, jax.__version__,
                                    cpu_fingerprint()]).encode()).hexdigest()[:16]
    out = pathlib.Path(user_cache_dir("kernels")) / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, out)  # another process building the same key at once writes the same bytes
    return out


def _register(path: pathlib.Path) -> None:
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.PgptDecodeAttention), platform="cpu")
