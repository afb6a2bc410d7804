"""Data stage, generated set: grade-school arithmetic rows in GSM8K format, split by hash.

`generate_arithmetic(n, seed=..., split=...)` is what the dataset spec "arithmetic[:N]"
(in `data.py`) loads: distinct problems at levels 0-3, each with a worked solution
("<steps>\n#### N"); a problem's split ("train" or "eval") is fixed by the hash of its
key, so the two splits are disjoint whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

__all__ = ["generate_arithmetic"]

_EVAL_BUCKETS = 10  # one problem in this many belongs to the eval split
_MAX_MISSES = 20_000  # consecutive draws without a new problem before generation gives up

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
