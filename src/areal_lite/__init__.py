"""areal-lite: train LLM agents written against the OpenAI API with asynchronous RL."""

from areal_lite.agent import BadReward, resolve_workflow
from areal_lite.algorithms import AlgorithmConfig
from areal_lite.cache import InteractionCache
from areal_lite.config import ConfigError, ExperimentConfig
from areal_lite.config_toml import load_config, loads_config
from areal_lite.engine.base import ContextLengthExceeded, Engine, EngineError, EngineUnavailable
from areal_lite.engine.fake_sglang import FakeSGLangServer
from areal_lite.engine.local import LocalEngine
from areal_lite.engine.sglang import SGLangEngine
from areal_lite.engine.stats import EngineStats
from areal_lite.export import export_concat, export_episode, export_individual
from areal_lite.learner import Learner, LearnerConfig
from areal_lite.proxy.app import ProxyServer
from areal_lite.rewards import RewardPool, math_reward
from areal_lite.rollout import EpisodeResult, GroupResult, RolloutController
from areal_lite.stack import RolloutStack, open_rollout
from areal_lite.trainer import Trainer
from areal_lite.types import (CompletionNode, GenerateRequest, GenerateResult, Sample,
                              SamplingParams, TokenChunk)
from areal_lite.weight_group import WeightGroup

__all__ = [
    "AlgorithmConfig",
    "BadReward",
    "CompletionNode",
    "ConfigError",
    "ContextLengthExceeded",
    "Engine",
    "EngineError",
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
]
