"""The public API: a sorted, complete `__all__`, and the CLI's front door."""

import subprocess
import sys

import areal_lite


def test_all_is_sorted_and_importable():
    assert areal_lite.__all__ == sorted(areal_lite.__all__)
    for name in areal_lite.__all__:
        assert getattr(areal_lite, name) is not None


def test_cli_reports_config_errors_with_key_and_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[rollout]\ngroup_size = 0\n")
    proc = subprocess.run([sys.executable, "-m", "areal_lite.cli", "train", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rollout.group_size" in proc.stderr and "bad.toml" in proc.stderr
