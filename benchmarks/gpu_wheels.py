"""Benchmark support: the wheels a lent GPU machine needs to run benchmarks/gpu_check.py.

That machine has PyTorch but no package index and an older transformers. Given its
`pip list --format=freeze` (one cheap first call there), this lists every distribution
that areal-lite, pytest and pytest-asyncio need (the dependency closure, read from this environment's
metadata, torch excluded) which the device lacks or has at another version, and
downloads exactly those wheels (`pip download --no-deps`, for the device's Python) into
`.gpu-wheels/`, printing one JSON line with their total size (carry limit: 64 MiB with
the worktree). `benchmarks/gpu_check.sh` installs them there with `--no-index`.

    python benchmarks/gpu_wheels.py DEVICE_FREEZE.txt --python-version 3.11 [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ["areal-lite", "pytest", "pytest-asyncio"]  # what gpu_check.py runs
# Not carried (nor their own dependencies): torch and what it brings; areal-lite itself
# (it travels as src/); matplotlib (PNG curves only, off in gpu_check) and uvloop (optional).
SKIP = {"torch", "triton", "sympy", "mpmath", "networkx", "areal-lite", "matplotlib", "uvloop"}


def closure(roots: list[str], extras: set[str]) -> dict[str, str]:
    """name -> installed version of every distribution the roots need here."""
    seen: dict[str, str] = {}
    todo = [(r, extras) for r in roots]
    while todo:
        name, want_extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen or (key in SKIP and key not in roots):
            continue
        dist = metadata.distribution(name)
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e})
                                         for e in want_extras | {""}):
                todo.append((req.name, set(req.extras)))
    return seen


def device_versions(freeze: Path) -> dict[str, str]:
    out = {}
    for line in freeze.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("freeze", type=Path, help="the device's `pip list --format=freeze` output")
    p.add_argument("--python-version", required=True, help="the device's, e.g. 3.11")
    p.add_argument("--dest", type=Path, default=Path(".gpu-wheels"))
    p.add_argument("--dry-run", action="store_true", help="list, download nothing")
    args = p.parse_args(argv)
    need = {n: v for n, v in closure(ROOTS, set()).items() if n not in SKIP}
    have = device_versions(args.freeze)
    missing = sorted(f"{n}=={v}" for n, v in need.items() if have.get(n) != v)
    if not args.dry_run and missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", args.python_version,
                        "--platform", "manylinux2014_x86_64", "--platform",
                        "manylinux_2_28_x86_64", "--platform", "any", "--implementation", "cp",
                        "-d", str(args.dest), *missing], check=True)
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) if args.dest.exists() else 0
    print(json.dumps({"bench": "gpu_wheels", "wheels": missing, "num_wheels": len(missing),
                      "size_mib": round(size / 2**20, 1), "dest": str(args.dest)}))


if __name__ == "__main__":
    main()
