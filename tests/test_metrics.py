"""Tests for metrics.py: metrics.jsonl, read_metrics, progress line, plots, optional backends."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import types
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from areal_lite import metrics as metrics_mod
from areal_lite import metrics_plots
from areal_lite.config import MetricsConfig
from areal_lite.metrics import (
    MetricsLogger,
    format_progress,
    plot_metrics,
    read_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """Monotonic clock the test advances by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def quiet(**overrides) -> MetricsConfig:
    """Config with the progress line off, so tests don't write to the real stderr."""
    return MetricsConfig(**{"progress": False, **overrides})


def warnings_from(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and word in r.getMessage()]


# ---------------------------------------------------------------- metrics.jsonl


def test_log_appends_flushed_json_lines(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", quiet())
    before = time.time()
    logger.log(0, {"reward/mean": 0.25, "train/loss": 1.5})
    logger.log(1, {"reward/mean": 0.5})
    # Not closed yet: the lines must already be on disk (a killed run keeps them).
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 0 and first["reward/mean"] == 0.25 and first["train/loss"] == 1.5
    assert second == {"step": 1, "time": second["time"], "reward/mean": 0.5}
    assert before <= first["time"] <= second["time"] <= time.time()
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(2, {"reward/mean": 1.0})


def test_log_converts_numbers_and_rejects_bad_metrics(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, quiet()) as logger:
        logger.log(0, {"count": 3, "flag": True, "bad": float("nan")})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="'name' must be a number"):
            logger.log(1, {"name": "abc"})  # type: ignore[dict-item]
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["count"] == 3.0 and row["flag"] == 1.0 and row["bad"] is None


def test_jsonl_disabled_writes_nothing(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run", quiet(jsonl=False)) as logger:
        logger.log(0, {"reward/mean": 1.0})
        assert logger.plot() == []
    assert not (tmp_path / "run").exists()


def test_log_every_keeps_multiples_and_eval_steps(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, quiet(log_every=2)) as logger:
        for step in range(6):
            logger.log(step, {"reward/mean": float(step)})
        logger.log(3, {"eval/accuracy": 0.5})
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        MetricsLogger(tmp_path, quiet(log_every=0))
    with pytest.raises(msgspec.ValidationError, match="log_every"):
        msgspec.convert({"log_every": 0}, MetricsConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown"):
        msgspec.convert({"tensorbord": True}, MetricsConfig)


# ---------------------------------------------------------------- read_metrics and resume


def test_resume_appends_and_read_keeps_last_value_per_step(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, quiet()) as first:
        for step in range(5):
            first.log(step, {"reward/mean": float(step), "old/only": 1.0})
        first.log(4, {"eval/accuracy": 0.3})
    # The run died after step 4 but its last checkpoint is step 3: steps 3-4 run again.
    with MetricsLogger(tmp_path, quiet(), start_step=3) as resumed:
        for step in (3, 4, 5):
            resumed.log(step, {"reward/mean": 10.0 + step})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 9
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row["reward/mean"] for row in rows] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]
    assert rows[4]["eval/accuracy"] == 0.3 and rows[4]["old/only"] == 1.0  # merged per key
    assert "old/only" not in rows[5]


def test_read_metrics_missing_truncated_and_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text('{"step": 0, "a": 1.0}\n\n{"step": 1, "a": 2.0}\n{"step": 2, "a"')
    assert [row["a"] for row in read_metrics(path)] == [1.0, 2.0]  # killed mid-write: ignored
    path.write_text('{"step": 0, "a": 1.0}\nnot json\n{"step": 1, "a": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics line"):
        read_metrics(path)


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from("abc"), st.floats(-1e6, 1e6)), max_size=30))
def test_read_metrics_matches_reference_merge(tmp_path_factory, records) -> None:
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, k: v}) + "\n" for s, k, v in records))
    expected: dict[int, dict] = {}
    for step, key, value in records:
        expected.setdefault(step, {"step": step})[key] = value
    assert read_metrics(path) == [expected[s] for s in sorted(expected)]


# ---------------------------------------------------------------- progress line


def test_progress_line_shows_missing_keys_as_dash_and_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    logger = MetricsLogger("unused-run-dir", MetricsConfig(jsonl=False), stream=stream, clock=clock)
    clock.now += 20.0
    logger.progress(2, 10, {"reward/mean": 0.5})
    clock.now += 10.0
    logger.log(3, {"eval/accuracy": 0.75, "perf/tokens_per_s": 1234.4, "rollout/staleness": 0.8})
    logger.progress(3, 10, {"reward/mean": 0.625})
    clock.now += 10.0
    logger.progress(4, 10, {})  # eval accuracy keeps its last known value
    logger.close()
    lines = stream.getvalue().split("\n")
    assert lines[0] == "step 2/10 | reward 0.5 | last eval acc - | tok/s - | stale - | elapsed 0:20 | ETA 1:20"
    assert lines[1] == (
        "step 3/10 | reward 0.625 | last eval acc 0.75 | tok/s 1234 | stale 0.8 | elapsed 0:30 | ETA 1:10"
    )
    assert lines[2].startswith("step 4/10 | reward 0.625 | last eval acc 0.75 |") and lines[2].endswith("ETA 1:00")
    assert lines[3:] == [""]


