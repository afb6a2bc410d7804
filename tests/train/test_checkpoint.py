"""Tests for checkpoint.py: HF-loadable weights, resumable state, the `latest` pointer,
keep-N pruning, crash safety and RNG restore."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from areal_lite.train.checkpoint import (
    load_latest_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def optimizer_state(model):
    """A real AdamW state (moments as tensors) after one step on a copy of the model."""
    import copy

    clone = copy.deepcopy(model)
    opt = torch.optim.AdamW(clone.parameters(), lr=1e-3, betas=(0.9, 0.95))
    clone(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "step": 1}


def test_save_then_load_weights_and_state(tmp_path, model, tiny_tokenizer, optimizer_state):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"data_position": 17, "weight_version": 3, "names": ["a", "b"]}
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=tiny_tokenizer,
                           learner_state=optimizer_state, extra_state=extra)
    assert path == tmp_path / "checkpoints" / "step_3"
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    saved = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert AutoTokenizer.from_pretrained(path).encode("Hello there!") == \
        tiny_tokenizer.encode("Hello there!")

    got_path, state = load_latest_checkpoint(tmp_path)
    assert got_path == path and state["step"] == 3 and state["extra"] == extra
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt.load_state_dict(state["learner"]["optimizer"])  # round-trips into a real optimizer
    want = optimizer_state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], want)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None


def test_latest_pointer_and_keep_n_pruning(tmp_path, model):
    for step in (1, 2, 3, 5):
        save_checkpoint(tmp_path, step, model=model, learner_state={"step": step}, keep=2)
        path, state = load_latest_checkpoint(tmp_path)
        assert path.name == f"step_{step}" and state["learner"] == {"step": step}
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_3", "step_5"]


def test_resaving_a_step_replaces_it(tmp_path, model):
    save_checkpoint(tmp_path, 4, model=model, learner_state={}, extra_state={"v": 1})
    save_checkpoint(tmp_path, 4, model=model, learner_state={}, extra_state={"v": 2})
    _, state = load_latest_checkpoint(tmp_path)
    assert state["extra"] == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_4"]


class _CrashingTokenizer:
    """Writes part of its files, then fails: a save interrupted half-way."""

    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{\"trunc")
        raise RuntimeError("disk full")


def test_crash_mid_save_keeps_previous_latest(tmp_path, model):
    save_checkpoint(tmp_path, 1, model=model, learner_state={"step": 1}, keep=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, tokenizer=_CrashingTokenizer(),
                        learner_state={"step": 2}, keep=1)
    path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_1" and state["learner"] == {"step": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_1"]


def test_stale_temp_dir_is_ignored_and_cleaned(tmp_path, model):
    save_checkpoint(tmp_path, 1, model=model, learner_state={})
    stale = tmp_path / "checkpoints" / ".tmp-step_2-killed"  # a save killed with SIGKILL
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"partial")
    assert load_latest_checkpoint(tmp_path)[0].name == "step_1"
    save_checkpoint(tmp_path, 2, model=model, learner_state={})
    assert not stale.exists()


def test_missing_pointer_falls_back_to_newest_complete_dir(tmp_path, model):
    save_checkpoint(tmp_path, 1, model=model, learner_state={}, keep=3)
    save_checkpoint(tmp_path, 2, model=model, learner_state={}, keep=3)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert load_latest_checkpoint(tmp_path)[0].name == "step_2"


def test_rng_restore_reproduces_sequences(tmp_path, model):
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    save_checkpoint(tmp_path, 1, model=model, learner_state={})
    first = (torch.rand(6), random.random(), np.random.rand(3))
    _, state = load_latest_checkpoint(tmp_path)
    torch.manual_seed(999)  # the restarted process starts elsewhere
    random.seed(999)
    np.random.seed(999)
    restore_rng(state)
    again = (torch.rand(6), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    assert np.array_equal(first[2], again[2])
    snapshot = rng_state()
    x = torch.rand(3)
    restore_rng(snapshot)
    assert torch.equal(torch.rand(3), x)


def test_bad_arguments_fail_fast(tmp_path, model):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, model=model, learner_state={}, keep=0)
