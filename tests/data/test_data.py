"""Tests for data.py: the generated arithmetic set, the loaders, and the resumable PromptStream."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.data.arithmetic import generate_arithmetic
from areal_lite.data.prompts import PromptStream, gsm8k_final_answer, load_dataset_rows

_STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# ---------------------------------------------------------------- generated arithmetic


def _check_row(row: dict) -> int:
    """Every worked step is true arithmetic and the final answer is the last step's result."""
    *steps, final = row["answer"].split("\n")
    assert final.startswith("#### ")
    result = int(final.removeprefix("#### "))
    for step in steps:
        a, op, b, c = _STEP.match(step).groups()
        assert _OPS[op](int(a), int(b)) == int(c) >= 0, step
    assert int(_STEP.match(steps[-1]).group(4)) == result >= 0
    return result


def _expression(question: str) -> str:
    """The arithmetic of a level-1/2 question, whatever its wording."""
    if m := re.fullmatch(r"Add (\d+) and (\d+)\.", question):
        return f"{m.group(1)} + {m.group(2)}"
    return re.fullmatch(r"[A-Za-z ]+ (\d+(?: [-+*] \d+)+)[.?]", question).group(1)


@given(st.integers(0, 2**32), st.sampled_from(["train", "eval"]))
@settings(max_examples=20, deadline=None)
def test_arithmetic_rows_are_well_formed_and_correct(seed, split):
    rows = generate_arithmetic(150, seed=seed, split=split)
    assert len(rows) == 150
    assert [r["level"] for r in rows[:6]] == [1, 2, 3, 1, 2, 3]
    assert len({r["question"] for r in rows}) == len({r["id"] for r in rows}) == 150
    for row in rows:
        assert set(row) == {"question", "answer", "level", "id"}
        result = _check_row(row)
        assert gsm8k_final_answer(row["answer"]) == str(result)
        if row["level"] < 3:  # the question's expression evaluates to the answer
            assert eval(_expression(row["question"])) == result  # noqa: S307 - digits and + - * only
        else:
            assert "How many" in row["question"]


def test_levels_differ_in_number_of_operations():
    rows = generate_arithmetic(60, seed=0)
    steps = {lv: {r["answer"].count("\n") for r in rows if r["level"] == lv} for lv in (1, 2, 3)}
    assert steps[1] == {1} and steps[2] == {2} and min(steps[3]) >= 2
    assert {r["level"] for r in generate_arithmetic(20, seed=0, levels=(2,))} == {2}


def test_arithmetic_is_deterministic_per_seed():
    assert generate_arithmetic(50, seed=3) == generate_arithmetic(50, seed=3)
    assert generate_arithmetic(50, seed=3) != generate_arithmetic(50, seed=4)


@given(st.integers(0, 10_000), st.integers(0, 10_000))
@settings(max_examples=15, deadline=None)
def test_train_and_eval_are_disjoint_whatever_the_seeds(train_seed, eval_seed):
    train = generate_arithmetic(600, seed=train_seed, split="train")
    evals = generate_arithmetic(60, seed=eval_seed, split="eval")
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    # disjoint as problems too, not just as strings: no expression is reworded across splits
    exprs = lambda rows: {_expression(r["question"]) for r in rows if r["level"] < 3}  # noqa: E731
    assert not exprs(train) & exprs(evals)


def test_arithmetic_errors_say_what_to_do():
    with pytest.raises(ValueError, match="levels"):
        generate_arithmetic(5, seed=0, levels=(4,))
    with pytest.raises(ValueError, match="split"):
        generate_arithmetic(5, seed=0, split="validation")
    with pytest.raises(ValueError, match="fewer rows or include more levels"):
        generate_arithmetic(1000, seed=0, levels=(1,), split="eval")


# ---------------------------------------------------------------- loaders


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("She has 3 + 4 = 7 pies.\n#### 1,234 ") == "1234"
    assert gsm8k_final_answer("a #### b #### 42") == "42"
    assert gsm8k_final_answer(" 42 ") == "42"


def test_load_arithmetic_specs():
    assert load_dataset_rows("arithmetic:40") == generate_arithmetic(40, seed=0)
    evals = generate_arithmetic(40, seed=2, split="eval")
    assert load_dataset_rows("arithmetic:40", split="eval", seed=2) == evals
    assert load_dataset_rows("arithmetic:12", split="test") == generate_arithmetic(12, seed=0, split="eval")
    assert len(load_dataset_rows("arithmetic")) == 2000
    assert {r["level"] for r in load_dataset_rows("arithmetic:30:levels=1,3")} == {1, 3}
    with pytest.raises(ValueError, match="arithmetic:<n>"):
        load_dataset_rows("arithmetic:many")


def test_load_jsonl_with_split_placeholder(tmp_path):
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_dataset_rows(str(tmp_path / "{split}.jsonl"), split="eval") == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_dataset_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_dataset_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_dataset_rows(str(tmp_path / "missing.jsonl"))


