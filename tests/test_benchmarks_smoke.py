"""Smoke test of benchmarks/rollout_overhead.py: a tiny run, every line valid, no errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_overhead.py"
KEYS = {"variant", "agents", "turns", "calls", "requests_per_s", "added_latency_ms_p50",
        "added_latency_ms_p99", "latency_ms_p50", "latency_ms_p99", "cpu_ms_per_call",
        "peak_rss_mb", "errors"}


def test_rollout_overhead_quick_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--agents", "1,4", "--turns", "1",
                           "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    variants = {"sdk_ceiling", "sdk_ceiling_inproc", "floor", "proxy", "proxy_tcp",
                "proxy_new_client"}
    assert {(r["variant"], r["agents"]) for r in rows} == {
        (v, n) for v in variants for n in (1, 4)}
    for row in rows:
        assert KEYS <= row.keys(), row
        assert row["errors"] == 0, row
        assert row["calls"] >= 1 and row["requests_per_s"] > 0, row
        assert row["added_latency_ms_p50"] is not None, row  # sdk_ceiling ran first
