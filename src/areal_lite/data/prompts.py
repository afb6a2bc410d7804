"""Data stage: dataset rows (generated sets, jsonl, parquet, HF) and the resumable prompt stream.

Rows are plain dicts handed unchanged to the agent workflow as its `data` argument.
GSM8K-format rows have `question` and `answer` ("<worked solution> #### N"); the built-in
generated sets use the same format plus `level` and a stable `id`: arithmetic
(`arithmetic.py`) and word problems with held-out eval phrasings (`wordproblems.py`).

`PromptStream` draws rows epoch by epoch in a seeded per-epoch shuffle. Its state
(`epoch`, `position`, `seed`, plus draws that were handed out but never finished) makes a
resumed run continue exactly where the killed one stopped: within an epoch no row is
repeated and none is skipped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from areal_lite.data.arithmetic import _check_split, generate_arithmetic
from areal_lite.data.wordproblems import (
    DEFAULT_WORD_PROBLEM_ROWS,
    generate_word_problems,
)

__all__ = [
    "DEFAULT_ARITHMETIC_ROWS",
    "Drawn",
    "PromptStream",
    "gsm8k_final_answer",
    "load_dataset_rows",
]

DEFAULT_ARITHMETIC_ROWS = {"train": 2000, "eval": 200}  # rows per split for spec "arithmetic"


def gsm8k_final_answer(answer: str) -> str:
    """The final answer of a GSM8K answer string: the text after the last "####", with
    thousands commas removed and whitespace stripped ("... #### 1,234" -> "1234").
    A string without "####" is treated as the final answer itself."""
    return answer.rpartition("####")[2].replace(",", "").strip()


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


def _parse_generated_spec(spec: str, n: int, levels: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """"<set>[:<n>][:levels=1,2]" -> (n, levels); `n` and `levels` are the defaults."""
    name = spec.partition(":")[0]
    for part in spec.split(":")[1:]:
        try:
            if part.startswith("levels="):
                levels = tuple(int(x) for x in part.removeprefix("levels=").split(","))
            else:
                n = int(part)
        except ValueError:
            raise ValueError(
                f"bad dataset spec {spec!r}: expected '{name}', '{name}:<n>' or "
                f"'{name}:<n>:levels=1,2'"
            ) from None
    return n, levels


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                kind = type(row).__name__
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object, got {kind}")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow: `pip install pyarrow` (or convert the file to .jsonl)"
        ) from None
    return pq.read_table(path).to_pylist()


def _load_hf(spec: str, split: str) -> list[dict]:
    name, _, config = spec.partition(":")
    hf_split = "test" if split == "eval" else split
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"dataset {spec!r} is neither 'arithmetic', 'wordproblems', a .jsonl nor a .parquet "
            f"path, so it is read from the Hugging Face hub, which needs `pip install "
            f"datasets`; or save the rows to a .jsonl file (one JSON object per line) and "
            f"pass its path"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as e:  # network, auth, unknown name: say what to do instead
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config {config or None!r}, split "
            f"{hf_split!r}): {e}. If the hub is unreachable, save the rows to a .jsonl file "
            f"and pass its path instead"
        ) from e
    return [dict(row) for row in ds]


def load_dataset_rows(spec: str, *, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows of a dataset named by `spec`:

    - "arithmetic", "arithmetic:<n>", "arithmetic:<n>:levels=1,2": generated (split
      "train" or "eval"/"test"; `seed` picks the sample);
    - "wordproblems[:<n>][:levels=0,1,2]": generated word problems, the same way (the
      eval split uses phrasing templates the train split never uses);
    - a path ending in .jsonl or .parquet ("{split}" in the path is replaced by `split`);
    - otherwise a Hugging Face dataset "name[:config]" (e.g. "openai/gsm8k:main"), split
      `split` ("eval" reads the "test" split), when `datasets` is installed and the hub
      reachable.
    """
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        split = _check_split(split)
        n, levels = _parse_generated_spec(spec, DEFAULT_ARITHMETIC_ROWS[split], (1, 2, 3))
        return generate_arithmetic(n, seed=seed, levels=levels, split=split)
    if spec == "wordproblems" or spec.startswith("wordproblems:"):
        split = _check_split(split)
        n, levels = _parse_generated_spec(spec, DEFAULT_WORD_PROBLEM_ROWS[split], (0, 1, 2))
        return generate_word_problems(n, seed=seed, levels=levels, split=split)
    if spec.endswith((".jsonl", ".parquet")):
        path = Path(spec.replace("{split}", split)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {path} does not exist (dataset spec {spec!r})")
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
    else:
        rows = _load_hf(spec, split)
    if not rows:
        raise ValueError(f"dataset {spec!r} (split {split!r}) has no rows")
    return rows


# ---------------------------------------------------------------------------------------
# Prompt stream
# ---------------------------------------------------------------------------------------


class Drawn(NamedTuple):
    """One row handed out by `PromptStream.draw`."""

    cursor: int  # global draw number: epoch * num_rows + position within the epoch
    row: dict


class PromptStream:
    """Endless seeded stream of dataset rows, epoch after epoch, resumable exactly.

    Epoch `e` visits every row once, in the order of a shuffle seeded by (`seed`, `e`);
    a batch that runs past the end of an epoch continues into the next one, so every
    batch has `batch_size` rows. `state_dict()` taken after some draws and loaded into a
    fresh stream over the same rows yields exactly the rows not drawn yet. Rows that were
    drawn but not finished when the state was taken (e.g. episodes still running) can be
    passed as `unfinished` cursors; the resumed stream hands them out again first.
    """

    def __init__(self, rows: Sequence[dict], *, batch_size: int, seed: int) -> None:
        if not rows:
            raise ValueError("PromptStream needs at least one row; the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self._cursor = 0  # draws so far (not counting re-issued unfinished ones)
        self._pending: list[int] = []  # cursors to re-issue before new draws
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    @property
    def epoch(self) -> int:
        return self._cursor // len(self._rows)

    @property
    def position(self) -> int:
        return self._cursor % len(self._rows)

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(len(self._rows)))
            random.Random(f"areal-lite-prompts:{self.seed}:{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def row_at(self, cursor: int) -> dict:
        """The row of global draw number `cursor` (pure function of seed and cursor)."""
        epoch, position = divmod(cursor, len(self._rows))
        return self._rows[self._order_of(epoch)[position]]

    def draw(self, k: int = 1) -> list[Drawn]:
        """The next `k` rows with their cursors: re-issued unfinished rows first."""
        out = []
        for _ in range(k):
            if self._pending:
                cursor = self._pending.pop(0)
            else:
                cursor, self._cursor = self._cursor, self._cursor + 1
            out.append(Drawn(cursor, self.row_at(cursor)))
        return out

    def next_batch(self) -> list[dict]:
        return [d.row for d in self.draw(self.batch_size)]

    def __iter__(self) -> Iterator[list[dict]]:
        return self

    def __next__(self) -> list[dict]:
        return self.next_batch()

    def state_dict(self, *, unfinished: Iterable[int] = ()) -> dict[str, Any]:
        """Resumable state; `unfinished`: cursors drawn but not done, to be re-issued."""
        extra = sorted(set(unfinished) - set(self._pending))
        if any(not 0 <= c < self._cursor for c in extra):
            raise ValueError(f"unfinished cursors must be ones already drawn (< {self._cursor}), got {extra}")
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": len(self._rows),
            "unfinished": self._pending + extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        num_rows = state.get("num_rows", len(self._rows))
        if num_rows != len(self._rows):
            raise ValueError(
                f"prompt stream state was saved over {num_rows} rows but the dataset has "
                f"{len(self._rows)}; resume with the same dataset (or start a new trial)"
            )
        if not 0 <= state["position"] < len(self._rows) or state["epoch"] < 0:
            raise ValueError(f"bad prompt stream state: epoch {state['epoch']}, position {state['position']}")
        self.seed = state["seed"]
        self._cursor = state["epoch"] * len(self._rows) + state["position"]
        self._pending = [int(c) for c in state.get("unfinished", [])]
        self._order_epoch = -1
