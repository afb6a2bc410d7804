"""areal-lite: train LLM agents written against the OpenAI API with asynchronous RL.

The package face is lazy: `import areal_lite` (or a pure module such as
`areal_lite.cache`) loads neither torch, transformers nor aiohttp; each name below is
imported from its home module the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module it lives in
_HOMES: dict[str, str] = {
    "AgentWorkflow": "areal_lite.rollout.agent",
    "AlgorithmConfig": "areal_lite.config",
    "BadReward": "areal_lite.rollout.agent",
    "CompletionNode": "areal_lite.types",
    "ConfigError": "areal_lite.config",
    "ContextLengthExceeded": "areal_lite.engine.base",
    "Engine": "areal_lite.engine.base",
    "EngineError": "areal_lite.engine.base",
    "EngineRejected": "areal_lite.engine.base",
    "EngineStats": "areal_lite.engine.stats",
    "EngineUnavailable": "areal_lite.engine.base",
    "EpisodeResult": "areal_lite.rollout.controller",
    "ExperimentConfig": "areal_lite.config",
    "FakeSGLangServer": "areal_lite.testing.fake_sglang.server",
    "GenerateRequest": "areal_lite.types",
    "GenerateResult": "areal_lite.types",
    "GroupResult": "areal_lite.rollout.controller",
    "InteractionCache": "areal_lite.cache",
    "Learner": "areal_lite.train.learner",
    "LearnerConfig": "areal_lite.config",
    "LocalEngine": "areal_lite.engine.local.engine",
    "ProxyServer": "areal_lite.proxy.app",
    "RewardPool": "areal_lite.data.rewards",
    "RolloutController": "areal_lite.rollout.controller",
    "RolloutStack": "areal_lite.rollout.stack",
    "SGLangEngine": "areal_lite.engine.sglang.client",
    "Sample": "areal_lite.types",
    "SamplingParams": "areal_lite.types",
    "TokenChunk": "areal_lite.types",
    "Trainer": "areal_lite.trainer",
    "WeightGroup": "areal_lite.engine.sglang.weight_group",
    "export_concat": "areal_lite.export",
    "export_episode": "areal_lite.export",
    "export_individual": "areal_lite.export",
    "load_config": "areal_lite.config_toml",
    "loads_config": "areal_lite.config_toml",
    "math_reward": "areal_lite.data.rewards",
    "open_rollout": "areal_lite.rollout.stack",
    "resolve_workflow": "areal_lite.rollout.agent",
    "run_and_submit_rewards": "areal_lite.rollout.agent",
}

__all__ = [
    "AgentWorkflow",
    "AlgorithmConfig",
    "BadReward",
    "CompletionNode",
    "ConfigError",
    "ContextLengthExceeded",
    "Engine",
    "EngineError",
    "EngineRejected",
    "EngineStats",
    "EngineUnavailable",
    "EpisodeResult",
    "ExperimentConfig",
    "FakeSGLangServer",
    "GenerateRequest",
    "GenerateResult",
    "GroupResult",
    "InteractionCache",
    "Learner",
    "LearnerConfig",
    "LocalEngine",
    "ProxyServer",
    "RewardPool",
    "RolloutController",
    "RolloutStack",
    "SGLangEngine",
    "Sample",
    "SamplingParams",
    "TokenChunk",
    "Trainer",
    "WeightGroup",
    "export_concat",
    "export_episode",
    "export_individual",
    "load_config",
    "loads_config",
    "math_reward",
    "open_rollout",
    "resolve_workflow",
    "run_and_submit_rewards",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'areal_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from areal_lite.cache import InteractionCache
    from areal_lite.config import (
        AlgorithmConfig,
        ConfigError,
        ExperimentConfig,
        LearnerConfig,
    )
    from areal_lite.config_toml import load_config, loads_config
    from areal_lite.data.rewards import RewardPool, math_reward
    from areal_lite.engine.base import (
        ContextLengthExceeded,
        Engine,
        EngineError,
        EngineRejected,
        EngineUnavailable,
    )
    from areal_lite.engine.local.engine import LocalEngine
    from areal_lite.engine.sglang.client import SGLangEngine
    from areal_lite.engine.sglang.weight_group import WeightGroup
    from areal_lite.engine.stats import EngineStats
    from areal_lite.export import export_concat, export_episode, export_individual
    from areal_lite.proxy.app import ProxyServer
    from areal_lite.rollout.agent import AgentWorkflow, BadReward, resolve_workflow
    from areal_lite.rollout.controller import (
        EpisodeResult,
        GroupResult,
        RolloutController,
    )
    from areal_lite.rollout.stack import RolloutStack, open_rollout
    from areal_lite.testing.fake_sglang.server import FakeSGLangServer
    from areal_lite.train.learner import Learner
    from areal_lite.trainer import Trainer
    from areal_lite.types import (
        CompletionNode,
        GenerateRequest,
        GenerateResult,
        Sample,
        SamplingParams,
        TokenChunk,
    )
