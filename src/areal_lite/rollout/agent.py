"""Rollout stage: find the user's agent workflow and run one episode of it.

A workflow is any object with `async def run(self, data, **extra_kwargs)` returning a
number (reward of the episode's last completion) or a `{completion_id: reward}` dict.
It may be named by a dotted path (`pkg.mod.Class` / `pkg.mod:Class`), given as a class
or an instance, or be a module exposing `async def run_agent_return_reward(data)` or
`async def run_and_submit(data)` (the older proxy style, which reads
`OPENAI_BASE_URL`/`OPENAI_API_KEY` and therefore always runs in a subprocess, where those
variables belong to one episode at a time). `run_and_submit` posts its rewards itself
with `run_and_submit_rewards(func, data)`, to the proxy's `/v1/rl/set_reward`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import os
import pickle
import sys
import traceback
import types
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

Reward = float | dict[str, float]


class AgentWorkflow:
    """The typing base of an agent workflow (subclassing it is optional).

    The contract is the one method: `async def run(self, data, **extra_kwargs)`, where
    `data` is one dataset row and `extra_kwargs` carries `base_url` (the proxy's `/v1`
    URL), `api_key` (this episode's session key) and `http_client` (the run's shared
    `httpx.AsyncClient`). Return the reward of the episode's last completion, or a dict
    of rewards keyed by completion id.
    """

    async def run(self, data: dict, **extra_kwargs: Any) -> Reward:
        raise TypeError(f"{type(self).__name__} subclasses AgentWorkflow but does not "
                        "define `async def run(self, data, **extra_kwargs)`")


class BadReward(ValueError):
    """The workflow returned something that is not a reward."""


class LegacyAgent:
    """Adapter for a module with `async def run_agent_return_reward(data)` (its return is
    the reward) or `async def run_and_submit(data)` (it posts the rewards itself)."""

    def __init__(self, module_name: str, fn_name: str = "run_agent_return_reward") -> None:
        self.module_name, self.fn_name = module_name, fn_name  # picklable: re-imported

    async def run(self, data: dict, **_: Any) -> Any:
        fn = getattr(importlib.import_module(self.module_name), self.fn_name)
        result = fn(data)
        result = await result if inspect.isawaitable(result) else result
        return {} if self.fn_name == "run_and_submit" else result  # rewards already posted


async def run_and_submit_rewards(func: Any, data: dict, base_url: str | None = None,
                                 api_key: str | None = None) -> Reward:
    """Run `await func(data)` and post its reward(s) to the proxy (the older proxy style).

    `func` returns a number (the last completion's reward), a `{completion_id: reward}`
    dict, or a `(reward, info)` tuple. The proxy and the session key come from
    `OPENAI_BASE_URL` / `OPENAI_API_KEY` unless given. Returns the checked reward.
    """
    import httpx2

    base_url = (base_url or os.environ["OPENAI_BASE_URL"]).rstrip("/")
    api_key = api_key or os.environ["OPENAI_API_KEY"]
    result = func(data)
    result = await result if inspect.isawaitable(result) else result
    if isinstance(result, tuple):
        result = result[0]
    reward = check_reward(result)
    items = reward.items() if isinstance(reward, dict) else [(None, reward)]
    async with httpx2.AsyncClient(timeout=60) as client:
        for interaction_id, value in items:
            resp = await client.post(f"{base_url}/rl/set_reward",
                                     headers={"Authorization": f"Bearer {api_key}"},
                                     json={"interaction_id": interaction_id, "reward": value})
            if resp.status_code != 200:
                raise BadReward(f"the proxy refused reward {value!r} for "
                                f"{interaction_id or 'the last completion'}: {resp.text}")
    return reward


def _import_dotted(path: str) -> Any:
    if ":" in path:
        mod_name, _, attr = path.partition(":")
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        mod_name, _, attr = path.rpartition(".")
        if not mod_name or e.name not in (path, None) and not path.startswith(e.name + "."):
            raise
        return getattr(importlib.import_module(mod_name), attr)


def resolve_workflow(spec: Any, agent_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Turn a dotted path, class, instance or legacy module into a workflow object."""
    obj = spec
    if isinstance(spec, str):
        if not spec:
            raise ValueError("no workflow given: set `workflow = \"pkg.mod.Class\"` in the config "
                             "or pass workflow= to Trainer.train()")
        try:
            obj = _import_dotted(spec)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import workflow {spec!r}: {e}") from e
    if isinstance(obj, types.ModuleType):
        for fn_name in ("run_agent_return_reward", "run_and_submit"):
            if hasattr(obj, fn_name):
                return LegacyAgent(obj.__name__, fn_name)
        raise ValueError(f"module {obj.__name__!r} has no workflow: name a class in it "
                         "(pkg.mod.Class) or define `async def run_agent_return_reward(data)` "
                         "or `async def run_and_submit(data)`")
    if inspect.isclass(obj):
        obj = obj(**dict(agent_kwargs or {}))
    if not callable(getattr(obj, "run", None)):
        raise ValueError(f"workflow {spec!r} has no `run(self, data, **kwargs)` method")
    return obj


def takes_extra_kwargs(workflow: Any) -> bool:
    """Whether `workflow.run` accepts base_url/api_key/http_client. A `run(self, data)`
    (the reference documents' AgentWorkflow snippet) reads OPENAI_BASE_URL/OPENAI_API_KEY
    instead, so it runs in the subprocess pool, where those belong to one episode."""
    try:
        params = inspect.signature(workflow.run).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): assume the contract
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == "base_url" for p in params)


