"""Shared fixtures: a tiny random model built once per session (one compile per shape)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    from pgpt_jax.model import init_model

    return init_model("tiny", seed=0)
