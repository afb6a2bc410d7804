"""Smoke test of benchmarks/rollout_overhead.py: a tiny run, every line valid, no errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_overhead.py"
KEYS = {"variant", "agents", "turns", "calls", "requests_per_s", "added_latency_ms_p50",
        "added_latency_ms_p99", "latency_ms_p50", "latency_ms_p99", "cpu_ms_per_call",
        "peak_rss_mb", "errors"}


def test_rollout_overhead_quick_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--agents", "1,4", "--turns", "1",
                           "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    variants = {"sdk_ceiling", "sdk_ceiling_inproc", "sdk_ceiling_roundtrip", "floor", "proxy",
                "proxy_tcp", "proxy_new_client", "proxy_tcp_raw"}
    assert {(r["variant"], r["agents"]) for r in rows} == {
        (v, n) for v in variants for n in (1, 4)}
    for row in rows:
        assert KEYS <= row.keys(), row
        assert row["errors"] == 0, row
        assert row["calls"] >= 1 and row["requests_per_s"] > 0, row
        assert row["added_latency_ms_p50"] is not None, row  # sdk_ceiling ran first
        if row["variant"] in ("sdk_ceiling_inproc", "sdk_ceiling_roundtrip", "proxy"):
            assert row["rounds"] == 2 and len(row["requests_per_s_rounds"]) == 2, row
            assert row["requests_per_s"] in row["requests_per_s_rounds"], row  # a real round
    for n in (1, 4):
        by = {r["variant"]: r for r in rows if r["agents"] == n}
        proxy, base = by["proxy"], by["sdk_ceiling_inproc"]
        ratios = sorted(p / b for p, b in zip(proxy["requests_per_s_rounds"],
                                              base["requests_per_s_rounds"]))
        assert proxy["vs_sdk_ceiling_inproc"] == pytest.approx(sum(ratios) / 2, abs=2e-3)
        own = sorted(p - b for p, b in zip(proxy["cpu_ms_per_call_rounds"],
                                           base["cpu_ms_per_call_rounds"]))
        assert proxy["own_cpu_ms_per_call"] == pytest.approx(sum(own) / 2, abs=2e-3)
        assert "own_cpu_beyond_roundtrip_ms_per_call" in proxy


BENCH = SCRIPT.parent


def _json_lines(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_engine_throughput_quick_run():
    """Single batch and sustained load, both sides, greedy outputs compared."""
    proc = subprocess.run([sys.executable, str(BENCH / "engine_throughput.py"), "--model", "tiny",
                           "--concurrency", "1,3", "--waves", "1,2", "--max-new-tokens", "5",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    rows = _json_lines(proc)
    assert {(r["concurrency"], r["waves"]) for r in rows} == {(1, 1), (3, 1), (1, 2), (3, 2)}
    for r in rows:
        assert r["engine_tok_s"] > 0 and r["hf_generate_tok_s"] > 0, r
        assert abs(r["ratio"] - r["engine_tok_s"] / r["hf_generate_tok_s"]) < 0.02, r  # rounding
        assert r["greedy_identical"] == (r["num_differ"] == 0), r
        assert r["hf_step_ms"] > 0 and r["matmul_floor_ms"] > 0, r
        ceiling = r["hf_step_ms"] / r["matmul_floor_ms"]
        assert abs(r["step_ceiling"] - ceiling) <= 0.05 * ceiling + 0.01, r  # rounding


def test_train_step_quick_run():
    """Learner packing vs not, and the weight swap next to a plain copy, on the tiny model."""
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--model", "tiny",
                           "--only", "learner,swap", "--samples", "8", "--max-len", "60"],
                          capture_output=True, text=True, timeout=300)
    rows = _json_lines(proc)
    learner = {r["packing"]: r for r in rows if r["measure"] == "learner"}
    assert set(learner) == {True, False}
    assert learner[True]["padding_frac"] <= learner[False]["padding_frac"]
    assert all(r["tokens_per_s"] > 0 and r["num_samples"] == 8 for r in learner.values())
    [swap] = [r for r in rows if r["measure"] == "weight_swap"]
    assert swap["swap_s"] > 0 and swap["plain_copy_s"] > 0 and swap["bytes"] > 0


@pytest.mark.slow
def test_vs_trl_quick_run():
    """Both areal-lite modes (and TRL when installed) on the tiny model: one line per side,
    the proximal forward reported skipped (one update pass), ratios when TRL ran."""
    proc = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--model", "tiny",
                           "--steps", "2", "--prompts", "2", "--group", "2",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    rows = {r["side"]: r for r in _json_lines(proc)}
    assert {"areal_sync", "areal_async", "trl"} <= rows.keys(), rows
    for side in ("areal_sync", "areal_async"):
        r = rows[side]
        assert r["seconds_per_step"] > 0 and len(r["step_s"]) == 2, r
        assert 0 < r["trained_tokens_per_step"] <= 2 * 2 * 4, r  # at most max_new per sample
        assert r["prox_forward_skipped"] == 1.0, r
        assert r["peak_rss_mb"] > 0, r
    if "skipped" in rows["trl"]:
        assert "ratio" not in rows
        return
    assert 0 < rows["trl"]["trained_tokens_per_step"] <= 2 * 2 * 4, rows["trl"]
    ratio = rows["ratio"]
    for side in ("areal_sync", "areal_async"):
        want = rows[side]["seconds_per_step"] / rows["trl"]["seconds_per_step"]
        assert ratio[f"{side}_over_trl"] == pytest.approx(want, rel=0.01, abs=1e-3)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu():
    """The GPU script's CPU mode: every item ends ok, each measure printed its line."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu",
                           "--only", "env,models,engine,learner,swap,rl_step"],
                          capture_output=True, text=True, timeout=900)
    rows = _json_lines(proc)
    ends = {r["item"]: r for r in rows if "ok" in r}
    assert set(ends) == {"env", "models", "engine", "learner", "swap", "rl_step"}, rows
    assert all(r["ok"] for r in ends.values()), ends
    engine = [r for r in rows if r["item"] == "engine_tiny"]
    assert {r["concurrency"] for r in engine} == {1, 4}, engine
    assert all(r["engine_tok_s"] > 0 and r["hf_generate_tok_s"] > 0 for r in engine), engine
    [learner] = [r for r in rows if r["item"] == "learner_tiny"]
    assert learner["tokens_per_s"] > 0 and learner["loss_finite"], learner
    [swap] = [r for r in rows if r["item"] == "swap" and "swap_s" in r]
    assert swap["swap_s"] > 0 and swap["plain_copy_s"] > 0, swap
    steps = [r for r in rows if r["item"] == "rl_step" and "seconds_per_step" in r]
    assert {r["max_head_offpolicyness"] for r in steps} == {0, 2}, steps
    assert all(r["trained_tokens_per_step"] > 0 for r in steps), steps


