"""Reward stage: pure reward functions (math-verify on \\boxed{}) and the process pool running them.

`integer_reward` is the cheap exact check for integer answers (the generated sets): it
runs inline, no pool needed.

Verifiers are untrusted code as far as the run is concerned: sympy can hang on a
pathological expression and a C extension can crash its process. `RewardPool` runs
them in worker processes (forkserver or spawn, never fork: the parent has threads)
with a per-call timeout. A call that times out, raises, or kills its worker scores
0.0 and is counted; it never stalls or fails the run.

Outcomes of `RewardPool.score`::

    fn returns a number ............. float(result)
    fn raises / returns a non-number  0.0, num_failures += 1
    fn runs past timeout_s .......... 0.0, num_timeouts += 1, the pool is recycled
    a worker dies (os._exit, crash) . every call lost with that pool is retried once,
                                      alone on a fresh pool (so an innocent call is
                                      never hit twice); if it dies alone too: 0.0,
                                      num_failures += 1
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import multiprocessing
import pickle
import re
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

from areal_lite.data.prompts import gsm8k_final_answer

__all__ = ["RewardPool", "extract_boxed", "integer_reward", "math_reward"]

logger = logging.getLogger(__name__)

_BOXED = "\\boxed"
_VERIFY_TIMEOUT_S = 5  # math-verify's own SIGALRM timeout, used only on a main thread


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the brace closing the one at `open_at`; escaped braces (\\{ \\}) don't count."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in `text` (nested braces kept), else None.

    A trailing unclosed `\\boxed{` (a truncated completion) is ignored in favour of the
    last complete one before it.
    """
    start = len(text)
    while (start := text.rfind(_BOXED, 0, start)) != -1:
        brace = start + len(_BOXED)
        while brace < len(text) and text[brace].isspace():
            brace += 1
        if brace < len(text) and text[brace] == "{":
            end = _closing_brace(text, brace)
            if end is not None:
                return text[brace + 1 : end]
    return None


