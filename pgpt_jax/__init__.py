"""pgpt-jax: GPT-2-family inference in JAX/Flax NNX with an OpenAI-compatible server.

Importing the package changes nothing outside it (no environment variable, no device):
XLA settings are passed per program (`pgpt_jax.programs`), and devices start on first use.
"""

from pgpt_jax.config import GPTConfig
from pgpt_jax.model import GPT, forward, init_cache, init_model


def load_model(source=None, *, dtype=None, shardings=None):
    """Load a model: our orbax checkpoint dir, an HF dir, an HF hub id, or the embedded model's name."""
    from pgpt_jax.checkpoint import load_model as _load

    return _load(source, dtype=dtype, shardings=shardings)


# Imported eagerly: a lazy wrapper named like its submodule would be replaced by the module
# object the first time `pgpt_jax.generate` (the module) is imported.
from pgpt_jax.generate import generate  # noqa: E402


__all__ = ["GPT", "GPTConfig", "forward", "generate", "init_cache", "init_model", "load_model"]
