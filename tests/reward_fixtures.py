"""Top-level reward functions for tests/test_rewards.py, importable by spawned workers."""

from __future__ import annotations

import os
import threading


def add(a: float, b: float) -> float:
    return a + b


def hang_forever() -> float:
    threading.Event().wait()  # blocks until the pool kills this process
    return 1.0


def raise_error() -> float:
    raise ValueError("verifier exploded")


def hard_exit() -> float:
    os._exit(3)


def not_a_number() -> str:
    return "forty-two"


def missing_dependency() -> float:
    import areal_lite_no_such_verifier  # noqa: F401  (an uninstalled package)

    return 1.0