def math_reward(completion_text: str, reference_answer: str) -> float:
    """1.0 if the last \\boxed{} answer of the completion math-verifies equal to the
    reference ("42", "\\frac{1}{2}", or a GSM8K answer "... #### 42"), else 0.0."""
    boxed = extract_boxed(completion_text)
    if boxed is None or not boxed.strip():
        return 0.0
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("math_reward needs math-verify: `pip install math-verify`") from None
    ref = gsm8k_final_answer(reference_answer) if "####" in reference_answer else reference_answer.strip()
    if not ref:
        raise ValueError(
            f"reference answer is empty (got {reference_answer!r}); check the dataset's answer column"
        )
    # math-verify times itself out with SIGALRM, which only works on the main thread; in a
    # worker thread the caller (RewardPool) owns the timeout instead.
    timeout = _VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(ref if "$" in ref else f"${ref}$", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


_INTEGER = re.compile(r"-?\d+(?:\.0*)?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NOISE = re.compile(r"[\s,$]|\\[,!;: $]|\\text\{[^}]*\}")  # spaces, thousands commas, $, units


def integer_reward(completion_text: str, reference_answer: str, format_reward: float = 0.0,
                   unboxed_reward: float = 0.0, copied: Collection[int] = (),
                   empty_reward: float = 0.0) -> float:
    """1.0 if the last \\boxed{} of the completion holds the reference integer ("42",
    "1,234", "42.0"; the reference may be a GSM8K answer "... #### 42"); `format_reward`
    if it holds some other integer, unless that integer is in `copied` (e.g. the numbers
    of the question: boxing one of them is not an attempt at the answer, and paying it
    teaches a policy to box the first number it reads); with no \\boxed{} at all,
    `unboxed_reward` if the last number of the text is the reference, else 0.0. A box
    left empty or holding no integer ("The answer is \\boxed{} 29", the instruction
    copied) earns `empty_reward` (0.0 by default; a negative value pushes a policy off
    it): it must not be paid as an unboxed answer, or a policy learns to copy the empty
    box. Pure and fast."""
    ref = gsm8k_final_answer(reference_answer)
    if not _INTEGER.fullmatch(ref):
        raise ValueError(f"integer_reward needs an integer reference answer, got {reference_answer!r}")
    boxed = extract_boxed(completion_text)
    value = _NOISE.sub("", boxed) if boxed is not None else ""
    if _INTEGER.fullmatch(value):
        answer = int(float(value))
        if answer == int(float(ref)):
            return 1.0
        return 0.0 if answer in copied else format_reward
    if boxed is not None or "\\boxed" in completion_text:
        return empty_reward
    numbers = _NUMBER.findall(completion_text.replace(",", ""))
    return unboxed_reward if numbers and float(numbers[-1]) == float(ref) else 0.0


# ---------------------------------------------------------------------------------------
# Process pool
# ---------------------------------------------------------------------------------------


def _preload(module_names: Sequence[str]) -> None:
    """Worker initializer: import heavy verifier modules before the first timed call."""
    for name in module_names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # optional extra not installed: the call that needs it will say so


def _ready() -> bool:
    return True


class _Retry:
    """Marker: the call was lost with its pool (not its own fault, or unknown); run it again."""


_RETRY = _Retry()


class RewardPool:
    """Runs picklable top-level reward functions in worker processes with a timeout.

    Use as `async with RewardPool(max_workers=2, timeout_s=10) as pool: r = await
    pool.score(math_reward, text, ref)`. At most `max_workers` calls are submitted at a
    time, so a submitted call starts at once on a warm worker and `timeout_s` measures
    its run time, not queueing. A timed-out call scores 0.0 at its timeout; its worker
    cannot be interrupted, so the whole pool is recycled in the background (workers
    killed, fresh pool started; later calls wait for it); calls that were running on it
    are retried. `close()` kills the workers.
    """

    def __init__(
        self,
        *,
        max_workers: int,
        timeout_s: float,  # seconds one call may run before it scores 0.0
        start_method: Literal["forkserver", "spawn"] = "forkserver",  # never fork: parent has threads
        preload_modules: Sequence[str] = ("math_verify",),  # imported in each worker at start
        startup_timeout_s: float = 120.0,  # seconds a fresh pool may take to start its workers
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"RewardPool max_workers must be >= 1, got {max_workers}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool timeout_s must be > 0, got {timeout_s}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"RewardPool start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.max_workers = max_workers
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._context = multiprocessing.get_context(start_method)
        self._preload_modules = tuple(preload_modules)
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0  # bumped each time a pool is (re)created
        self._slots = asyncio.Semaphore(max_workers)
        self._lifecycle = asyncio.Lock()
        self._isolation = asyncio.Lock()  # held while a suspect call runs alone
        self._closed = False
        self._recycling: asyncio.Task | None = None  # a recycle after a timeout, if running
        self.num_calls = 0
        self.num_timeouts = 0
        self.num_failures = 0
        self.num_restarts = 0  # pools recycled after a timeout or a dead worker

    def counters(self) -> dict[str, int]:
        return {
            "reward/num_calls": self.num_calls,
            "reward/num_timeouts": self.num_timeouts,
            "reward/num_failures": self.num_failures,
            "reward/num_restarts": self.num_restarts,
        }

    async def __aenter__(self) -> RewardPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start (and warm) the worker processes; idempotent."""
        async with self._lifecycle:
            self._check_open()
            if self._executor is None:
                await self._new_pool()

    async def close(self) -> None:
        """Kill the workers; calls still waiting raise RuntimeError. Idempotent."""
        async with self._lifecycle:
            self._closed = True
            executor, self._executor = self._executor, None
            if executor is not None:
                await asyncio.to_thread(_kill_pool, executor)
        if self._recycling is not None:  # finished (it held the lock): collect its outcome
            await asyncio.gather(self._recycling, return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardPool is closed; create a new one (async with RewardPool(...))")

    async def _new_pool(self) -> None:
        executor = ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=self._context,
            initializer=_preload,
            initargs=(self._preload_modules,),
        )
        self._executor, self._generation = executor, self._generation + 1
        # One no-op per worker: the executor starts a process per submit while none is idle,
        # so this brings up every worker (and its preloaded modules) before timed calls.
        warmups = [asyncio.wrap_future(executor.submit(_ready)) for _ in range(self.max_workers)]
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                await asyncio.gather(*warmups)
        except (TimeoutError, BrokenProcessPool) as e:
            self._executor = None
            await asyncio.to_thread(_kill_pool, executor)
            raise RuntimeError(
                f"reward worker processes failed to start within {self.startup_timeout_s} s "
                f"({e!r}); see the worker traceback above; the main module must be import-safe "
                f"(`if __name__ == '__main__':`) and the preload modules "
                f"{self._preload_modules} must import cleanly"
            ) from e

    async def _recycle(self, generation: int) -> None:
        """Replace the pool of `generation` (unless someone already did) by a fresh one."""
        async with self._lifecycle:
            self._check_open()
            if generation != self._generation or self._executor is None:
                return
            old = self._executor
            self.num_restarts += 1
            await asyncio.to_thread(_kill_pool, old)
            await self._new_pool()

    async def score(self, fn: Callable[..., Any], *args: Any) -> float:
        """`fn(*args)` in a worker process as a float; 0.0 on timeout, error or crash.
        An ImportError in the worker (a missing dependency) is raised, not scored."""
        self._check_open()
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(
                f"RewardPool needs a picklable top-level function (defined at module level, "
                f"importable by worker processes), got {fn!r}: {e}"
            ) from None
        self.num_calls += 1
        async with self._slots:
            outcome = await self._score_once(fn, args)
        if isinstance(outcome, _Retry):
            outcome = await self._score_alone(fn, args)
        if isinstance(outcome, _Retry):
            self.num_failures += 1
            logger.warning("reward %s killed its worker process; scoring 0.0", _name(fn))
            return 0.0
        return outcome

    async def _score_alone(self, fn: Callable[..., Any], args: tuple) -> float | _Retry:
        """Run a call that was lost with its pool again, holding every slot: if the pool
        breaks now, this call is the culprit. Suspects queue on a lock before taking
        slots, and hold none while they wait, so two of them cannot deadlock."""
        async with self._isolation:
            num_held = 0
            try:
                for _ in range(self.max_workers):
                    await self._slots.acquire()
                    num_held += 1
                return await self._score_once(fn, args)
            finally:
                for _ in range(num_held):
                    self._slots.release()

    async def _score_once(self, fn: Callable[..., Any], args: tuple) -> float | _Retry:
        if self._recycling is not None and not self._recycling.done():
            await asyncio.shield(self._recycling)  # a fresh pool, not the one being killed
        if self._executor is None:
            await self.start()
        executor, generation = self._executor, self._generation
        assert executor is not None
        try:
            future = asyncio.wrap_future(executor.submit(fn, *args))
        except (BrokenProcessPool, RuntimeError):  # broken, or shut down by a recycle
            await self._recycle(generation)
            return _RETRY
        try:
            done, _ = await asyncio.wait({future}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            future.cancel()
            raise
        if not done:
            future.cancel()
            self.num_timeouts += 1
            logger.warning(
                "reward %s timed out after %s s; scoring 0.0, recycling the pool", _name(fn), self.timeout_s
            )
            if self._recycling is None or self._recycling.done():  # owned: close() collects it
                self._recycling = asyncio.create_task(self._recycle(generation))
            return 0.0
        if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
            await self._recycle(generation)
            return _RETRY
        return self._to_reward(fn, future)

    def _to_reward(self, fn: Callable[..., Any], future: asyncio.Future) -> float:
        exc = future.exception()
        if isinstance(exc, ImportError):  # a broken install, not a bad answer: never a silent 0
            raise exc
        if exc is None:
            try:
                value = float(future.result())
            except (TypeError, ValueError) as e:
                exc = e
            else:
                if math.isfinite(value):
                    return value
                exc = ValueError(f"non-finite reward {value}")
        self.num_failures += 1
        if self.num_failures == 1:  # traceback once; then one line per failure
            logger.warning("reward %s failed; scoring 0.0", _name(fn), exc_info=exc)
        else:
            logger.warning("reward %s failed (%r); scoring 0.0", _name(fn), exc)
        return 0.0


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _kill_pool(executor: ProcessPoolExecutor) -> None:
    """Kill every worker of `executor` and reap them (blocking; run it in a thread).

    A hung worker cannot be asked to stop, so the processes are killed first; the
    executor then sees them die, fails their futures with BrokenProcessPool, and
    `shutdown` joins its manager thread without waiting on any user code.
    """
    # No public API before Python 3.14 (ProcessPoolExecutor.kill_workers) lists the workers.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.kill()
    executor.shutdown(wait=True, cancel_futures=True)
    for process in processes:
        process.join()