def check_reward(value: Any) -> Reward:
    """Accept int/float/bool/numpy scalars or a {completion_id: number} dict."""
    def number(x: Any, where: str) -> float:
        if isinstance(x, (bool, numbers.Real)) or (hasattr(x, "item") and getattr(x, "ndim", 1) == 0):
            f = float(x.item() if hasattr(x, "item") else x)
            if math.isfinite(f):
                return f
        raise BadReward(f"{where} must be a finite number, got {x!r} ({type(x).__name__})")

    if isinstance(value, Mapping):
        return {str(k): number(v, f"reward[{k!r}]") for k, v in value.items()}
    return number(value, "the workflow's return value")


# --- subprocess mode ---------------------------------------------------------------

def _subproc_episode(workflow: Any, data: dict, base_url: str, api_key: str) -> Any:
    """Runs in a pool worker: one episode at a time, so the env vars are its own.

    An exception the parent could not unpickle (e.g. `openai.BadRequestError`, whose
    constructor needs keyword arguments) would break the whole pool and fail every
    running episode; it is sent back as a RuntimeError naming its type, message and
    traceback instead, so it fails its own episode only."""
    os.environ["OPENAI_BASE_URL"] = base_url
    os.environ["OPENAI_API_KEY"] = api_key
    try:
        if takes_extra_kwargs(workflow):
            result = workflow.run(data, base_url=base_url, api_key=api_key)
        else:
            result = workflow.run(data)
        if inspect.isawaitable(result):
            return asyncio.run(_await(result))
        return result
    except Exception as e:
        if _round_trips(e):
            raise
        trace = "".join(traceback.format_exception(e))
        raise RuntimeError(f"{type(e).__module__}.{type(e).__qualname__}: {e}\n"
                           f"(worker traceback)\n{trace}") from None


def _round_trips(exc: BaseException) -> bool:
    """Whether `exc` survives pickling to the parent and back."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure means the parent could not rebuild it
        return False
    return True


async def _await(awaitable: Any) -> Any:
    return await awaitable


_MAIN_GUARD_HINT = (
    "if the training script has no `if __name__ == \"__main__\":` guard around its "
    "Trainer(...).train() call, every subproc agent worker re-runs it when it starts: "
    "add the guard")


def make_subproc_pool(max_workers: int) -> ProcessPoolExecutor:
    """A pool of spawned workers. Refuses to run inside such a worker: that happens when
    the user's script, re-imported by the worker as `__mp_main__`, starts training."""
    import multiprocessing as mp

    # a spawned worker runs the parent's main script as `__mp_main__` while it is still
    # bootstrapping (`_inheriting`, the flag multiprocessing checks itself), before
    # `parent_process()` is set and before `__main__` is replaced
    if getattr(mp.current_process(), "_inheriting", False) and "__mp_main__" in sys.modules:
        raise RuntimeError(f"a subproc agent worker started a training run: {_MAIN_GUARD_HINT}")
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=mp.get_context("spawn"),
                               initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent: it cancels their episodes (counted as
    cancelled) and closes the pool; a worker killed by the terminal's SIGINT would
    instead break the pool and fail every running episode."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _env_var_hint(exc: KeyError) -> RuntimeError | None:
    """An inline agent that read OPENAI_BASE_URL & co. gets an error saying why."""
    name = exc.args[0] if exc.args else None
    if isinstance(name, str) and name.startswith(("OPENAI_", "ANTHROPIC_")):
        return RuntimeError(
            f"the agent read the environment variable {name}, which inline agents do not "
            "get (they share one process); agents configured by environment variables need "
            "rollout.agent.mode = \"subproc\" (or use the base_url/api_key/http_client "
            "keyword arguments of run)")
    return None


async def run_workflow(workflow: Any, data: dict, *, base_url: str, api_key: str,
                       http_client: Any, pool: ProcessPoolExecutor | None) -> Reward:
    """Run one episode's agent code (inline, or in `pool` when given); check its reward."""
    if pool is None:
        try:
            result = workflow.run(data, base_url=base_url, api_key=api_key,
                                  http_client=http_client)
            if inspect.isawaitable(result):
                result = await result
        except KeyError as e:
            hint = _env_var_hint(e)
            if hint is None:
                raise
            raise hint from e
    else:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, _subproc_episode, workflow, data,
                                                base_url, api_key)
        except BrokenProcessPool as e:
            raise RuntimeError(f"a subproc agent worker died ({e}); {_MAIN_GUARD_HINT}; "
                               "otherwise see the worker's traceback above") from e
    return check_reward(result)