@pytest.mark.slow
def test_export_tokens_quick_run():
    """Word-problem episodes on the tiny model: the tree export feeds the learner fewer
    tokens than individual would, with the same loss tokens (a 3-turn chain, > 1.5x)."""
    proc = subprocess.run([sys.executable, str(BENCH / "export_tokens.py"), "--model", "tiny",
                           "--episodes", "2"], capture_output=True, text=True, timeout=300)
    [row] = _json_lines(proc)
    assert row["episodes"] == 2 and row["completions_per_episode"] == 3.0
    assert row["loss_tokens"] < row["tree_tokens"] < row["individual_tokens"]
    assert row["ratio_individual_vs_tree"] > 1.5


def test_core_split_quick_run():
    proc = subprocess.run([sys.executable, str(BENCH / "core_split.py"), "--seconds", "0.3",
                           "--cores", "2"], capture_output=True, text=True, timeout=120)
    rows = _json_lines(proc)
    assert [r["setting"] for r in rows] == ["shared", "split"]
    assert rows[1]["threads"] == {"learner": 1, "engine": 1}
    for r in rows:
        assert r["learner_frac"] > 0 and r["engine_frac"] > 0, r
        assert abs(r["sum"] - r["learner_frac"] - r["engine_frac"]) < 0.002, r  # rounding
