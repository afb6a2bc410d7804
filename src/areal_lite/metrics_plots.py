"""Metrics plots: PNG curves of a run's metrics.jsonl rows (`MetricsLogger.plot()`).

Drawn with matplotlib's Agg canvas (no pyplot state); each file is written through a
temp file so a reader never sees half a PNG. Many noisy points get a trailing moving
average on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "plot_metrics"]

# (file name, metric key, title) of each single-metric plot; curves.png has all four.
PLOTS: tuple[tuple[str, str, str], ...] = (
    ("reward.png", "reward/mean", "Mean reward"),
    ("eval_accuracy.png", "eval/accuracy", "Eval accuracy"),
    ("entropy.png", "train/entropy", "Policy entropy (nats/token)"),
    ("throughput.png", "perf/tokens_per_s", "Throughput (tokens/s)"),
)

# curves drawn over another plot's axes when logged (the multi-turn recipe's eval)
OVERLAYS: dict[str, tuple[tuple[str, str], ...]] = {
    "eval/accuracy": (("eval/first_try", "first try"), ("eval/within_3", "within 3 turns")),
}


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, leaving out rows without it and non-finite values."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def _draw(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, title: str) -> bool:
    """Draw one metric's curve (and its OVERLAYS) on `ax`; False (and a "no data" note)
    if none has points."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    overlays = [(label, *_series(rows, k)) for k, label in OVERLAYS.get(key, ())]
    overlays = [o for o in overlays if o[1]]
    steps, values = _series(rows, key)
    if not steps and not overlays:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        return False
    if len(steps) >= 30:
        # Many noisy points: draw them faintly and overlay a trailing moving average.
        window = max(2, len(values) // 20)
        ax.plot(steps, values, linewidth=1.0, alpha=0.4, label="per step")
        ax.plot(steps, _moving_average(values, window), linewidth=2.0,
                label=f"mean of last {window}")
    elif steps:
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2,
                label=key.split("/")[-1] if overlays else None)
    for label, o_steps, o_values in overlays:
        ax.plot(o_steps, o_values, marker="o", markersize=3, linewidth=1.2, label=label)
    if overlays or len(steps) >= 30:
        ax.legend(loc="best", fontsize="small")
    return True


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _save(fig: Any, canvas_cls: Any, path: Path) -> None:
    """Render `fig` to `path` via a temp file, so a reader never sees half a PNG."""
    canvas_cls(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)


def plot_metrics(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write PLOTS (one PNG per metric with data) and curves.png (all four) to `out_dir`.

    Returns the paths written; nothing is written for a metric without data, and no
    curves.png when none has data. Raises ImportError if matplotlib isn't installed.
    """
    try:
        import matplotlib  # noqa: F401  (first: the submodules may be imported already)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("matplotlib is needed for plots: pip install matplotlib") from exc

    out_dir = Path(out_dir)
    written: list[Path] = []
    for name, key, title in PLOTS:
        fig = Figure(figsize=(6, 4), layout="constrained")
        if _draw(fig.add_subplot(), rows, key, title):
            _save(fig, FigureCanvasAgg, out_dir / name)
            written.append(out_dir / name)
    if written:
        fig = Figure(figsize=(11, 8), layout="constrained")
        for ax, (_, key, title) in zip(fig.subplots(2, 2).flat, PLOTS):
            _draw(ax, rows, key, title)
        _save(fig, FigureCanvasAgg, out_dir / "curves.png")
        written.append(out_dir / "curves.png")
    return written
