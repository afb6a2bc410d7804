"""Tests for data/wordproblems.py: rows are right, and the eval split is held out twice
(its phrasing templates and its problems never appear in training)."""

from __future__ import annotations

import re
import string

import pytest

from areal_lite.data.prompts import gsm8k_final_answer, load_dataset_rows
from areal_lite.data.rewards import integer_reward
from areal_lite.data.wordproblems import (
    EVAL_TEMPLATES,
    KINDS,
    TRAIN_TEMPLATES,
    generate_word_problems,
    problem_key,
)

_RESULT = {"add": lambda a, b, c: a + b, "sub": lambda a, b, c: a - b,
           "mul": lambda a, b, c: a * b, "mul_add": lambda a, b, c: a * b + c,
           "add_sub": lambda a, b, c: a + b - c, "mul_sub": lambda a, b, c: a * b - c}


def _pattern(template: str) -> re.Pattern:
    """A regex matching every question `template` can produce; groups a, b, c (numbers)
    and name, item (words), each the same text wherever it recurs."""
    out, seen = "", set()
    for literal, field, _, _ in string.Formatter().parse(template):
        out += re.escape(literal)
        if field is not None:
            body = r"\d+" if field in ("a", "b", "c") else "[A-Za-z]+"
            out += f"(?P={field})" if field in seen else f"(?P<{field}>{body})"
            seen.add(field)
    return re.compile(out)


_ALL = [(split, kind, t, _pattern(text))
        for split, table in (("train", TRAIN_TEMPLATES), ("eval", EVAL_TEMPLATES))
        for kind, texts in table.items() for t, text in enumerate(texts)]


def _parse(question: str) -> list[tuple[str, str, int, tuple[int, int, int]]]:
    """Every template (split, kind, index) that produces `question`, with its numbers."""
    found = []
    for split, kind, t, pattern in _ALL:
        if m := pattern.fullmatch(question):
            nums = tuple(int(m.groupdict().get(k) or 0) for k in ("a", "b", "c"))
            found.append((split, kind, t, nums))
    return found


@pytest.fixture(scope="module")
def splits():
    train = [r for seed in (0, 1) for r in generate_word_problems(3000, seed=seed)]
    evals = [r for seed in (0, 1) for r in generate_word_problems(200, seed=seed, split="eval")]
    return train, evals


def test_every_kind_has_train_and_eval_templates_and_they_differ():
    assert set(TRAIN_TEMPLATES) == set(EVAL_TEMPLATES) == set(KINDS)
    assert {"add", "sub", "mul"} < set(KINDS) and len(KINDS) == 6
    train = {t for texts in TRAIN_TEMPLATES.values() for t in texts}
    evals = {t for texts in EVAL_TEMPLATES.values() for t in texts}
    assert len(train) == 24 and len(evals) == 12 and not train & evals


def test_no_eval_template_or_problem_appears_in_training(splits):
    """Each question is parsed back by the templates themselves: a train question is made
    by a train template only, an eval question by an eval template only, and no problem
    (kind + numbers) or question text of the eval split is in the train split."""
    train, evals = splits
    train_keys = set()
    for row in train:
        parses = _parse(row["question"])
        assert parses and {p[0] for p in parses} == {"train"}, row
        train_keys.update(problem_key(kind, *nums) for _, kind, _, nums in parses)
    for row in evals:
        parses = _parse(row["question"])
        assert parses and {p[0] for p in parses} == {"eval"}, row
        assert not {problem_key(kind, *nums) for _, kind, _, nums in parses} & train_keys, row
    assert not {r["question"] for r in train} & {r["question"] for r in evals}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_are_well_formed_and_their_answers_right(splits, split):
    rows = splits[0] if split == "train" else splits[1]
    for row in rows:
        (found_split, kind, t, nums), *_ = _parse(row["question"])
        assert row["kind"] == kind and row["template"] == f"{split}/{kind}/{t}"
        assert row["split"] == found_split == split
        answer = int(gsm8k_final_answer(row["answer"]))
        assert answer == _RESULT[kind](*nums) >= 0, row
        for step in row["answer"].split("\n")[:-1]:  # "x op y = z", all true and >= 0
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs) >= 0, row  # noqa: S307 (our own digits and ops)
        assert integer_reward(f"\\boxed{{{answer}}}", row["answer"]) == 1.0


def test_eval_split_asks_each_problem_once_and_mixes_levels():
    rows = generate_word_problems(120, seed=0, split="eval")
    keys = [problem_key(kind, *nums) for r in rows for _, kind, _, nums in _parse(r["question"])[:1]]
    assert len(set(keys)) == len(rows)
    assert {r["level"] for r in rows} == {0, 1, 2}
    assert {r["kind"] for r in rows} == set(KINDS)