def test_load_parquet(tmp_path, monkeypatch):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_dataset_rows(str(path))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q", "answer": "#### 1"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_dataset_rows(str(path)) == rows


def test_hf_dataset_without_datasets_package_suggests_jsonl(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"openai/gsm8k.*pip install datasets.*jsonl"):
        load_dataset_rows("openai/gsm8k:main")


def test_hf_dataset_loads_or_explains(monkeypatch):
    calls = []

    def load_dataset(name, config, *, split):
        calls.append((name, config, split))
        if name == "offline/set":
            raise ConnectionError("hub unreachable")
        return [{"question": "q", "answer": "#### 3"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_dataset_rows("openai/gsm8k:main", split="eval") == [{"question": "q", "answer": "#### 3"}]
    assert calls == [("openai/gsm8k", "main", "test")]
    with pytest.raises(RuntimeError, match=r"'offline/set'.*hub unreachable.*jsonl"):
        load_dataset_rows("offline/set")


# ---------------------------------------------------------------- PromptStream


def _rows(n: int) -> list[dict]:
    return [{"i": i} for i in range(n)]


def _ids(batch: list[dict]) -> list[int]:
    return [r["i"] for r in batch]


@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 2**32), st.integers(1, 4))
def test_each_epoch_is_a_permutation(num_rows, batch_size, seed, num_epochs):
    stream = PromptStream(_rows(num_rows), batch_size=batch_size, seed=seed)
    batches = [_ids(next(stream)) for _ in range(-(-num_rows * num_epochs // batch_size))]
    assert all(len(b) == batch_size for b in batches)  # batches run on across epoch ends
    flat = [i for b in batches for i in b]
    for e in range(num_epochs):
        assert sorted(flat[e * num_rows : (e + 1) * num_rows]) == list(range(num_rows))


def test_order_depends_on_seed_and_epoch():
    a = PromptStream(_rows(50), batch_size=50, seed=1)
    b = PromptStream(_rows(50), batch_size=50, seed=1)
    c = PromptStream(_rows(50), batch_size=50, seed=2)
    first, second = _ids(next(a)), _ids(next(a))
    assert first == _ids(next(b)) and first != second and first != _ids(next(c))


@given(
    st.integers(1, 25), st.integers(1, 7), st.integers(0, 2**32), st.integers(0, 40), st.integers(1, 40)
)
def test_resume_yields_exactly_the_remaining_sequence(num_rows, batch_size, seed, num_before, num_after):
    reference = PromptStream(_rows(num_rows), batch_size=batch_size, seed=seed)
    expected = [_ids(next(reference)) for _ in range(num_before + num_after)][num_before:]

    killed = PromptStream(_rows(num_rows), batch_size=batch_size, seed=seed)
    for _ in range(num_before):
        next(killed)
    state = json.loads(json.dumps(killed.state_dict()))  # survives a checkpoint file
    assert set(state) >= {"epoch", "position", "seed"}

    resumed = PromptStream(_rows(num_rows), batch_size=batch_size, seed=seed + 1)  # seed comes from state
    resumed.load_state_dict(state)
    assert [_ids(next(resumed)) for _ in range(num_after)] == expected


@given(st.integers(2, 20), st.integers(0, 2**32), st.data())
def test_unfinished_draws_are_reissued_so_nothing_is_lost_or_repeated(num_rows, seed, data):
    stream = PromptStream(_rows(num_rows), batch_size=1, seed=seed)
    drawn = stream.draw(data.draw(st.integers(1, num_rows)))
    unfinished = data.draw(st.sets(st.sampled_from([d.cursor for d in drawn])))
    finished = [d.row["i"] for d in drawn if d.cursor not in unfinished]

    resumed = PromptStream(_rows(num_rows), batch_size=1, seed=seed)
    resumed.load_state_dict(stream.state_dict(unfinished=unfinished))
    redrawn = resumed.draw(len(unfinished))
    assert sorted(d.cursor for d in redrawn) == sorted(unfinished)  # re-issued first
    rest = [d.row["i"] for d in resumed.draw(num_rows - len(drawn))]
    assert sorted(finished + [d.row["i"] for d in redrawn] + rest) == list(range(num_rows))
    assert resumed.epoch == 1 and resumed.position == 0


def test_stream_state_errors():
    stream = PromptStream(_rows(5), batch_size=2, seed=0)
    next(stream)
    with pytest.raises(ValueError, match="already drawn"):
        stream.state_dict(unfinished=[7])
    other = PromptStream(_rows(6), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="same dataset"):
        other.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(_rows(3), batch_size=0, seed=0)


def test_level_zero_is_small_addition():
    from areal_lite.data.arithmetic import generate_arithmetic
    from areal_lite.data.prompts import gsm8k_final_answer

    rows = generate_arithmetic(30, seed=3, levels=(0,))
    for r in rows:
        a, b = (int(x) for x in r["question"].rstrip("?.").replace("Add ", "").replace(
            " and ", " + ").split(" ")[-3::2])
        assert 1 <= a <= 20 and 1 <= b <= 20
        assert int(gsm8k_final_answer(r["answer"])) == a + b
