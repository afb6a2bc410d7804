"""Tests for rewards.py: boxed extraction, math_reward, and the RewardPool's failure isolation."""

from __future__ import annotations

import asyncio

import pytest
import reward_fixtures as fx
from hypothesis import given
from hypothesis import strategies as st

from areal_lite.data.rewards import RewardPool, extract_boxed, math_reward

# ---------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}} done", "\\sqrt{\\frac{a}{b^{2}}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),
        ("no box here: 42", None),
        ("\\boxed{", None),
        ("\\boxed 5", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


_BALANCED = st.recursive(
    st.text(alphabet="abc123+-", max_size=5),
    lambda inner: st.builds("{}{{{}}}{}".format, inner, inner, inner),
    max_leaves=8,
)


@given(_BALANCED)
def test_extract_boxed_round_trips_balanced_content(content):
    assert extract_boxed(f"Reasoning... \\boxed{{{content}}} tail") == content


# ---------------------------------------------------------------- math_reward


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("So the total is \\boxed{42}.", "42", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{1,234}", "Steps...\n#### 1,234", 1.0),
        ("\\boxed{18}", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", 1.0),
        ("\\boxed{43}", "42", 0.0),
        ("\\boxed{17}", "Steps\n#### 18", 0.0),
        ("The answer is 42.", "42", 0.0),
        ("\\boxed{}", "42", 0.0),
        ("\\boxed{42} wait, no: \\boxed{41}", "42", 0.0),
    ],
)
def test_math_reward(completion, reference, expected):
    assert math_reward(completion, reference) == expected


def test_math_reward_empty_reference_says_what_to_fix():
    with pytest.raises(ValueError, match="answer column"):
        math_reward("\\boxed{1}", "#### ")


# ---------------------------------------------------------------- RewardPool


def _pool(**kw) -> RewardPool:
    kw.setdefault("max_workers", 2)
    kw.setdefault("timeout_s", 1.5)
    return RewardPool(preload_modules=(), **kw)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_pool_scores_normal_calls(start_method):
    async with _pool(start_method=start_method) as pool:
        results = await asyncio.gather(*(pool.score(fx.add, i, 0.5) for i in range(6)))
    assert results == [i + 0.5 for i in range(6)]
    assert pool.counters()["reward/num_calls"] == 6
    assert (pool.num_timeouts, pool.num_failures, pool.num_restarts) == (0, 0, 0)


async def test_pool_runs_math_reward_in_a_worker():
    async with RewardPool(max_workers=1, timeout_s=30) as pool:
        assert await pool.score(math_reward, "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
        assert await pool.score(math_reward, "\\boxed{3}", "#### 4") == 0.0


async def test_hung_verifier_times_out_and_pool_recovers():
    async with _pool(timeout_s=3.0) as pool:
        hung, *others = await asyncio.gather(
            pool.score(fx.hang_forever), *(pool.score(fx.add, i, 1) for i in range(4))
        )
        assert hung == 0.0
        assert others == [1, 2, 3, 4]  # calls caught in the recycled pool were retried
        assert (pool.num_timeouts, pool.num_failures, pool.num_restarts) == (1, 0, 1)
        assert await pool.score(fx.add, 2, 3) == 5


async def test_timed_out_call_returns_at_its_timeout_while_the_pool_restarts():
    async with _pool(max_workers=1, timeout_s=1.0) as pool:
        assert await pool.score(fx.hang_forever) == 0.0
        assert pool.num_timeouts == 1 and pool.num_restarts == 0  # not waited for
        assert await pool.score(fx.add, 2, 3) == 5  # the next call gets the fresh pool
        assert pool.num_restarts == 1


async def test_raising_verifier_scores_zero_and_counts_a_failure(caplog):
    async with _pool() as pool:
        assert await pool.score(fx.raise_error) == 0.0
        assert await pool.score(fx.not_a_number) == 0.0
        assert (pool.num_failures, pool.num_timeouts, pool.num_restarts) == (2, 0, 0)
        assert await pool.score(fx.add, 1, 1) == 2
    assert "verifier exploded" in caplog.text


async def test_missing_dependency_raises_instead_of_scoring_zero():
    """A verifier that cannot import its package would score every answer 0 and train on
    nothing; the ImportError reaches the agent (its episode fails, loudly) instead."""
    async with _pool() as pool:
        with pytest.raises(ImportError, match="areal_lite_no_such_verifier"):
            await pool.score(fx.missing_dependency)
        assert await pool.score(fx.add, 1, 2) == 3


async def test_dying_worker_scores_zero_and_pool_recovers():
    async with _pool() as pool:
        dead, *others = await asyncio.gather(
            pool.score(fx.hard_exit), *(pool.score(fx.add, i, 10) for i in range(3))
        )
        assert dead == 0.0
        assert others == [10, 11, 12]  # calls lost with the pool were retried alone
        assert (pool.num_failures, pool.num_timeouts) == (1, 0)
        assert pool.num_restarts == 2  # the shared pool, then the pool it died in alone
        assert await pool.score(fx.add, 4, 4) == 8


async def test_two_dying_workers_do_not_deadlock_the_retries():
    async with _pool() as pool:
        results = await asyncio.gather(
            pool.score(fx.hard_exit), pool.score(fx.hard_exit), pool.score(fx.add, 1, 2)
        )
        assert results == [0.0, 0.0, 3]
        assert pool.num_failures == 2


async def test_cancelled_score_raises_cancelled_error():
    async with _pool(max_workers=1, timeout_s=30) as pool:
        task = asyncio.create_task(pool.score(fx.hang_forever))
        await asyncio.sleep(0)  # one loop turn: the call is submitted and waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (pool.num_timeouts, pool.num_failures) == (0, 0)


async def test_closed_pool_and_bad_functions_fail_fast():
    pool = _pool()
    with pytest.raises(TypeError, match="top-level"):
        await pool.score(lambda: 1.0)
    await pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.score(fx.add, 1, 2)


def test_pool_rejects_bad_config():
    with pytest.raises(ValueError, match="fork"):
        RewardPool(max_workers=1, timeout_s=1, start_method="fork")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(max_workers=1, timeout_s=0)
