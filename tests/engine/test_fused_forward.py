"""engine/fused.py: decode and prefill of several KV batches in one pass, equal to the
Hugging Face forward; the engine uses it for Llama-family models only."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_local_engine import hf_greedy, req

from areal_lite.engine.local.batch import RunningBatch
from areal_lite.engine.local.engine import LocalEngine
from areal_lite.engine.local.fused import FusedForward, _decode_attention
from areal_lite.engine.local.kv import PaddedKV
from areal_lite.models import load_causal_lm, load_tokenizer
from areal_lite.testing.tiny import make_tiny_model_dir

PROMPTS_A = [[5, 9, 13, 21, 34, 2], [7, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
PROMPTS_B = [[11, 3], [60, 61, 62, 63, 64, 65, 66]]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_model(request, tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch=request.param)
    return load_causal_lm(path), load_tokenizer(path)


def two_steps(model, *, fused: bool):
    """Prefill batch A; then one pass that decodes A and prefills batch B."""
    layers = model.config.num_hidden_layers
    rb = RunningBatch(model, device=torch.device("cpu"), num_layers=layers,
                      eos_ids=frozenset(), max_batch_size=8, fused=fused)
    assert (rb.fused is not None) == fused
    a = PaddedKV(layers, rows_cap=3, cols_cap=16)
    a.start_rows(3)
    b = PaddedKV(layers, rows_cap=2, cols_cap=8)
    b.start_rows(2)
    with torch.inference_mode():
        logits = rb._forward_parts([(a, PROMPTS_A)])
        a.zero_padding()
        logits += rb._forward_parts([(a, [[3], [4], [5]]), (b, PROMPTS_B)])
    return logits, a, b


def test_fused_pass_equals_the_hf_forward(family_model):
    model, _ = family_model
    fused, *caches = two_steps(model, fused=True)
    ref, *ref_caches = two_steps(model, fused=False)
    assert [t.shape for t in fused] == [t.shape for t in ref] == [(3, model.config.vocab_size),
                                                                    (3, model.config.vocab_size),
                                                                    (2, model.config.vocab_size)]
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for kv, ref_kv in zip(caches, ref_caches):  # the K/V of every real token
        assert kv.length == ref_kv.length and torch.equal(kv.valid, ref_kv.valid)
        keep = kv.valid[: kv.rows, None, : kv.length, None]
        for layer, ref_layer in zip(kv.layers, ref_kv.layers):
            for buf, ref_buf in ((layer.buf_k, ref_layer.buf_k), (layer.buf_v, ref_layer.buf_v)):
                got = buf[: kv.rows, :, : kv.length].masked_fill(~keep, 0)
                want = ref_buf[: kv.rows, :, : kv.length].masked_fill(~keep, 0)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(t).all() for t in fused)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    """The grouped decode attention is SDPA's function: GQA, MHA and MQA, padded rows
    (a row whose only valid column is its own new token included)."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    rows, length, d = 5, 23, 16
    q = torch.randn(rows, heads, 1, d, generator=g)
    keys = torch.randn(rows, kv_heads, length, d, generator=g)
    values = torch.randn(rows, kv_heads, length, d, generator=g)
    valid = torch.rand(rows, length, generator=g) > 0.4
    valid[:, -1] = True
    valid[0, :-1] = False  # only its own column
    mask = valid[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads)
    got = _decode_attention(q, keys, values, mask, 0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_pass_in_bf16_keeps_the_hf_rounding(tmp_path):
    """bf16 norms run through the model's own modules: the same bits as the HF forward."""
    model = load_causal_lm(make_tiny_model_dir(tmp_path, arch="qwen3"), dtype="bfloat16")
    fused, *_ = two_steps(model, fused=True)
    ref, *_ = two_steps(model, fused=False)
    assert fused[0].dtype == torch.bfloat16
    for got, want in zip(fused, ref):
        assert torch.equal(got, want)


async def test_joining_prompts_ride_along_with_the_decode_step(family_model, monkeypatch):
    """Requests that arrive while others decode are prefilled in the same pass; tokens
    equal HF generate; the HF forward is never called."""
    model, tok = family_model
    prompts = PROMPTS_A + PROMPTS_B
    refs = [hf_greedy(model, p, 12) for p in prompts]
    passes = []
    original = FusedForward.__call__

    def spy(self, parts):
        passes.append([tuple(p.ids.shape) for p in parts])
        return original(self, parts)

    def no_hf(*args, **kwargs):
        raise AssertionError("the HF forward ran")

    monkeypatch.setattr(FusedForward, "__call__", spy)
    monkeypatch.setattr(model, "forward", no_hf)
    async with LocalEngine(model, tokenizer=tok) as eng:
        first = [asyncio.ensure_future(eng.generate(req(p, str(i), max_new_tokens=12,
                                                        ignore_eos=True)))
                 for i, p in enumerate(prompts[:2])]
        while eng.num_running < 2:
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(eng.generate(req(p, str(i), max_new_tokens=12,
                                                        ignore_eos=True)))
                 for i, p in enumerate(prompts[2:], start=2)]
        outs = [r.output_ids for r in await asyncio.gather(*first, *later)]
    assert outs == refs
    joined = [shapes for shapes in passes if len(shapes) == 2]
    assert joined and all(shapes[0][1] == 1 for shapes in joined)  # decode rows: 1 token


async def test_other_families_use_their_own_forward(tmp_path):
    path = make_tiny_model_dir(tmp_path, arch="gpt2")
    model, tok = load_causal_lm(path), load_tokenizer(path)
    assert FusedForward.for_model(model) is None
    prompts = PROMPTS_A + PROMPTS_B
    refs = [hf_greedy(model, p, 8) for p in prompts]
    async with LocalEngine(model, tokenizer=tok) as eng:
        assert eng._batch.fused is None
        results = await asyncio.gather(*[eng.generate(req(p, str(i), max_new_tokens=8,
                                                          ignore_eos=True))
                                         for i, p in enumerate(prompts)])
    assert [r.output_ids for r in results] == refs
