"""The public API: a sorted, complete, lazy `__all__`, and the CLI's front door."""

import json
import subprocess
import sys

import pytest

import areal_lite

HEAVY = ("torch", "transformers", "aiohttp")


def test_all_is_sorted_and_importable():
    assert areal_lite.__all__ == sorted(areal_lite.__all__)
    for name in areal_lite.__all__:
        assert getattr(areal_lite, name) is not None
    assert set(areal_lite._HOMES) == set(areal_lite.__all__)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Trianer'"):
        areal_lite.Trianer  # noqa: B018


def _loaded_after(statement: str) -> dict[str, bool]:
    code = (f"import sys; {statement}; import json; "
            f"print(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["areal_lite", "areal_lite.cache", "areal_lite.export",
                                    "areal_lite.config", "areal_lite.config_toml",
                                    "areal_lite.types", "areal_lite.proxy.parsers"])
def test_pure_modules_import_no_heavy_package(module):
    loaded = _loaded_after(f"import {module}")
    assert not any(loaded.values()), f"import {module} loaded {[m for m, v in loaded.items() if v]}"


def test_a_name_that_needs_torch_loads_it_on_first_use():
    loaded = _loaded_after("import areal_lite; areal_lite.Learner")
    assert loaded["torch"]
    assert not _loaded_after("from areal_lite import ConfigError, InteractionCache, Sample")["torch"]


def test_cli_reports_config_errors_with_key_and_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[rollout]\ngroup_size = 0\n")
    proc = subprocess.run([sys.executable, "-m", "areal_lite.cli", "train", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rollout.group_size" in proc.stderr and "bad.toml" in proc.stderr