def test_levels_weight_the_mix_and_generation_is_seeded():
    rows = generate_word_problems(400, seed=3, levels=(0, 0, 1, 2))
    assert [r["level"] for r in rows].count(0) == 200
    assert {r["kind"] for r in rows if r["level"] == 2} == {"mul_add", "add_sub", "mul_sub"}
    assert rows == generate_word_problems(400, seed=3, levels=(0, 0, 1, 2))
    assert rows != generate_word_problems(400, seed=4, levels=(0, 0, 1, 2))


def test_dataset_spec_and_bad_arguments():
    rows = load_dataset_rows("wordproblems:30:levels=2", split="test", seed=0)
    assert len(rows) == 30 and {r["level"] for r in rows} == {2}
    assert all(r["template"].startswith("eval/") for r in rows)
    assert len(load_dataset_rows("wordproblems", split="eval")) == 80
    with pytest.raises(ValueError, match="levels"):
        generate_word_problems(5, seed=0, levels=(3,))
    with pytest.raises(ValueError, match="split"):
        generate_word_problems(5, seed=0, split="dev")
    with pytest.raises(ValueError, match="wordproblems:<n>"):
        load_dataset_rows("wordproblems:many")
    with pytest.raises(ValueError, match="could only generate"):
        generate_word_problems(5000, seed=0, levels=(0,), split="eval")


@pytest.mark.parametrize(("text", "expected"), [
    ("so the answer is \\boxed{42}.", 1.0),
    ("\\boxed{4,2} hmm \\boxed{ 42 }", 1.0),  # the last box counts; spaces and commas go
    ("\\boxed{42.0}", 1.0),
    ("\\boxed{\\$42}", 1.0),
    ("\\boxed{42 \\text{ apples}}", 1.0),
    ("\\boxed{41}", 0.25),  # another integer: the format reward
    ("\\boxed{forty-two}", 0.0),
    ("42", 0.0),  # no box
    ("\\boxed{42", 0.0),  # unclosed: unboxed (unboxed_reward is 0 here)
])
def test_integer_reward(text, expected):
    assert integer_reward(text, "6 * 7 = 42\n#### 42", format_reward=0.25) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("6 * 7 = 42 apples.", 0.5),  # right, unboxed: the last number
    ("It is 1,042 or 42", 0.5),
    ("42 or 42.5", 0.0),
    ("42 is not it, 41", 0.0),
    ("\\boxed{41} but 42", 0.25),  # a boxed integer decides
    ("\\boxed{42}", 1.0),
    ("The answer is \\boxed{} 42.", 0.0),  # the instruction's empty box copied: no credit
    ("\\boxed{the answer} 42", 0.0),
    ("\\boxed{42", 0.0),  # an unclosed box is not an unboxed answer either
])
def test_integer_reward_unboxed(text, expected):
    assert integer_reward(text, "#### 42", format_reward=0.25, unboxed_reward=0.5) == expected


def test_integer_reward_pays_no_format_credit_for_a_copied_number():
    """A boxed wrong integer that is one of the question's numbers earns nothing: boxing
    the first number read is no attempt at the answer (a run learned exactly that)."""
    copied = {6, 7}
    assert integer_reward("6 * 7 = \\boxed{6}", "#### 42", 0.1, copied=copied) == 0.0
    assert integer_reward("6 * 7 = \\boxed{41}", "#### 42", 0.1, copied=copied) == 0.1
    assert integer_reward("\\boxed{42}", "#### 42", 0.1, copied={42}) == 1.0  # right is right
    assert integer_reward("\\boxed{7.0}", "#### 42", 0.1, copied=copied) == 0.0


def test_integer_reward_can_penalize_an_empty_box():
    """`empty_reward` is what a box with no integer earns (0.0 unless set): the
    instruction's `\\boxed{}` copied under a right answer must not tie with a right
    unboxed answer, nor be paid like one."""
    text = "19 + 7 = 26 marbles. The final answer is \\boxed{}."
    assert integer_reward(text, "#### 26", 0.1, 0.2) == 0.0
    assert integer_reward(text, "#### 26", 0.1, 0.2, empty_reward=-0.1) == -0.1
    assert integer_reward("\\boxed{ten}", "#### 10", 0.1, 0.2, empty_reward=-0.1) == -0.1
    assert integer_reward("19 + 7 = 26", "#### 26", 0.1, 0.2, empty_reward=-0.1) == 0.2
    assert integer_reward("\\boxed{25}", "#### 26", 0.1, 0.2, empty_reward=-0.1) == 0.1
    assert integer_reward("no number", "#### 26", 0.1, 0.2, empty_reward=-0.1) == 0.0


def test_integer_reward_needs_an_integer_reference():
    with pytest.raises(ValueError, match="integer reference"):
        integer_reward("\\boxed{1}", "#### 1/2")
