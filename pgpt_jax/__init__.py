"""pgpt-jax: GPT-2-family inference in JAX/Flax NNX with an OpenAI-compatible server."""

import os


def _tune_xla_cpu() -> None:
    """XLA:CPU's YNNPACK dot fusion runs the small-batch matmuls of decoding 2-2.5x slower
    than its default path (measured: [32, 768] x [768, 3072], see docs/benchmarks.md), so it
    is turned off unless the user's XLA_FLAGS say otherwise. Read when the backend starts, so
    it only applies when pgpt_jax is imported before the first computation; GPU/TPU ignore it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_tune_xla_cpu()

from pgpt_jax.config import GPTConfig  # noqa: E402
from pgpt_jax.model import GPT, forward, init_cache, init_model  # noqa: E402


def load_model(source=None, *, dtype=None, shardings=None):
    """Load a model: our orbax checkpoint dir, an HF dir, an HF hub id, or the embedded model's name."""
    from pgpt_jax.checkpoint import load_model as _load

    return _load(source, dtype=dtype, shardings=shardings)


# Imported eagerly: a lazy wrapper named like its submodule would be replaced by the module
# object the first time `pgpt_jax.generate` (the module) is imported.
from pgpt_jax.generate import generate  # noqa: E402


__all__ = ["GPT", "GPTConfig", "forward", "generate", "init_cache", "init_model", "load_model"]
