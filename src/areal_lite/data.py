"""Data stage: dataset rows (generated arithmetic, jsonl, parquet, HF) and the resumable prompt stream.

Rows are plain dicts handed unchanged to the agent workflow as its `data` argument.
GSM8K-format rows have `question` and `answer` ("<worked solution> #### N"); the built-in
generated arithmetic set uses the same format plus `level` (1-3) and a stable `id`.

`PromptStream` draws rows epoch by epoch in a seeded per-epoch shuffle. Its state
(`epoch`, `position`, `seed`, plus draws that were handed out but never finished) makes a
resumed run continue exactly where the killed one stopped: within an epoch no row is
repeated and none is skipped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_ARITHMETIC_ROWS",
    "Drawn",
    "PromptStream",
    "generate_arithmetic",
    "gsm8k_final_answer",
    "load_dataset_rows",
]

DEFAULT_ARITHMETIC_ROWS = {"train": 2000, "eval": 200}  # rows per split for spec "arithmetic"
_EVAL_BUCKETS = 10  # one problem in this many belongs to the eval split
_MAX_MISSES = 20_000  # consecutive draws without a new problem before generation gives up

# ---------------------------------------------------------------------------------------
# Generated grade-school arithmetic
# ---------------------------------------------------------------------------------------

_NAMES = ("Tom", "Ana", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Ben", "Yuki")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books")

# A problem is (split key, question, worked-solution steps, integer answer). The split key
# names the underlying problem (numbers and template, not names or wording), so a reworded
# eval problem can never show up in train.
_Problem = tuple[str, str, list[str], int]


def _level1(rng: random.Random) -> _Problem:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    form = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."))
    return f"1:{a}+{b}", form.format(a=a, b=b), [f"{a} + {b} = {a + b}"], a + b


def _level0(rng: random.Random) -> _Problem:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    form = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."))
    return f"0:{a}+{b}", form.format(a=a, b=b), [f"{a} + {b} = {a + b}"], a + b


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _level2(rng: random.Random) -> _Problem | None:
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    if op1 == op2 == "+":
        return None  # level 2 needs subtraction or multiplication
    near_mul = (op1 == "*", "*" in (op1, op2), op2 == "*")
    a, b, c = (rng.randint(2, 12) if m else rng.randint(1, 50) for m in near_mul)
    if op2 == "*" and op1 != "*":  # precedence: b * c first
        t = b * c
        steps, result = [f"{b} * {c} = {t}"], _apply(a, op1, t)
        steps.append(f"{a} {op1} {t} = {result}")
    else:
        t = _apply(a, op1, b)
        steps, result = [f"{a} {op1} {b} = {t}"], _apply(t, op2, c)
        steps.append(f"{t} {op2} {c} = {result}")
    if t < 0 or result < 0:
        return None
    expr = f"{a} {op1} {b} {op2} {c}"
    form = rng.choice(("What is {e}?", "Compute {e}.", "Evaluate {e}."))
    return f"2:{expr}", form.format(e=expr), steps, result


def _buy_and_give(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c, d = rng.randint(2, 30), rng.randint(2, 5), rng.randint(2, 10), rng.randint(1, 20)
    q = (f"{name} has {a} {item}, buys {b} bags of {c} {item} and gives away {d}. "
         f"How many {item} does {name} have now?")
    bought, total = b * c, a + b * c
    if total < d:
        return None
    steps = [f"{b} * {c} = {bought}", f"{a} + {bought} = {total}", f"{total} - {d} = {total - d}"]
    return f"3:buy:{a},{b},{c},{d}", q, steps, total - d


def _share(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c = rng.randint(10, 80), rng.randint(2, 6), rng.randint(2, 8)
    if a < b * c:
        return None
    q = (f"{name} has {a} {item} and gives {b} {item} to each of {c} friends. "
         f"How many {item} does {name} have left?")
    steps = [f"{b} * {c} = {b * c}", f"{a} - {b * c} = {a - b * c}"]
    return f"3:share:{a},{b},{c}", q, steps, a - b * c


def _boxes(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 15)
    if a * b < c:
        return None
    q = (f"A box holds {a} {item}. {name} fills {b} boxes and then loses {c} {item}. "
         f"How many {item} are left?")
    steps = [f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"]
    return f"3:boxes:{a},{b},{c}", q, steps, a * b - c


def _wages(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c = rng.randint(5, 20), rng.randint(2, 8), rng.randint(1, 40)
    if a * b < c:
        return None
    q = (f"{name} earns {a} dollars per hour and works for {b} hours, then spends {c} dollars "
         f"on {item}. How many dollars does {name} have left?")
    steps = [f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"]
    return f"3:wages:{a},{b},{c}", q, steps, a * b - c


def _reading(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c = rng.randint(5, 30), rng.randint(2, 7), rng.randint(1, 25)
    q = (f"{name} reads {a} pages a day for {b} days and then reads {c} more pages. "
         f"How many pages does {name} read in total?")
    steps = [f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"]
    return f"3:reading:{a},{b},{c}", q, steps, a * b + c


def _class(rng: random.Random, name: str, item: str) -> _Problem | None:
    a, b, c, d = rng.randint(15, 35), rng.randint(2, 10), rng.randint(2, 4), rng.randint(2, 6)
    q = (f"There are {a} students in a class. {b} students leave, and then {c} groups of "
         f"{d} students join. How many students are in the class now?")
    steps = [f"{a} - {b} = {a - b}", f"{c} * {d} = {c * d}", f"{a - b} + {c * d} = {a - b + c * d}"]
    return f"3:class:{a},{b},{c},{d}", q, steps, a - b + c * d


_WORD_PROBLEMS = (_buy_and_give, _share, _boxes, _wages, _reading, _class)


def _level3(rng: random.Random) -> _Problem | None:
    template = rng.choice(_WORD_PROBLEMS)
    return template(rng, rng.choice(_NAMES), rng.choice(_ITEMS))


_LEVELS = {0: _level0, 1: _level1, 2: _level2, 3: _level3}


def _is_eval_key(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % _EVAL_BUCKETS == 0


def _check_split(split: str) -> str:
    split = "eval" if split == "test" else split
    if split not in ("train", "eval"):
        raise ValueError(f"arithmetic split must be 'train' or 'eval' (or 'test'), got {split!r}")
    return split


def generate_arithmetic(
    n: int, *, seed: int, levels: Sequence[int] = (1, 2, 3), split: str = "train"
) -> list[dict]:
    """`n` distinct grade-school arithmetic rows, deterministic for (`seed`, `split`).

    Rows: {"question", "answer": "<steps>\\n#### N", "level", "id"}; levels cycle through
    `levels` (0: a + b with a, b <= 20; 1: a + b; 2: two operations incl. - or *; 3: short word problems); answers
    and every worked step are non-negative integers; no problem appears twice, however
    worded. A problem is "eval" iff the hash of its key (numbers and template, not names or
    wording) falls in one bucket of ten, so the splits are disjoint whatever the seeds.
    """
    split = _check_split(split)
    if n < 0:
        raise ValueError(f"number of arithmetic rows must be >= 0, got {n}")
    bad = [lv for lv in levels if lv not in _LEVELS]
    if bad or not levels:
        raise ValueError(f"arithmetic levels must be a non-empty subset of 0, 1, 2, 3; got {levels}")
    rng = random.Random(f"areal-lite-arithmetic:{seed}:{split}")
    rows: list[dict] = []
    seen: set[str] = set()  # split keys: each problem once, however worded
    misses = 0
    while len(rows) < n and misses < _MAX_MISSES:
        level = levels[len(rows) % len(levels)]
        problem = _LEVELS[level](rng)
        if problem is None or problem[0] in seen or _is_eval_key(problem[0]) != (split == "eval"):
            misses += 1
            continue
        key, question, steps, result = problem
        seen.add(key)
        misses = 0
        qid = hashlib.sha1(question.encode()).hexdigest()[:12]
        answer = "\n".join(steps) + f"\n#### {result}"
        rows.append({"question": question, "answer": answer, "level": level, "id": f"arith-{qid}"})
    if len(rows) == n:
        return rows
    raise ValueError(
        f"could only generate {len(rows)} distinct {split} arithmetic rows of levels "
        f"{list(levels)}, asked for {n}; ask for fewer rows or include more levels"
    )


def gsm8k_final_answer(answer: str) -> str:
    """The final answer of a GSM8K answer string: the text after the last "####", with
    thousands commas removed and whitespace stripped ("... #### 1,234" -> "1234").
    A string without "####" is treated as the final answer itself."""
    return answer.rpartition("####")[2].replace(",", "").strip()


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------


def _parse_arithmetic_spec(spec: str, split: str) -> tuple[int, tuple[int, ...]]:
    """"arithmetic[:<n>][:levels=1,2]" -> (n, levels)."""
    n, levels = DEFAULT_ARITHMETIC_ROWS[split], (1, 2, 3)
    for part in spec.split(":")[1:]:
        try:
            if part.startswith("levels="):
                levels = tuple(int(x) for x in part.removeprefix("levels=").split(","))
            else:
                n = int(part)
        except ValueError:
            raise ValueError(
                f"bad dataset spec {spec!r}: expected 'arithmetic', 'arithmetic:<n>' or "
                f"'arithmetic:<n>:levels=1,2'"
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
            f"dataset {spec!r} is neither 'arithmetic', a .jsonl nor a .parquet path, so it is "
            f"read from the Hugging Face hub, which needs `pip install datasets`; or save the "
            f"rows to a .jsonl file (one JSON object per line) and pass its path"
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
    - a path ending in .jsonl or .parquet ("{split}" in the path is replaced by `split`);
    - otherwise a Hugging Face dataset "name[:config]" (e.g. "openai/gsm8k:main"), split
      `split` ("eval" reads the "test" split), when `datasets` is installed and the hub
      reachable.
    """
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        split = _check_split(split)
        n, levels = _parse_arithmetic_spec(spec, split)
        return generate_arithmetic(n, seed=seed, levels=levels, split=split)
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
