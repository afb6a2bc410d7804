"""Data stage, generated set: grade-school word problems with held-out phrasings.

`generate_word_problems(n, seed=..., split=...)` is what the dataset spec
"wordproblems[:N][:levels=0,1,2]" (in `prompts.py`) loads. Six kinds of problem: one
step (`add`, `sub`, `mul`) and two steps (`mul_add`: a*b + c, `add_sub`: a + b - c,
`mul_sub`: a*b - c), each told through several phrasing templates. Levels: 0 = one step
with small numbers, 1 = one step with larger numbers, 2 = two steps.

The splits are disjoint twice over:
- **phrasing**: every kind has its own training templates (`TRAIN_TEMPLATES`) and
  evaluation templates (`EVAL_TEMPLATES`); a template is used by one split only, so the
  eval split asks in wordings the policy never trained on;
- **problem**: a problem's split is fixed by the hash of its key (kind and numbers, not
  names, items or wording), so an eval problem never appears in train, however worded.

Rows are GSM8K-shaped: {"question", "answer": "<steps>\\n#### N", "level", "kind",
"template", "split", "id"}; every worked step and answer is a non-negative integer. The worked
steps are never shown to the policy by the example agent; they are there for readers
and for recipes that want them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

__all__ = [
    "DEFAULT_WORD_PROBLEM_ROWS",
    "EVAL_TEMPLATES",
    "KINDS",
    "TRAIN_TEMPLATES",
    "generate_word_problems",
    "problem_key",
    "worked_steps",
]

DEFAULT_WORD_PROBLEM_ROWS = {"train": 3000, "eval": 80}  # rows per split for "wordproblems"
_EVAL_BUCKETS = 5  # one problem key in this many belongs to the eval split
_MAX_MISSES = 20_000  # consecutive draws without a new row before generation gives up

_NAMES = ("Tom", "Ana", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Ben",
          "Yuki", "Ivan", "Chloe", "Diego", "Fatima", "Hugo", "Nina", "Kofi", "Elsa")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books",
          "stamps", "buttons", "oranges", "crayons", "coins", "beads")

# Fields: {name}, {item}, {a}, {b}, {c}. The kind fixes the arithmetic (see `worked_steps`).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} has {a} {item}. {name} finds {b} more {item}. How many {item} does {name} have now?",
        "There are {a} {item} in a basket and {b} {item} on the table. How many {item} are there in all?",
        "{name} picked {a} {item} in the morning and {b} {item} in the afternoon. "
        "How many {item} did {name} pick altogether?",
        "A shop sold {a} {item} on Monday and {b} {item} on Tuesday. "
        "How many {item} did it sell in the two days?",
    ),
    "sub": (
        "{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
        "There were {a} {item} in a box. {b} were taken out. How many {item} are still in the box?",
        "{name} wants to collect {a} {item} and already has {b}. How many more {item} does {name} need?",
        "A class had {a} {item}. After {b} were used, how many {item} remained?",
    ),
    "mul": (
        "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
        "There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?",
        "Each box holds {b} {item}. How many {item} are in {a} boxes?",
        "{name} reads {b} pages every day for {a} days. How many pages does {name} read?",
    ),
    "mul_add": (
        "{name} has {a} boxes of {b} {item} and {c} loose {item}. How many {item} does {name} have?",
        "{name} earns {b} dollars an hour for {a} hours and gets a {c} dollar tip. "
        "How many dollars does {name} get in total?",
        "A bus makes {a} trips carrying {b} people each time, and {c} more people walk. "
        "How many people travel in all?",
        "There are {a} tables with {b} chairs each and {c} extra chairs. How many chairs are there?",
    ),
    "add_sub": (
        "{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have now?",
        "A library has {a} books. It buys {b} new books and gives away {c}. "
        "How many books does it have?",
        "There are {a} birds on a tree. {b} more arrive and then {c} fly away. "
        "How many birds are on the tree?",
        "{name} saved {a} dollars, earned {b} dollars more and spent {c} dollars. "
        "How many dollars are left?",
    ),
    "mul_sub": (
        "{name} buys {a} packs of {b} {item} and gives away {c}. How many {item} are left?",
        "A farmer plants {a} rows of {b} trees. {c} trees do not grow. How many trees grow?",
        "{name} bakes {a} trays of {b} cookies and eats {c} of them. How many cookies are left?",
        "A theater has {a} rows of {b} seats and {c} seats are taken. How many seats are free?",
    ),
}

# Held out: only the eval split uses these (questions first, other verbs and settings).
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "What is the total number of {item} if {name} owns {a} and a friend owns {b}?",
        "One jar holds {a} {item} and another jar holds {b} {item}. "
        "If they are poured together, how many {item} is that?",
    ),
    "sub": (
        "How many {item} remain when {b} are removed from a pile of {a}?",
        "{name} is {a} years old and a cousin is {b} years younger. How old is the cousin?",
    ),
    "mul": (
        "What do {a} tickets cost if one ticket costs {b} dollars?",
        "If one crate weighs {b} kilograms, how many kilograms do {a} crates weigh?",
    ),
    "mul_add": (
        "How many {item} are there in total if {a} children bring {b} {item} each "
        "and the teacher brings {c}?",
        "A garden has {a} flower beds with {b} tulips in each, plus {c} roses. "
        "How many flowers are in the garden?",
    ),
    "add_sub": (
        "A train leaves with {a} passengers. At the first stop {b} get on and {c} get off. "
        "How many passengers are on the train now?",
        "{name} began the week with {a} {item}, was given {b} and sold {c}. "
        "How many {item} does {name} have at the end of the week?",
    ),
    "mul_sub": (
        "{name} works {a} days and earns {b} dollars each day, then pays {c} dollars for lunch. "
        "How many dollars does {name} keep?",
        "What number of {item} is left when {c} are sold out of {a} crates holding {b} each?",
    ),
}

KINDS = tuple(TRAIN_TEMPLATES)
_LEVEL_KINDS = {0: ("add", "sub", "mul"), 1: ("add", "sub", "mul"), 2: ("mul_add", "add_sub", "mul_sub")}

_Numbers = tuple[int, int, int]  # (a, b, c); c = 0 for one-step kinds


def _numbers(rng: random.Random, kind: str, level: int) -> _Numbers:
    """Operands for `kind` at `level`; every intermediate result stays >= 0."""
    big = level >= 1
    if kind == "add":
        hi = 99 if big else 20
        return rng.randint(1, hi), rng.randint(1, hi), 0
    if kind == "sub":
        a = rng.randint(20, 99) if big else rng.randint(5, 20)
        return a, rng.randint(1, a - 1), 0
    if kind == "mul":
        return (rng.randint(2, 12), rng.randint(2, 12), 0) if big else (
            rng.randint(2, 5), rng.randint(2, 10), 0)
    if kind == "add_sub":
        a, b = rng.randint(5, 50), rng.randint(1, 30)
        return a, b, rng.randint(1, a + b)
    a, b = rng.randint(2, 9), rng.randint(2, 12)  # mul_add, mul_sub
    return a, b, rng.randint(1, a * b if kind == "mul_sub" else 30)


def worked_steps(kind: str, a: int, b: int, c: int = 0) -> tuple[list[str], int]:
    """The worked steps ("4 + 5 = 9") and the result of one problem of `kind`."""
    if kind == "add":
        return [f"{a} + {b} = {a + b}"], a + b
    if kind == "sub":
        return [f"{a} - {b} = {a - b}"], a - b
    if kind == "mul":
        return [f"{a} * {b} = {a * b}"], a * b
    if kind == "add_sub":
        return [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c
    sign, result = ("+", a * b + c) if kind == "mul_add" else ("-", a * b - c)
    return [f"{a} * {b} = {a * b}", f"{a * b} {sign} {c} = {result}"], result


def problem_key(kind: str, a: int, b: int, c: int = 0) -> str:
    """The split key of a problem: its kind and numbers (not its wording)."""
    return f"{kind}:{a},{b},{c}"


def _is_eval_key(key: str) -> bool:
    digest = hashlib.sha256(f"wordproblems:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _EVAL_BUCKETS == 0


def _check_args(n: int, levels: Sequence[int], split: str) -> str:
    split = "eval" if split == "test" else split
    if split not in ("train", "eval"):
        raise ValueError(f"wordproblems split must be 'train' or 'eval' (or 'test'), got {split!r}")
    if n < 0:
        raise ValueError(f"number of wordproblems rows must be >= 0, got {n}")
    if not levels or any(lv not in _LEVEL_KINDS for lv in levels):
        raise ValueError(f"wordproblems levels must be a non-empty list of 0, 1, 2; got {list(levels)}")
    return split


def generate_word_problems(
    n: int, *, seed: int, levels: Sequence[int] = (0, 1, 2), split: str = "train"
) -> list[dict]:
    """`n` word-problem rows of `split`, deterministic for (`seed`, `split`, `levels`).

    Levels cycle through `levels` (repeat a level to weight it: (0, 0, 1, 2) makes half
    the rows easy). Train rows use `TRAIN_TEMPLATES`, eval rows `EVAL_TEMPLATES`; a
    problem (kind + numbers) is eval iff its key hashes into one bucket of five. Within
    train a problem may appear in several wordings; within eval each problem appears once.
    """
    split = _check_args(n, levels, split)
    templates = EVAL_TEMPLATES if split == "eval" else TRAIN_TEMPLATES
    rng = random.Random(f"areal-lite-wordproblems:{seed}:{split}")
    rows: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(rows) < n and misses < _MAX_MISSES:
        level = levels[len(rows) % len(levels)]
        kind = rng.choice(_LEVEL_KINDS[level])
        a, b, c = _numbers(rng, kind, level)
        key = problem_key(kind, a, b, c)
        t = rng.randrange(len(templates[kind]))
        unique = key if split == "eval" else f"{key}:{t}"
        if unique in seen or _is_eval_key(key) != (split == "eval"):
            misses += 1
            continue
        seen.add(unique)
        misses = 0
        question = templates[kind][t].format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS),
                                             a=a, b=b, c=c)
        steps, result = worked_steps(kind, a, b, c)
        qid = hashlib.sha1(question.encode()).hexdigest()[:12]
        rows.append({"question": question, "answer": "\n".join(steps) + f"\n#### {result}",
                     "level": level, "kind": kind, "template": f"{split}/{kind}/{t}",
                     "split": split, "id": f"wp-{qid}"})
    if len(rows) == n:
        return rows
    raise ValueError(
        f"could only generate {len(rows)} distinct {split} word problems of levels "
        f"{list(levels)}, asked for {n}; ask for fewer rows or include more levels"
    )
