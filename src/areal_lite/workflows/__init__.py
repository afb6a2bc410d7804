"""Rollout stage: ready agent workflows, one module per agent framework (templates to copy).

Name one in the config (`workflow = "areal_lite.workflows.openai.MathToolAgent"`) or pass
it to `Trainer.train(workflow=...)`. Each solves the arithmetic/GSM8K-style task of
`math_task.py` (answer in \\boxed{}, checked by `math_reward`) and talks to the proxy only
through its framework's public API:

    openai          MathAgent, MultiTurnMathAgent, MathToolAgent      (base install)
    openai_agents   MathToolAgent, HandoffMathAgent          pip install 'areal-lite[openai-agents]'
    langchain       MathAgent, MathToolAgent                 pip install 'areal-lite[langchain]'
    anthropic       MathAgent, MathToolAgent                 pip install 'areal-lite[anthropic]'
    camel           MathAgent (a CAMEL ChatAgent)            pip install 'areal-lite[camel]'
    openhands       MathAgent (the OpenHands SDK agent)      pip install 'areal-lite[openhands]'
                    (openhands-sdk needs Python >= 3.12)

A framework is imported only when its workflow runs; a missing one raises an ImportError
naming the extra to install (`require`).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or fail saying which areal-lite extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this workflow needs `{module}`, which is not installed: "
                          f"pip install 'areal-lite[{extra}]' ({e})") from e
