"""Metrics: the last stage of every training step; what the user sees of a run.

`MetricsLogger(run_dir, cfg.metrics)` owns every output a run shows:
- `{run_dir}/metrics.jsonl`, one `{"step", "time", **metrics}` line per `log()` call,
  flushed at once so a killed run keeps everything it logged. A resumed run appends
  again from its resume step; readers (`read_metrics`, the plots) keep the last value
  of each key per step, so the re-logged steps replace the old ones.
- TensorBoard (`torch.utils.tensorboard`) and Weights & Biases, when enabled and
  installed; enabled but missing -> one warning naming the package to install.
- a one-line console progress display on stderr (`progress()`).
- PNG curves of reward, eval accuracy, entropy and throughput (`plot()`), drawn with
  matplotlib's Agg canvas (no pyplot state), or one warning if matplotlib is missing.

Plain synchronous code: call it from the training loop between steps.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import msgspec

from areal_lite.config import MetricsConfig
from areal_lite.metrics_plots import PLOTS, plot_metrics

__all__ = [
    "MetricsLogger",
    "PLOTS",
    "PROGRESS_KEYS",
    "format_progress",
    "plot_metrics",
    "read_metrics",
]

log = logging.getLogger(__name__)

# (metric key, label) shown on the progress line, in order; missing values show "-".
PROGRESS_KEYS: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward"),
    ("eval/accuracy", "last eval acc"),  # kept between evals: label says so
    ("perf/tokens_per_s", "tok/s"),
    ("rollout/staleness", "stale"),
)
_RESERVED_KEYS = ("step", "time")  # written by log() itself




# ---------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl sorted by step; per step, the last value of each key wins.

    Lines logged for the same step (train then eval, or again after a resume) merge
    into one row. A missing file gives []; a truncated last line (the run was killed
    mid-write) is ignored; any other malformed line raises ValueError with its number.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = msgspec.json.decode(line)
            step = int(record["step"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            if number == len(lines):
                break  # a partial write from a killed run
            raise ValueError(f"{path}:{number}: not a metrics line ({exc}); fix or delete it") from exc
        rows.setdefault(step, {}).update(record)
    return [rows[step] for step in sorted(rows)]


# ---------------------------------------------------------------- progress line


def _duration(seconds: float | None) -> str:
    """`M:SS`, or `H:MM:SS` from an hour on; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_progress(
    step: int, total_steps: int, values: Mapping[str, float], elapsed_s: float, eta_s: float | None
) -> str:
    """The progress line, e.g. `step 12/100 | reward 0.41 | eval acc - | ... | ETA 3:10`.

    `values` holds the latest known value of each of PROGRESS_KEYS; absent ones show "-".
    """
    parts = [f"step {step}/{total_steps}"]
    parts += [f"{label} {_number(values.get(key))}" for key, label in PROGRESS_KEYS]
    parts += [f"elapsed {_duration(elapsed_s)}", f"ETA {_duration(eta_s)}"]
    return " | ".join(parts)


# ---------------------------------------------------------------- optional packages


