"""weight_update = "distributed": the trainer's rank 0 broadcasts over gloo (CPU) into fake
SGLang servers that really join the group and receive every tensor."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
import torch

from areal_lite.config import SGLangConfig
from areal_lite.config_toml import loads_config
from areal_lite.engine.base import EngineError
from areal_lite.engine.sglang.client import SGLangEngine
from areal_lite.engine.sglang.weight_group import WeightGroup, resolve_backend
from areal_lite.models import load_causal_lm
from areal_lite.testing.fake_sglang.server import FakeSGLangServer
from areal_lite.train.weight_sync import swap_weights
from areal_lite.trainer import Trainer

GROUP = "weight_update_group"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@contextlib.asynccontextmanager
async def fakes(n: int, **opts):
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeSGLangServer(**opts)) for _ in range(n)]


def engine(http, servers, tp_size: int = 1) -> SGLangEngine:
    return SGLangEngine([s.url for s in servers], session=http, max_context_len=4096,
                        tp_size=tp_size, retry_backoff_s=0.0)


def group_cfg(**kw) -> SGLangConfig:
    kw.setdefault("weight_group_timeout_s", 30.0)
    return SGLangConfig(weight_update="distributed", weight_group_backend="gloo", **kw)


def assert_received(server: FakeSGLangServer, model: torch.nn.Module) -> None:
    sent = model.state_dict()
    got = server.state.received_tensors
    assert list(got) == list(sent)  # every tensor, in state-dict order
    for name, t in sent.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2)
    return model


async def test_two_tp2_servers_receive_every_tensor_bit_for_bit(http, tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    async with fakes(2, tp_size=2) as servers:
        eng = engine(http, servers, tp_size=2)
        async with WeightGroup(eng, group_cfg()) as group:
            inits = [s.state.groups[GROUP] for s in servers]
            for version in (1, 2):
                perturbed(model, seed=version)
                paused_s = await swap_weights(eng, model, version, mode="distributed",
                                              group=group)
                assert paused_s >= 0 and eng.version == version
                for s in servers:
                    assert_received(s, model)
                    assert s.state.weight_version == str(version)
            model = model.to(torch.bfloat16)  # dtypes travel as announced
            await swap_weights(eng, model, 3, mode="distributed", group=group)
            for s in servers:
                assert_received(s, model)
        assert not group.is_open
    assert [(b["rank_offset"], b["world_size"], b["backend"]) for b in inits] == [
        (1, 5, "gloo"), (3, 5, "gloo")]
    assert inits[0]["master_port"] == inits[1]["master_port"] == group.port != 0
    for s in servers:
        assert s.state.calls["/pause_generation"] == s.state.calls["/continue_generation"] == 3
        assert s.state.groups == {} and s.state.group_members == {}  # destroyed on close
        assert s.state.num_weight_updates == 3


async def test_server_refusing_init_fails_fast_naming_it(http, tiny_model):
    async with fakes(2) as servers:
        servers[1].state.tp_size = 2  # the engine says 1: its ranks do not fit the world
        eng = engine(http, servers)
        group = WeightGroup(eng, group_cfg(weight_group_timeout_s=120.0))
        async with asyncio.timeout(30):  # far below the group's own timeout: no waiting it out
            with pytest.raises(EngineError, match="init_weights_update_group") as err:
                await group.open()
        assert servers[1].url in str(err.value) and "world_size 3" in str(err.value)
        assert servers[0].url not in str(err.value) and not group.is_open
        servers[1].state.tp_size = 1  # fixed: a new attempt forms the group
        async with asyncio.timeout(30):
            await group.open()
            await swap_weights(eng, tiny_model, 1, mode="distributed", group=group)
            await group.close()
    for s in servers:
        assert_received(s, tiny_model)
        assert s.state.weight_version == "1" and s.state.groups == {}


async def test_swap_without_an_open_group_is_a_clear_error(http, tiny_model):
    async with fakes(1) as servers:
        eng = engine(http, servers)
        with pytest.raises(ValueError, match="open weight-update group.*pass group="):
            await swap_weights(eng, tiny_model, 1, mode="distributed")
        assert servers[0].state.calls["/pause_generation"] == 0  # refused before pausing
        with pytest.raises(RuntimeError, match="is not open"):
            await swap_weights(eng, tiny_model, 1, mode="distributed",
                               group=WeightGroup(eng, group_cfg()))
        assert not servers[0].state.paused and eng.version == 0  # resumed, unchanged


async def test_broadcast_nobody_receives_times_out(http, tiny_model):
    async with fakes(1) as servers:
        st = servers[0].state
        eng = engine(http, servers)
        group = WeightGroup(eng, group_cfg(weight_group_timeout_s=3.0))
        await group.open()
        member = st.group_members.pop(GROUP)  # the server lost its ranks but not the name
        try:
            with pytest.raises(EngineError, match=r"broadcasting weights .* tensor 1/"):
                await group.update(tiny_model, 1)
            with pytest.raises(RuntimeError, match="earlier update"):
                await group.update(tiny_model, 2)
        finally:
            member.close()
        await group.close()
        assert st.groups == {}


async def test_server_failing_the_update_is_named(http, tiny_model):
    async with fakes(2) as servers:
        eng = engine(http, servers)
        group = WeightGroup(eng, group_cfg())
        await group.open()
        servers[1].fail_next(path="/update_weights_from_distributed", status=500)
        with pytest.raises(EngineError, match="update_weights_from_distributed") as err:
            await swap_weights(eng, tiny_model, 1, mode="distributed", group=group)
        assert servers[1].url in str(err.value) and eng.version == 0
        assert not servers[0].state.paused  # resumed after the failure
        with pytest.raises(RuntimeError, match="earlier update"):
            await group.update(tiny_model, 2)
        await group.close()


def test_backend_choice():
    assert resolve_backend("gloo") == "gloo"
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_backend("nccl")


async def test_trainer_one_step_broadcasts_to_fake_server(tiny_model_dir, tiny_tokenizer,
                                                         tmp_path):
    from safetensors.torch import load_file

    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=2048,
                                eos_token_id=tiny_tokenizer.eos_token_id) as fake:
        cfg = loads_config("", [
            f"actor.path={tiny_model_dir}", f"run_dir={tmp_path}",
            "workflow=sample_agents.LengthRewardAgent", "rollout.backend=sglang",
            f'rollout.sglang.urls=["{fake.url}"]', "rollout.sglang.weight_update=distributed",
            "rollout.sglang.weight_group_backend=gloo", "rollout.sglang.weight_group_timeout_s=60",
            "rollout.batch_size=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=6",
            "rollout.episode_timeout_s=60", "data.train=arithmetic:8", "trainer.total_steps=1",
            "trainer.eval_every=0", "train.lr=1e-3", "metrics.progress=false",
            "metrics.plots=false"])
        trainer = Trainer(cfg)
        await trainer.atrain()
        st = fake.state
    assert trainer.version == 1 and st.weight_version == "1"
    [row] = [json.loads(line) for line in
             (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["engine/gen_tokens_per_s"] > 0 and 0 <= row["engine/prefill_reuse_frac"] <= 1
    assert "engine/busy_frac" not in row  # the servers' steps are not seen by the client
    assert st.calls["/init_weights_update_group"] == 1
    assert st.calls["/update_weights_from_distributed"] == 1
    assert st.calls["/destroy_weights_update_group"] == 1 and st.groups == {}
    saved = {}
    for shard in sorted((trainer.run_dir / "checkpoints" / "step_1").glob("*.safetensors")):
        saved.update(load_file(str(shard)))
    initial = load_causal_lm(tiny_model_dir).state_dict()
    assert list(st.received_tensors) == list(initial)
    assert saved.keys() <= st.received_tensors.keys()
    for name, t in saved.items():  # the weights after the step, bit for bit
        assert torch.equal(st.received_tensors[name], t), name
