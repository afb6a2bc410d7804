"""Shared fixtures: a tiny self-made model + tokenizer directory, built once per run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a ChatML+tools tokenizer, as an HF checkpoint dir."""
    from areal_lite.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


pytest_plugins = ["proxy_support"]  # the `env` fixture of the proxy tests