def test_progress_on_tty_rewrites_one_line_and_ends_it_on_close() -> None:
    clock, stream = FakeClock(), TTYStream()
    logger = MetricsLogger("unused", MetricsConfig(jsonl=False), stream=stream, clock=clock, start_step=100)
    logger.progress(100, 200, {"reward/mean": 123.456})  # nothing done since resume: no ETA
    clock.now += 3700.0
    logger.progress(101, 200, {})
    assert "\n" not in stream.getvalue()
    first, second = stream.getvalue().split("\r")[1:]
    assert first.rstrip().endswith("elapsed 0:00 | ETA -") and "reward 123 " in first
    assert second.endswith("elapsed 1:01:40 | ETA 101:45:00")
    logger.close()
    assert stream.getvalue().endswith("\n")


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    with MetricsLogger("unused", MetricsConfig(jsonl=False, progress=False), stream=stream) as logger:
        logger.progress(1, 2, {"reward/mean": 1.0})
    assert stream.getvalue() == ""


def test_format_progress_handles_non_finite_values() -> None:
    line = format_progress(1, 5, {"reward/mean": float("nan"), "rollout/staleness": 2.0}, 5.0, None)
    assert line == "step 1/5 | reward - | last eval acc - | tok/s - | stale 2 | elapsed 0:05 | ETA -"


# ---------------------------------------------------------------- plots


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


def test_plots_written_for_metrics_with_data_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with MetricsLogger(tmp_path, quiet()) as logger:
        assert logger.plot() == []  # nothing logged yet
        for step in range(40):  # > 30 points: the moving-average path
            logger.log(step, {"reward/mean": step / 40, "train/entropy": 2.0 - step / 40})
            if step % 10 == 0:
                logger.log(step, {"eval/accuracy": step / 50})
        written = logger.plot()
    names = sorted(p.name for p in written)
    assert names == ["curves.png", "entropy.png", "eval_accuracy.png", "reward.png"]
    for path in written:
        assert_png(path)
    assert not (tmp_path / "throughput.png").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_into_other_dir_and_plots_disabled(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"step": 1, "perf/tokens_per_s": 10.0}, {"step": 2, "perf/tokens_per_s": float("inf")}]
    written = plot_metrics(rows, tmp_path / "plots")
    assert [p.name for p in written] == ["throughput.png", "curves.png"]
    assert_png(tmp_path / "plots" / "throughput.png")
    assert plot_metrics([{"step": 1, "other": 1.0}], tmp_path / "none") == []
    turns = [{"step": 5, "eval/first_try": 0.2, "eval/within_3": 0.4}]  # overlays alone draw
    assert [p.name for p in plot_metrics(turns, tmp_path / "turns")] == ["eval_accuracy.png",
                                                                        "curves.png"]
    with MetricsLogger(tmp_path, quiet(plots=False)) as logger:
        logger.log(1, {"reward/mean": 1.0})
        assert logger.plot() == []
    assert not (tmp_path / "reward.png").exists()


def test_plot_without_matplotlib_warns_once(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with MetricsLogger(tmp_path, quiet()) as logger:
        logger.log(0, {"reward/mean": 1.0})
        assert logger.plot() == [] and logger.plot() == []
    assert len(warnings_from(caplog, "matplotlib")) == 1
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_metrics([], tmp_path)


# ---------------------------------------------------------------- optional backends


@pytest.mark.parametrize(("option", "module", "package"), [
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
    ("wandb", "wandb", "wandb"),
])
def test_backend_enabled_but_missing_warns_once(
    tmp_path, monkeypatch, caplog, option, module, package
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with MetricsLogger(tmp_path, quiet(**{option: True})) as logger:
        logger.log(0, {"reward/mean": 1.0})
        logger.log(1, {"reward/mean": 2.0})
    (message,) = warnings_from(caplog, package)
    assert f"metrics.{option} is enabled" in message and f"pip install {package}" in message
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2  # jsonl unaffected


def test_fake_tensorboard_receives_scalars(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple] = []

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            events.append(("open", log_dir))

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            events.append((tag, value, global_step))

        def close(self) -> None:
            events.append(("close",))

    fake = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with MetricsLogger(tmp_path, quiet(tensorboard=True, jsonl=False)) as logger:
        logger.log(3, {"reward/mean": 0.5, "train/loss": 2.0})
    assert events == [
        ("open", str(tmp_path / "tensorboard")),
        ("reward/mean", 0.5, 3),
        ("train/loss", 2.0, 3),
        ("close",),
    ]


def test_fake_wandb_logs_and_resumes_same_run(tmp_path: Path, monkeypatch) -> None:
    inits: list[dict] = []
    logged: list[tuple] = []

    class Run:
        def log(self, data: dict, step: int) -> None:
            logged.append((data, step))

        def finish(self) -> None:
            logged.append("finish")

    def init(**kwargs) -> Run:
        inits.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for step in (0, 1):
        with MetricsLogger(tmp_path / "run7", quiet(wandb=True, wandb_project="proj")) as logger:
            logger.log(step, {"reward/mean": float(step)})
    assert logged == [({"reward/mean": 0.0}, 0), "finish", ({"reward/mean": 1.0}, 1), "finish"]
    assert inits[0]["project"] == "proj" and inits[0]["name"] == "run7" and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == inits[1]["id"]  # the resumed process continues the same W&B run


# ---------------------------------------------------------------- pure helpers


@given(st.lists(st.floats(-1e3, 1e3), max_size=50), st.integers(1, 10))
def test_moving_average_matches_reference(values, window) -> None:
    expected = [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]
    assert metrics_plots._moving_average(values, window) == pytest.approx(expected, abs=1e-6)


def test_all_is_sorted_and_complete() -> None:
    assert metrics_mod.__all__ == sorted(metrics_mod.__all__)
    assert all(hasattr(metrics_mod, name) for name in metrics_mod.__all__)
