"""pgpt-jax: GPT-2-family inference in JAX/Flax NNX with an OpenAI-compatible server."""

from pgpt_jax.config import GPTConfig
from pgpt_jax.model import GPT, forward, init_cache, init_model


def load_model(source=None, *, dtype=None, shardings=None):
    """Load a model: our orbax checkpoint dir, an HF dir, an HF hub id, or the embedded model's name."""
    from pgpt_jax.checkpoint import load_model as _load

    return _load(source, dtype=dtype, shardings=shardings)


def generate(model, prompt, **kwargs):
    """OpenAI-style completions for research scripts; see pgpt_jax.generate.generate."""
    from pgpt_jax.generate import generate as _generate

    return _generate(model, prompt, **kwargs)


__all__ = ["GPT", "GPTConfig", "forward", "generate", "init_cache", "init_model", "load_model"]
