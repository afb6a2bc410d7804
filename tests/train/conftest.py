"""Fixtures shared by the learner-side tests: the tiny model, loaded once per module,
and a fresh copy of it per test (tests that train change its weights)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)