def _import_optional(module: str) -> Any | None:
    """The module, or None if it (or something it needs) isn't installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ---------------------------------------------------------------- the logger


class MetricsLogger:
    """Owns metrics.jsonl, the optional TensorBoard/W&B writers and the progress line.

    `start_step` is the number of steps done before this process started (the resume
    step), so the ETA counts only this process's pace. `stream` (default stderr) and
    `clock` (default time.monotonic, seconds) are injectable for tests.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: MetricsConfig | None = None,
        *,
        start_step: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg if cfg is not None else MetricsConfig()
        if self.cfg.log_every < 1:
            raise ValueError(f"metrics.log_every must be >= 1 (steps), got {self.cfg.log_every}")
        self.start_step = start_step
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started_at = clock()
        self._jsonl: Any = None  # binary file, opened on the first log()
        self._tensorboard: Any = None  # SummaryWriter when enabled and installed
        self._wandb_run: Any = None
        self._backends_opened = False
        self._warned: set[str] = set()  # missing optional packages already warned about
        self._latest: dict[str, float] = {}  # last known value of each PROGRESS_KEYS key
        self._line_width = 0  # length of the TTY progress line on screen, 0 = none
        self._closed = False

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    # -- logging

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record `metrics` for `step` in every enabled backend.

        Steps that aren't a multiple of `log_every` are dropped unless they carry an
        `eval/` metric. Values must be numbers; NaN/inf are written as null.
        """
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close(); create a new logger")
        values = self._check(metrics)
        self._remember(values)
        if step % self.cfg.log_every and not any(k.startswith("eval/") for k in values):
            return
        if self.cfg.jsonl:
            self._write_jsonl(step, values)
        self._open_backends()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(dict(values), step=step)

    @staticmethod
    def _check(metrics: Mapping[str, float]) -> dict[str, float]:
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if key in _RESERVED_KEYS:
                raise ValueError(f"metric name {key!r} is reserved for the jsonl line itself; rename it")
            try:
                values[key] = float(value)
            except (TypeError, ValueError) as exc:
                kind = type(value).__name__
                raise TypeError(f"metric {key!r} must be a number, got {value!r} ({kind})") from exc
        return values

    def _write_jsonl(self, step: int, values: Mapping[str, float]) -> None:
        if self._jsonl is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "ab")  # append: a resumed run keeps history
        line = {"step": step, "time": time.time()}
        line.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        self._jsonl.write(msgspec.json.encode(line) + b"\n")
        self._jsonl.flush()

    def _warn_missing(self, package: str, feature: str, install: str) -> None:
        if package not in self._warned:
            self._warned.add(package)
            log.warning("%s is enabled but %s is not installed; skipping it (%s)", feature, package, install)

    def _open_backends(self) -> None:
        """Start TensorBoard / W&B on the first written step (once, even if missing)."""
        if self._backends_opened:
            return
        self._backends_opened = True
        if self.cfg.tensorboard:
            module = _import_optional("torch.utils.tensorboard")
            if module is None:
                self._warn_missing("tensorboard", "metrics.tensorboard", "pip install tensorboard")
            else:
                self._tensorboard = module.SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if self.cfg.wandb:
            wandb = _import_optional("wandb")
            if wandb is None:
                self._warn_missing("wandb", "metrics.wandb", "pip install wandb")
            else:
                self._wandb_run = wandb.init(
                    project=self.cfg.wandb_project, dir=str(self.run_dir), name=self.run_dir.name,
                    id=self._wandb_id(), resume="allow",
                )

    def _wandb_id(self) -> str:
        """The run's W&B id, kept in the run dir so a resumed run continues the same chart."""
        path = self.run_dir / "wandb_run_id.txt"
        if path.exists():
            return path.read_text().strip()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id + "\n")
        return run_id

    # -- progress

    def _remember(self, values: Mapping[str, float]) -> None:
        for key, _ in PROGRESS_KEYS:
            if key in values:
                self._latest[key] = values[key]

    def progress(self, step: int, total_steps: int, metrics: Mapping[str, float] | None = None) -> None:
        """Show the progress line for `step`; values missing from `metrics` keep their
        last known value (e.g. eval accuracy between evals) or show "-"."""
        if metrics:
            self._remember(self._check(metrics))
        if not self.cfg.progress:
            return
        elapsed = self._clock() - self._started_at
        done = step - self.start_step
        eta = elapsed / done * max(0, total_steps - step) if done > 0 else None
        line = format_progress(step, total_steps, self._latest, elapsed, eta)
        if self._stream.isatty():
            self._stream.write("\r" + line.ljust(self._line_width))
            self._line_width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    # -- plots and lifetime

    def plot(self, path_dir: str | Path | None = None) -> list[Path]:
        """Draw the curves of metrics.jsonl into `path_dir` (default the run dir).

        Returns the PNGs written: none when plots are off, matplotlib is missing (one
        warning) or nothing has been logged yet.
        """
        if not self.cfg.plots:
            return []
        if _import_optional("matplotlib") is None:
            self._warn_missing("matplotlib", "metrics.plots", "pip install matplotlib")
            return []
        return plot_metrics(read_metrics(self.jsonl_path), path_dir if path_dir is not None else self.run_dir)

    def close(self) -> None:
        """Flush and close every writer and end the progress line; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._line_width:
            self._stream.write("\n")
            self._stream.flush()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
