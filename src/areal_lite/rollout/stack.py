"""Wiring: build the rollout side (engine, renderer, proxy, controller) from config.

`async with open_rollout(cfg, workflow) as stack:` owns every resource of the rollout
side and releases them in reverse order: the aiohttp pool (SGLang), the engine, the
proxy's TCP server, the in-process HTTP client, the subprocess pool, and the
workflow's own `aclose()` when it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from areal_lite.config import ExperimentConfig, run_path
from areal_lite.engine.base import Engine, SessionAware
from areal_lite.export import export_episode
from areal_lite.proxy.app import ProxyServer
from areal_lite.proxy.chat import ChatDefaults
from areal_lite.proxy.parsers import detect_tool_parser, template_renders_tools
from areal_lite.proxy.render import ChatRenderer
from areal_lite.proxy.rewards import mount_rewards
from areal_lite.proxy.sessions import Session
from areal_lite.proxy.tokens import mount_tokens
from areal_lite.rollout.agent import (
    LegacyAgent,
    make_subproc_pool,
    resolve_workflow,
    takes_extra_kwargs,
)
from areal_lite.rollout.controller import RolloutController
from areal_lite.runtime import tune_gc
from areal_lite.types import Sample


@dataclass(slots=True)
class RolloutStack:
    engine: Engine
    proxy: ProxyServer
    controller: RolloutController
    tokenizer: Any
    model_dir: str  # resolved HF checkpoint directory of actor.path
    servers: Any = None  # the launched SGLang servers (engine/sglang/fleet.py), if any


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_exporter(cfg: ExperimentConfig):
    agent = cfg.rollout.agent

    def export(session: Session) -> list[Sample]:
        return export_episode(session.cache, style=agent.export_style, gamma=agent.turn_discount,
                              agg=agent.discount_agg, episode_id=session.id,
                              train_shared_once=agent.train_shared_once)
    return export


async def _open_engine(cfg: ExperimentConfig, model_dir: str, tokenizer,
                       stack: contextlib.AsyncExitStack) -> tuple[Engine, Any]:
    """The configured engine, and the fleet of servers it launched (or None)."""
    r = cfg.rollout
    if r.backend == "sglang":
        import aiohttp

        from areal_lite.engine.sglang.client import SGLangEngine

        connector = aiohttp.TCPConnector(limit=r.sglang.max_connections, keepalive_timeout=60)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        fleet, urls = None, list(r.sglang.urls)
        if r.sglang.launch:  # the run owns its servers (decision 10)
            from areal_lite.engine.sglang.fleet import ServerFleet

            fleet = await stack.enter_async_context(ServerFleet(
                r.sglang, model_path=model_dir, log_dir=run_path(cfg) / "servers",
                session=session, gpus_per_node=cfg.scheduler.gpus_per_node))
            urls = fleet.urls
        engine = SGLangEngine(urls, session=session,
                              request_timeout_s=r.sglang.request_timeout_s,
                              connect_timeout_s=r.sglang.connect_timeout_s,
                              max_retries=r.sglang.max_retries,
                              outage_timeout_s=r.sglang.outage_timeout_s,
                              api_key=r.sglang.api_key or None, tp_size=r.sglang.tp_size,
                              lean_http=r.sglang.lean_http,
                              max_connections=r.sglang.max_connections)
        await engine.start()
        stack.push_async_callback(engine.close)
        if fleet is not None:
            fleet.supervise(engine)
        return engine, fleet
    from areal_lite.engine.local.engine import LocalEngine
    from areal_lite.models import load_causal_lm

    device = resolve_device(cfg.actor.device)
    model = await asyncio.to_thread(load_causal_lm, model_dir, device=device, dtype=cfg.actor.dtype)
    engine = LocalEngine(model, tokenizer=tokenizer, device=device,
                         max_batch_size=r.local.max_batch_size, max_kv_tokens=r.local.max_kv_tokens,
                         max_context_len=r.local.max_context_len or None, seed=cfg.seed,
                         prefix_cache_tokens=r.local.prefix_cache_tokens,
                         fused_forward=r.local.fused_forward)
    await engine.start()
    stack.push_async_callback(engine.close)
    return engine, None


@contextlib.asynccontextmanager
async def open_rollout(cfg: ExperimentConfig, workflow: Any = None, *,
                       engine: Engine | None = None) -> AsyncIterator[RolloutStack]:
    """Open everything the rollout side needs; `engine` overrides the configured one."""
    from areal_lite.models import load_tokenizer, resolve_model_dir

    r = cfg.rollout
    spec = workflow if workflow is not None else cfg.workflow
    # online mode needs no workflow: its agents live outside (rollout/online.py)
    wf = None if r.agent.mode == "online" and not spec else resolve_workflow(
        spec, r.agent.agent_kwargs)
    model_dir = await asyncio.to_thread(resolve_model_dir, cfg.actor.path)
    tokenizer = await asyncio.to_thread(load_tokenizer, model_dir)
    async with contextlib.AsyncExitStack() as stack:
        if hasattr(wf, "aclose"):
            stack.push_async_callback(wf.aclose)
        servers = None
        if engine is None:
            engine, servers = await _open_engine(cfg, str(model_dir), tokenizer, stack)
        tool_parser = r.proxy.tool_parser
        template = getattr(tokenizer, "chat_template", None)
        fallback = r.proxy.tool_fallback == "hermes" and not template_renders_tools(template)
        if tool_parser == "auto":
            tool_parser = "hermes" if fallback else detect_tool_parser(template)
        renderer = ChatRenderer(tokenizer, chat_template_kwargs=r.proxy.chat_template_kwargs,
                                max_message_chars=r.proxy.max_message_chars,
                                max_prompt_chars=r.proxy.max_prompt_chars,
                                tool_fallback=fallback)
        proxy = ProxyServer(
            engine=engine, renderer=renderer, exporter=make_exporter(cfg),
            host=r.proxy.host, port=r.proxy.port, model_name=r.proxy.model_name,
            tool_parser=tool_parser, reasoning=r.proxy.reasoning_parser == "think",
            defaults=ChatDefaults(max_new_tokens=r.sampling.max_new_tokens,
                                  temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                                  top_k=r.sampling.top_k),
            max_request_mb=r.proxy.max_request_mb, body_timeout_s=r.proxy.body_timeout_s,
            idle_timeout_s=r.proxy.idle_timeout_s,
            render_offload_chars=r.proxy.render_offload_chars)
        mount_tokens(proxy)  # token-level agents (rollout/env.py)
        mount_rewards(proxy)  # run_and_submit_rewards (the older proxy style)
        await stack.enter_async_context(proxy)
        http_client = await stack.enter_async_context(proxy.http_client(timeout=r.episode_timeout_s))
        pool = None
        if wf is not None and (r.agent.mode == "subproc" or isinstance(wf, LegacyAgent)
                               or not takes_extra_kwargs(wf)):
            pool = make_subproc_pool(r.agent.subproc_max_workers)
        controller = RolloutController(
            proxy, wf, http_client=http_client, episode_timeout_s=r.episode_timeout_s,
            max_concurrent=r.max_concurrent_rollouts, pool=pool,
            new_pool=functools.partial(make_subproc_pool, r.agent.subproc_max_workers),
            end_session=engine.end_session if isinstance(engine, SessionAware) else None)
        stack.callback(controller.close_pool)
        stack.callback(controller.log_shutdown)  # after every episode has unwound
        tune_gc()  # GC work per request stays flat (runtime.py)
        yield RolloutStack(engine=engine, proxy=proxy, controller=controller,
                           tokenizer=tokenizer, model_dir=str(model_dir), servers=servers)
