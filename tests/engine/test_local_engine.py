"""engine/local.py: continuous batching, sampling, stops, cancellation, weight swap."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.engine.base import (
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineRejected,
)
from areal_lite.engine.local.engine import LocalEngine
from areal_lite.engine.local.kv import PaddedKV
from areal_lite.engine.stats import EngineStats, engine_metrics
from areal_lite.models import load_causal_lm, load_tokenizer
from areal_lite.types import GenerateRequest, GenerateResult, SamplingParams

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog and then",
         "What is 12 + 30?", "Please reason step by step about the weather in the city"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    """Chat prompts (sharing the template prefix) and raw ones, of different lengths."""
    chat = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True,
                                    add_generation_prompt=True)["input_ids"] for t in TEXTS]
    return [list(p) for p in chat] + [tok.encode(t) for t in TEXTS[:3]]


@pytest.fixture
async def engine(model, tok):
    async with LocalEngine(model, tokenizer=tok) as eng:
        yield eng


def req(ids, rid="r", **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(rid=rid, input_ids=list(ids), sampling=SamplingParams(**sampling))


def hf_greedy(model, ids, max_new_tokens) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


async def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.version == 0 and engine.max_context_len == 1024


async def test_greedy_matches_hf_generate_concurrently(engine, model, prompts):
    results = await asyncio.gather(*[engine.generate(req(p, rid=str(i), max_new_tokens=12))
                                     for i, p in enumerate(prompts)])
    for p, r in zip(prompts, results):
        assert r.output_ids == hf_greedy(model, p, 12)
        assert r.prompt_tokens == len(p) and r.versions == [0] * len(r.output_ids)
        assert r.finish_reason == ("stop" if r.output_ids[-1] in engine.eos_ids else "length")


async def test_greedy_parity_on_a_qwen2_shaped_model(tmp_path, tok, prompts):
    from areal_lite.testing.tiny import make_tiny_model_dir

    qwen = load_causal_lm(make_tiny_model_dir(tmp_path / "qwen", arch="qwen2"))
    async with LocalEngine(qwen, tokenizer=tok) as eng:
        results = await asyncio.gather(*[eng.generate(req(p, rid=str(i), max_new_tokens=8))
                                         for i, p in enumerate(prompts)])
    for p, r in zip(prompts, results):
        assert r.output_ids == hf_greedy(qwen, p, 8)


async def test_shared_prompt_prefix_is_prefilled_once(engine, model, tok, monkeypatch):
    """A GRPO group (same prompt n times) and a common system prompt: the shared prefix
    is computed once and copied to every row; outputs still equal HF generate."""
    system = {"role": "system", "content": "You are a helpful assistant. Please reason."}
    chats = [tok.apply_chat_template([system, {"role": "user", "content": t}], tokenize=True,
                                     add_generation_prompt=True)["input_ids"] for t in TEXTS]
    group = [list(chats[0])] * 3 + [list(c) for c in chats[1:]]
    broadcasts = []
    original = PaddedKV.broadcast_first_row

    def spy(self, num_rows):
        broadcasts.append((self.length, num_rows))
        return original(self, num_rows)

    monkeypatch.setattr(PaddedKV, "broadcast_first_row", spy)
    results = await asyncio.gather(*[engine.generate(req(p, rid=str(i), max_new_tokens=8))
                                     for i, p in enumerate(group)])
    assert broadcasts and broadcasts[0][0] >= 10 and broadcasts[0][1] == len(group)
    for p, r in zip(group, results):
        assert r.output_ids == hf_greedy(model, p, 8)


async def test_requests_finishing_at_their_first_token(engine, model, prompts):
    """Rows that end right after prefill leave the group; the others keep their KV."""
    lengths = [1, 7, 1, 5, 9, 1, 6]
    results = await asyncio.gather(*[engine.generate(req(p, rid=str(i), max_new_tokens=n))
                                     for i, (p, n) in enumerate(zip(prompts, lengths))])
    for p, n, r in zip(prompts, lengths, results):
        assert r.output_ids == hf_greedy(model, p, n)


async def test_staggered_arrivals_and_batch_cap(model, tok, prompts):
    """Requests join a running batch at different times (short and long prompts, so rows
    are merged on both sides, removed from the middle, and the buffer grows)."""
    refs = [hf_greedy(model, p, 10) for p in prompts]
    seen_running = []
    async with LocalEngine(model, tokenizer=tok, max_batch_size=3) as eng:
        async def one(i, p, after: asyncio.Event | None, started: asyncio.Event):
            if after is not None:
                await after.wait()
            out = []
            async for chunk in eng.stream(req(p, rid=str(i), max_new_tokens=10)):
                started.set()
                seen_running.append(eng.num_running)
                out.extend(chunk.output_ids)
            return out

        events = [asyncio.Event() for _ in prompts]
        tasks = [one(i, p, events[i - 2] if i >= 2 else None, events[i])
                 for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*tasks)
        assert eng.num_running == 0 and eng.num_waiting == 0
    assert outs == refs
    assert max(seen_running) <= 3


async def test_kv_budget_queues_requests(model, tok, prompts):
    p = prompts[0]
    need = len(p) + 6
    async with LocalEngine(model, tokenizer=tok, max_kv_tokens=2 * need) as eng:
        observed = []

        async def one(i):
            out = []
            async for chunk in eng.stream(req(p, rid=str(i), max_new_tokens=6, ignore_eos=True)):
                observed.append((eng.num_running, eng.num_waiting))
                out.extend(chunk.output_ids)
            return out

        outs = await asyncio.gather(*[one(i) for i in range(5)])
        with pytest.raises(EngineRejected, match="max_kv_tokens"):  # the client's: a 400
            await eng.generate(req(list(p) * 3, max_new_tokens=6))
        with pytest.raises(EngineRejected, match="input_ids is empty"):
            await eng.generate(req([], max_new_tokens=6))
    assert all(o == outs[0] for o in outs) and len(outs[0]) == 6
    assert max(r for r, _ in observed) == 2
    assert max(w for _, w in observed) > 0  # some had to queue


async def test_seeded_sampling_is_reproducible(engine, prompts):
    sampled = dict(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    a = await engine.generate(req(prompts[1], seed=7, **sampled))
    others = [engine.generate(req(p, rid=f"o{i}", seed=i, **sampled))
              for i, p in enumerate(prompts)]
    b, *_ = await asyncio.gather(engine.generate(req(prompts[1], seed=7, **sampled)), *others)
    c = await engine.generate(req(prompts[1], seed=8, **sampled))
    assert a.output_ids == b.output_ids  # same seed, alone or in a batch
    assert a.output_ids != c.output_ids


async def test_top_k_1_and_tiny_top_p_are_greedy(engine, prompts):
    greedy = await engine.generate(req(prompts[0], max_new_tokens=10, ignore_eos=True))
    top_k = await engine.generate(req(prompts[0], max_new_tokens=10, ignore_eos=True,
                                      temperature=1.5, top_k=1, seed=3))
    top_p = await engine.generate(req(prompts[0], max_new_tokens=10, ignore_eos=True,
                                      temperature=1.5, top_p=1e-6, seed=3))
    assert top_k.output_ids == greedy.output_ids == top_p.output_ids


async def test_logprobs_match_a_trainer_forward_pass(engine, model, prompts):
    results = await asyncio.gather(*[
        engine.generate(req(p, rid=str(i), temperature=1.0, top_k=20, seed=i,
                            max_new_tokens=16, ignore_eos=True))
        for i, p in enumerate(prompts)])
    worst = 0.0
    for p, r in zip(prompts, results):
        full = torch.tensor([p + r.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
        ref = logp[len(p) - 1:-1].gather(1, torch.tensor(r.output_ids)[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(r.logprobs)).abs().max().item())
    assert worst < 1e-4


async def test_stop_token_ids_and_eos(model, tok, prompts, monkeypatch):
    base = hf_greedy(model, prompts[3], 12)
    async with LocalEngine(model, tokenizer=tok) as eng:
        full = await eng.generate(req(prompts[3], max_new_tokens=12, ignore_eos=True))
        stop_tok = full.output_ids[4]
        cut = full.output_ids.index(stop_tok) + 1
        r = await eng.generate(req(prompts[3], max_new_tokens=12, stop_token_ids=(stop_tok,)))
        assert r.output_ids == full.output_ids[:cut]
        assert (r.finish_reason, r.matched_stop) == ("stop", stop_tok)
        ignored = await eng.generate(req(prompts[3], max_new_tokens=12, ignore_eos=True,
                                         stop_token_ids=(stop_tok,)))
        assert ignored.output_ids == full.output_ids  # ignore_eos: no token stops at all
    assert full.output_ids[: len(base)] == base
    # eos comes from the model's generation config
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop_tok)
    async with LocalEngine(model, tokenizer=tok) as eng:
        r = await eng.generate(req(prompts[3], max_new_tokens=12))
        no_eos = await eng.generate(req(prompts[3], max_new_tokens=12, ignore_eos=True))
    assert r.output_ids == full.output_ids[:cut] and r.matched_stop == stop_tok
    assert no_eos.output_ids == full.output_ids and no_eos.finish_reason == "length"


async def test_stop_strings(engine, tok, prompts):
    full = await engine.generate(req(prompts[1], max_new_tokens=16, ignore_eos=True))
    stop = tok.decode(full.output_ids[5:7])
    assert stop
    end = next(j for j in range(1, 17) if stop in tok.decode(full.output_ids[:j]))
    r = await engine.generate(req(prompts[1], max_new_tokens=16, ignore_eos=True,
                                  stop=("never-there", stop)))
    assert r.output_ids == full.output_ids[:end]
    assert (r.finish_reason, r.matched_stop) == ("stop", stop)


async def test_zero_max_new_tokens_and_context_overflow(engine, prompts):
    r = await engine.generate(req(prompts[0], max_new_tokens=0))
    assert r.output_ids == [] and r.finish_reason == "length"
    chunks = [c async for c in engine.stream(req(prompts[0], max_new_tokens=0))]
    assert len(chunks) == 1 and chunks[0].finish_reason == "length"
    with pytest.raises(ContextLengthExceeded, match=r"1000 .*100.*1024"):
        await engine.generate(req([5] * 1000, max_new_tokens=100))
    with pytest.raises(ValueError, match="top_p"):
        await engine.generate(req(prompts[0], top_p=0.0))


async def test_stream_chunks_concatenate_to_generate(engine, prompts):
    chunks = [c async for c in engine.stream(req(prompts[2], max_new_tokens=9))]
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason
    joined = GenerateResult.from_chunks(chunks, prompt_tokens=len(prompts[2]))
    whole = await engine.generate(req(prompts[2], max_new_tokens=9))
    assert whole.cached_tokens == len(prompts[2]) - 1  # the prompt came from the prefix cache
    whole.cached_tokens = 0
    # the cached prompt KV came from another forward pass: equal up to float rounding
    assert whole.logprobs == pytest.approx(joined.logprobs, abs=1e-5)
    whole.logprobs = joined.logprobs
    assert joined == whole


async def test_cancellation_frees_the_slot(model, tok, prompts):
    async with LocalEngine(model, tokenizer=tok, max_batch_size=1) as eng:
        first_token = asyncio.Event()

        async def long_request():
            async for _ in eng.stream(req(prompts[0], max_new_tokens=900, ignore_eos=True)):
                first_token.set()

        task = asyncio.create_task(long_request())
        await first_token.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(60):  # would hang if the cancelled row kept the slot
            r = await eng.generate(req(prompts[1], max_new_tokens=5, ignore_eos=True))
        assert len(r.output_ids) == 5 and eng.num_running == 0
        # leaving a stream early (aclose) frees the slot too
        gen = eng.stream(req(prompts[2], max_new_tokens=900, ignore_eos=True))
        await anext(gen)
        await gen.aclose()
        async with asyncio.timeout(60):
            r = await eng.generate(req(prompts[1], max_new_tokens=5, ignore_eos=True))
        assert len(r.output_ids) == 5
        # cancelling a generate() task while its request is in the batch
        loop, admitted = asyncio.get_running_loop(), asyncio.Event()
        step = eng._batch.step

        def spy(admit, version):
            if admit:
                loop.call_soon_threadsafe(admitted.set)
            return step(admit, version)

        eng._batch.step = spy
        task = asyncio.create_task(eng.generate(req(prompts[0], max_new_tokens=900,
                                                    ignore_eos=True)))
        await admitted.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(60):
            r = await eng.generate(req(prompts[1], max_new_tokens=5, ignore_eos=True))
        assert len(r.output_ids) == 5 and eng.num_running == 0


async def test_pause_update_weights_resume(model, tok, tiny_model_dir, tmp_path, prompts):
    from areal_lite.testing.tiny import make_tiny_model_dir

    old = copy.deepcopy(model)
    new = load_causal_lm(make_tiny_model_dir(tmp_path / "other", seed=1))
    engine_model = copy.deepcopy(model)
    ptrs = {n: p.data_ptr() for n, p in engine_model.named_parameters()}
    p = prompts[0]
    async with LocalEngine(engine_model, tokenizer=tok) as eng:
        gen = eng.stream(req(p, max_new_tokens=14, ignore_eos=True))
        chunks = [await anext(gen) for _ in range(3)]
        await eng.pause()
        await eng.update_weights(new.state_dict(), version=1)
        assert eng.version == 1
        await eng.resume()
        chunks += [c async for c in gen]
    out = GenerateResult.from_chunks(chunks, len(p))
    j = out.versions.index(1)  # first token sampled by the new weights
    assert 3 <= j < 14 and out.versions == [0] * j + [1] * (14 - j)
    for name, param in engine_model.named_parameters():
        assert param.data_ptr() == ptrs[name]  # copied in place
        assert torch.equal(param, new.state_dict()[name])
    # tokens after the swap are the new model's greedy choices on the old model's KV
    from transformers import DynamicCache

    from areal_lite.engine.local.batch import cache_kwarg

    cache = {cache_kwarg(old): DynamicCache()}
    with torch.no_grad():
        old(torch.tensor([p + out.output_ids[: j - 1]]), **cache)
        logits = new(torch.tensor([out.output_ids[j - 1:]]), **cache).logits
    assert logits[0, :-1].argmax(-1).tolist() == out.output_ids[j:]


async def test_update_weights_rejects_bad_names_and_shapes(model, tok):
    engine_model = copy.deepcopy(model)
    name, param = next(iter(engine_model.state_dict().items()))
    before = param.clone()
    async with LocalEngine(engine_model, tokenizer=tok) as eng:
        with pytest.raises(ValueError, match="model.no_such.weight"):
            await eng.update_weights({name: before + 1, "model.no_such.weight": before}, 1)
        with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
            await eng.update_weights([(name, torch.zeros(3, 3))], 1)
        assert eng.version == 0
        assert torch.equal(engine_model.state_dict()[name], before)  # nothing copied
        await eng.update_weights({}, version=5)  # shared storage: only the version moves
        assert eng.version == 5


@pytest.mark.slow
async def test_smollm2_replies_greedily():
    from areal_lite.models import ModelNotFoundError

    try:
        eng = await asyncio.to_thread(LocalEngine.from_pretrained, "smollm2-135m-instruct")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    ids = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=True, add_generation_prompt=True)["input_ids"]
    async with eng:
        r = await eng.generate(req(ids, max_new_tokens=24))
    text = eng.tokenizer.decode(r.output_ids, skip_special_tokens=True).strip()
    assert text and r.finish_reason in ("stop", "length")
    assert "Paris" in text


async def test_prefill_budget_splits_admission(model, tok, prompts, monkeypatch):
    from areal_lite.engine.local.batch import RunningBatch

    groups = []
    original = RunningBatch._start_prefill

    def spy(self, seqs):
        groups.append((len(seqs), max(len(s.req.input_ids) for s in seqs)))
        return original(self, seqs)

    monkeypatch.setattr(RunningBatch, "_start_prefill", spy)
    width = max(len(p) for p in prompts)
    async with LocalEngine(model, tokenizer=tok, max_prefill_tokens=2 * width) as eng:
        results = await asyncio.gather(*[eng.generate(req(p, rid=str(i), max_new_tokens=6))
                                         for i, p in enumerate(prompts)])
    assert len(groups) > 1 and sum(n for n, _ in groups) == len(prompts)
    assert all(n * w <= 2 * width for n, w in groups)
    for p, r in zip(prompts, results):
        assert r.output_ids == hf_greedy(model, p, 6)


async def test_failed_step_fails_its_requests_and_engine_recovers(engine, prompts,
                                                                  monkeypatch):
    from areal_lite.engine.local.batch import RunningBatch

    original = RunningBatch._forward_parts
    calls = []

    def flaky(self, batches):
        calls.append(len(batches))
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return original(self, batches)

    monkeypatch.setattr(RunningBatch, "_forward_parts", flaky)
    with pytest.raises(EngineError, match="simulated out of memory"):
        await engine.generate(req(prompts[0], max_new_tokens=4))
    r = await engine.generate(req(prompts[0], max_new_tokens=4, ignore_eos=True))
    assert len(r.output_ids) == 4 and engine.num_running == 0


async def test_close_fails_requests_in_flight(model, tok, prompts):
    from areal_lite.engine.base import EngineUnavailable

    eng = LocalEngine(model, tokenizer=tok)
    gen = eng.stream(req(prompts[0], max_new_tokens=900, ignore_eos=True))
    await anext(gen)
    await eng.close()
    with pytest.raises(EngineUnavailable):
        async for _ in gen:
            pass
    with pytest.raises(EngineUnavailable):
        await eng.generate(req(prompts[0], max_new_tokens=2))
    with pytest.raises(EngineUnavailable):
        await eng.update_weights({}, 1)


async def test_engine_refuses_to_move_a_model_it_does_not_own(model):
    with pytest.raises(ValueError, match="device='cpu'"):
        LocalEngine(model, device="cuda")


# -- PaddedKV: rows keep exactly their own tokens through merges, removals, reallocs ------

_OPS = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.lists(st.integers(1, 9), min_size=1, max_size=4),
              st.integers(0, 5)),
    st.tuples(st.just("decode"), st.integers(0, 40)),
    st.tuples(st.just("remove"), st.lists(st.integers(0, 15), max_size=4)),
), max_size=25)


def _write(kv: PaddedKV, rows: list[list[float]]) -> None:
    """One forward pass: row r appends markers rows[r] (left-padded with NaN)."""
    lens = [len(r) for r in rows]
    q = max(lens)
    kv.prepare(lens)
    keys = torch.tensor([[float("nan")] * (q - len(r)) + r for r in rows])[:, None, :, None]
    kv.layers[0].update(keys, keys.clone())
    kv.advance(lens)


@settings(max_examples=60, deadline=None)
@given(_OPS)
def test_padded_kv_rows_keep_their_tokens(ops):
    kv = PaddedKV(1, rows_cap=0, cols_cap=0)
    expected: list[list[float]] = []  # per row: markers in order
    next_id = 0
    for op in ops:
        if op[0] == "admit":
            _, lens, shared = op
            shared = min(shared, min(lens) - 1) if len(lens) > 1 else 0
            prefix = [-(i + 1.0) for i in range(shared)]
            ids = range(next_id, next_id + len(lens))
            next_id += len(lens)
            suffixes = [[1000.0 * i + j for j in range(n - shared)] for i, n in zip(ids, lens)]
            new = PaddedKV(1, rows_cap=len(lens), cols_cap=max(lens))
            if shared:
                new.start_rows(1)
                _write(new, [prefix])
                new.broadcast_first_row(len(lens))
            else:
                new.start_rows(len(lens))
            _write(new, suffixes)
            new.zero_padding()
            kv.merge(new, rows_hint=8, cols_hint=64)
            expected += [prefix + s for s in suffixes]
        elif op[0] == "decode" and expected:
            kv.reserve_decode(cols_hint=op[1])
            marks = [1000.0 * 1000 + len(e) for e in expected]
            _write(kv, [[m] for m in marks])
            for e, m in zip(expected, marks):
                e.append(m)
        elif op[0] == "remove" and expected:
            drop = {i % len(expected) for i in op[1]}
            order = kv.remove(drop)
            assert sorted(order) == [i for i in range(len(expected)) if i not in drop]
            expected = [expected[o] for o in order]
        assert kv.rows == len(expected) and kv.num_tokens == [len(e) for e in expected]
        used = kv.layers[0].buf_k[: kv.rows, 0, : kv.length, 0] if kv.rows else None
        for r, e in enumerate(expected):
            row_valid = kv.valid[r, : kv.length]
            assert used[r][row_valid].tolist() == e
            assert not used[r].isnan().any()  # padding never holds NaN
            assert bool(row_valid[-1])  # every row ends at the common right edge


async def test_run_on_step_thread_pauses_the_engine_around_the_call(model, tok, prompts):
    """The function runs on the engine's own step thread while no step runs; requests in
    flight wait and then finish with the same tokens; errors reach the caller."""
    import threading

    async with LocalEngine(model, tokenizer=tok) as eng:
        ref = await eng.generate(req(prompts[0], max_new_tokens=12, ignore_eos=True))
        step_threads = set()
        original = eng._batch.step

        def step(admit, version):
            step_threads.add(threading.current_thread().name)
            return original(admit, version)

        eng._batch.step = step
        running = asyncio.ensure_future(eng.generate(req(prompts[0], max_new_tokens=12,
                                                         ignore_eos=True)))
        while eng.num_running == 0:
            await asyncio.sleep(0.001)
        seen = {}

        def work(x):
            seen["thread"] = threading.current_thread().name
            seen["tokens"] = len(eng._batch.seqs[0].output_ids)
            time.sleep(0.05)
            seen["tokens_after"] = len(eng._batch.seqs[0].output_ids)
            return x * 2

        assert await eng.run_on_step_thread(work, 21) == 42
        assert seen["thread"] in step_threads and seen["tokens"] == seen["tokens_after"]
        assert (await running).output_ids == ref.output_ids and len(ref.output_ids) == 12

        def boom():
            raise ValueError("bad work")

        with pytest.raises(ValueError, match="bad work"):
            await eng.run_on_step_thread(boom)
        r = await eng.generate(req(prompts[1], max_new_tokens=5))
        assert r.output_ids == hf_greedy(model, prompts[1], 5)


async def test_stats_count_steps_tokens_and_reused_prefill(engine):
    """EngineStats: every sampled token, every decode row, prompt tokens split into the
    ones prefilled and the ones reused (a shared group prefix, a prefix-cache hit)."""
    prompt = list(range(3, 23))  # 20 tokens
    group = [req(prompt + [30 + i], rid=f"g{i}", max_new_tokens=5, ignore_eos=True)
             for i in range(3)]  # a GRPO-like group: 20 shared tokens
    assert engine.stats == EngineStats()
    results = await asyncio.gather(*[engine.generate(r) for r in group])
    first = engine.stats
    assert first.generated_tokens == sum(len(r.output_ids) for r in results) == 15
    assert first.prompt_tokens == 3 * 21
    assert first.prefill_tokens == 20 + 3  # the shared prefix once, then a token per row
    assert first.decode_tokens == 3 * 4 and first.steps == 5  # admitted in one step
    assert first.busy_s > 0
    await engine.generate(req(prompt + [99], rid="later", max_new_tokens=2, ignore_eos=True))
    second = engine.stats  # the prefix cache held the 20 shared tokens: 1 prefilled
    assert second.prompt_tokens - first.prompt_tokens == 21
    assert second.prefill_tokens - first.prefill_tokens == 1
    metrics = engine_metrics(first, second, wall_s=1.0)
    assert metrics["engine/steps"] == 2 and metrics["engine/gen_tokens_per_s"] == 2
    assert metrics["engine/mean_decode_rows"] == 0.5  # step 1 only prefills; step 2 decodes
    assert metrics["engine/prefill_reuse_frac"] == pytest.approx(20 / 21)
    assert 0 < metrics["engine/busy_frac"] <= 1


async def test_hundreds_of_requests_churning_through_a_small_batch(model, tok, prompts):
    """300 coroutines share a 16-row batch: requests queue, join and leave between steps,
    every third is cancelled after a random number of its tokens (streamed). Every
    request that finishes equals its greedy run alone; nothing is left behind."""
    rng = random.Random(0)
    async with LocalEngine(model, tokenizer=tok, max_batch_size=16) as eng:
        alone = [(await eng.generate(req(p, rid=f"alone{i}", max_new_tokens=8))).output_ids
                 for i, p in enumerate(prompts)]
        start = eng.stats
        widest, done, cancelled = 0, [], 0

        async def client(k: int) -> None:
            nonlocal widest, cancelled
            i = k % len(prompts)
            r = req(prompts[i], rid=f"c{k}", max_new_tokens=8)
            if k % 3:
                done.append((i, (await eng.generate(r)).output_ids))
                widest = max(widest, eng.num_running)
                return
            keep = rng.randrange(1, 8)  # leave after this many tokens (if not done by then)
            got: list[int] = []
            async with contextlib.aclosing(eng.stream(r)) as chunks:
                async for chunk in chunks:
                    got += chunk.output_ids
                    if chunk.finish_reason is not None:
                        done.append((i, got))
                        return
                    if len(got) >= keep:
                        cancelled += 1
                        return

        async with asyncio.timeout(240):
            await asyncio.gather(*[client(k) for k in range(300)])
        assert len(done) + cancelled == 300 and cancelled > 50
        assert all(out == alone[i] for i, out in done)
        assert 1 < widest <= 16
        for _ in range(100):  # the cancelled rows go at the next step
            if eng.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.num_running == 0 and eng.num_waiting == 0 and eng._batch.kv.rows == 0
        stats = eng.stats
        assert stats.generated_tokens - start.generated_tokens >= sum(len(o) for _, o in done)
        assert stats.prompt_tokens - start.prompt_tokens >= sum(len(prompts[i]) for i, _ in done)
