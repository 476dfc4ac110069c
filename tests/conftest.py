"""Shared fixtures: a tiny random model built once per session (one compile per shape), one
XLA compilation cache for the whole run, LLVM at O1 for the run's compiles, and a bound on
the compiled programs each pytest process keeps."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run, shared by the xdist workers (they
# inherit this environment from the process that imports this file first) and every test's
# subprocess: a program compiled once is loaded, not compiled again, by the next module,
# worker or process that needs it. Compile counts stay strict: Engine.compile_count counts
# an executable loaded from the cache as a compilation too, so "0 compiles after warm-up"
# still fails on any program a call had to look up. A directory the caller set is kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="pgpt-jax-tests-xla-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# The suite spends most of its time compiling, not running (XLA compiled for 83% of
# test_engine.py's time in one process): its programs compile with LLVM at O1, which cut
# that file's compile time by a fifth. Serving keeps XLA's default (O2); O0 made the larger
# models' tests run slower than it saved (docs/benchmarks.md, "The test suite's compiles").
# Test subprocesses inherit it; workers that force CPU devices add to XLA_FLAGS.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# Each XLA:CPU executable maps its code and data into the process: about 7 memory mappings a
# compiled program. The suite compiles thousands, and Linux refuses a process more than
# vm.max_map_count mappings (65,530 by default); past that, LLVM's next mmap fails inside a
# compile and the process segfaults (what ended CI at 97% of the suite on 2026-12-03). After a
# test module whose programs leave the process above this many mappings, jax.clear_caches()
# drops every cached executable; the next modules compile again what they use.
MAX_MAPPINGS = 30_000


def _mappings() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to keep under
        return 0


@pytest.fixture(scope="module", autouse=True)
def bounded_compiled_programs():
    yield  # set up before, so torn down after, the module's own fixtures (its engines)
    if _mappings() > MAX_MAPPINGS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_model():
    from pgpt_jax.model import init_model

    return init_model("tiny", seed=0)
