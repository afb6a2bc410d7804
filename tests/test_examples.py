"""The shipped examples: their configs load, and the GSM8K and word-problem agents ask
and score as documented (through the real proxy, with the tiny model)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from areal_lite.config_toml import load_config
from areal_lite.data.arithmetic import _is_eval_key
from areal_lite.runtime import limit_malloc_growth

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.gsm8k.agent import EXAMPLES, MathAgent, build_messages  # noqa: E402
from examples.wordproblems.agent import HINT, HINTS, PROMPT, RETRY, WordProblemAgent  # noqa: E402


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.workflow or path.name == "rollout_demo.toml" or cfg.rollout.agent.mode == "online"


def test_cpu_examples_let_the_machine_pick_the_compute_dtype():
    """bf16 autocast only where it is faster (an AMX CPU): on AVX512-BF16 alone it made
    the learner ~1.7x slower, so neither CPU recipe forces it."""
    cfg = load_config(ROOT / "examples/gsm8k/cpu.toml")
    assert cfg.rollout.agent.agent_kwargs["few_shot"] >= 1
    assert cfg.train.compute_dtype == "fast"
    assert load_config(ROOT / "examples/wordproblems/cpu.toml").train.compute_dtype == "fast"


def test_build_messages_plain_and_few_shot():
    plain = build_messages("What is 1 + 1?")
    assert plain == [{"role": "user", "content": plain[0]["content"]}]
    assert "What is 1 + 1?" in plain[0]["content"] and "\\boxed{}" in plain[0]["content"]
    shot = build_messages("What is 1 + 1?", few_shot=2)
    assert [m["role"] for m in shot] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shot[-1]["content"] == "What is 1 + 1?"
    assert all("\\boxed{" in m["content"] for m in shot if m["role"] == "assistant")
    with pytest.raises(ValueError, match="few_shot"):
        MathAgent(few_shot=len(EXAMPLES) + 1)


def test_few_shot_examples_are_not_eval_problems():
    """A worked example in the prompt must not hand the model an eval answer."""
    import re

    for question, _ in EXAMPLES:
        a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
        for level in (0, 1):
            assert not _is_eval_key(f"{level}:{a}+{b}"), question


def test_limit_malloc_growth_applies_on_glibc_and_respects_the_env(monkeypatch):
    import os

    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        assert limit_malloc_growth() is False
        return
    assert limit_malloc_growth() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_malloc_growth() is True  # nothing left to set: the user's values stay


def test_learner_heap_takes_large_blocks_from_the_heap_then_restores_the_limit():
    """Inside `learner_heap` a 4 MiB malloc comes from the heap (no new mmapped bytes,
    glibc's mallinfo2); outside, under limit_malloc_growth's 1 MiB threshold, it is
    mmapped again."""
    import ctypes
    import os

    from areal_lite.runtime import learner_heap

    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("glibc only")
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                                   "hblkhd", "usmblks", "fsmblks",
                                                   "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mmapped_by_malloc(size: int) -> int:
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(size)
        grown = libc.mallinfo2().hblkhd - before
        libc.free(block)
        return grown

    assert limit_malloc_growth() is True
    assert mmapped_by_malloc(4 << 20) >= 4 << 20
    with learner_heap():
        assert mmapped_by_malloc(4 << 20) == 0
    assert mmapped_by_malloc(4 << 20) >= 4 << 20


async def test_math_agent_episode_through_the_proxy(tiny_model_dir, tmp_path):
    """One episode of the example agent against the tiny model: it runs, gets a reply and
    a reward in {0, 1}, and exports one sample whose prompt holds the worked example."""
    from areal_lite.config_toml import loads_config
    from areal_lite.rollout.stack import open_rollout

    cfg = loads_config(f"""
workflow = "examples.gsm8k.agent.MathAgent"
run_dir = "{tmp_path}"
[actor]
path = "{tiny_model_dir}"
device = "cpu"
[rollout.agent]
agent_kwargs = {{ max_tokens = 8, few_shot = 1 }}
[rollout.sampling]
max_new_tokens = 8
""")
    async with open_rollout(cfg) as stack:
        ep = await stack.controller.run_episode({"question": "What is 3 + 4?",
                                                 "answer": "3 + 4 = 7\n#### 7"})
        prompt_text = stack.tokenizer.decode(ep.samples[0].input_ids)
    assert not ep.failed and ep.reward in (0.0, 1.0)
    assert len(ep.samples) == 1 and "7 + 8 = 15" in prompt_text and "What is 3 + 4?" in prompt_text


# ---------------------------------------------------------------- the word-problem recipe

WORD_CPU = ROOT / "examples/wordproblems/cpu.toml"


def test_main_job_readme_command_runs_the_word_problem_recipe():
    readme = (ROOT / "README.md").read_text()
    assert "areal-lite train examples/wordproblems/cpu.toml" in readme
    cfg = load_config(WORD_CPU)
    assert cfg.workflow == "examples.wordproblems.agent.WordProblemAgent"
    assert cfg.data.train.startswith("wordproblems") and cfg.data.eval.startswith("wordproblems")
    assert cfg.rollout.agent.export_style == "tree"  # per-turn rewards, each prefix once
    assert 0 < cfg.rollout.agent.turn_discount < 1 and cfg.trainer.eval_solved_reward == 1.0
    WordProblemAgent(**cfg.rollout.agent.agent_kwargs)  # the kwargs are the agent's


def test_eval_prompt_has_no_worked_example():
    """The first turn of every eval row of the recipe is the question and the plain
    instruction: one user message, no system prompt, no example answer, no digits but
    the question's own, even with the worked-example hint forced on for training rows."""
    from areal_lite.data.prompts import load_dataset_rows

    cfg = load_config(WORD_CPU)
    agent = WordProblemAgent(**{**cfg.rollout.agent.agent_kwargs, "hint_prob": 1.0})
    assert not re.search(r"\d|=", PROMPT.format(question="")) and not re.search(r"\d|=", RETRY)
    for row in load_dataset_rows(cfg.data.eval, split="eval", seed=cfg.seed):
        messages = agent.first_messages(row)
        assert [m["role"] for m in messages] == ["user"], messages
        content = messages[0]["content"]
        assert content.startswith(row["question"]) and "\\boxed{}" in content
        assert re.findall(r"\d+", content) == re.findall(r"\d+", row["question"])
    train_row = load_dataset_rows("wordproblems:1", split="train", seed=0)[0]
    hinted = agent.first_messages(train_row)
    assert [m["role"] for m in hinted] == ["user", "assistant", "user"]
    assert hinted[1]["content"] == HINT[1] and "\\boxed{9}" in HINT[1]


def test_worked_example_share_falls_to_zero_over_training_episodes():
    """hint_decay_episodes: the hint share falls linearly with the training episodes
    begun (eval rows neither count nor ever get it) and is 0 after them."""
    agent = WordProblemAgent(hint_prob=1.0, hint_decay_episodes=4)
    train = {"question": "q", "split": "train"}
    evals = {"question": "q", "split": "eval"}
    shares = []
    for _ in range(6):
        shares.append(agent.current_hint_prob())
        assert len(agent.first_messages(evals)) == 1
        agent.first_messages(train)
    assert shares == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert all(len(agent.first_messages(train)) == 1 for _ in range(20))
    with pytest.raises(ValueError, match="hint_decay_episodes"):
        WordProblemAgent(hint_decay_episodes=-1)


def test_worked_example_share_falls_to_its_floor_and_is_drawn_per_question():
    """hint_floor: the share stops falling there. The draw is per question, so every
    episode of a question (a GRPO group) gets the same first prompt, and about the
    floor's share of questions keeps the worked example."""
    agent = WordProblemAgent(hint_prob=1.0, hint_decay_episodes=4, hint_floor=0.25)
    train = {"question": "q", "split": "train"}
    shares = []
    for _ in range(6):
        shares.append(agent.current_hint_prob())
        agent.first_messages(train)
    assert shares == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
    questions = [{"question": f"question {i}", "split": "train"} for i in range(400)]
    hinted = []
    for row in questions:
        group = {len(agent.first_messages(row)) for _ in range(8)}
        assert len(group) == 1  # one prompt for the whole group
        hinted.append(group == {3})
    assert 0.15 < sum(hinted) / len(hinted) < 0.35
    with pytest.raises(ValueError, match="hint_floor"):
        WordProblemAgent(hint_prob=0.2, hint_floor=0.3)


def test_agent_pays_no_format_credit_for_a_number_copied_from_the_question():
    agent = WordProblemAgent(format_reward=0.1)
    row = {"question": "Tom has 12 apples and finds 5 more. How many?", "answer": "#### 17"}
    assert agent.score("12 + 5 = \\boxed{12}", row, 0) == 0.0
    assert agent.score("12 + 5 = \\boxed{16}", row, 0) == 0.1
    assert agent.score("12 + 5 = \\boxed{17}", row, 0) == 1.0


def test_agent_can_penalize_the_instructions_empty_box():
    row = {"question": "Tom has 12 apples and finds 5 more. How many?", "answer": "#### 17"}
    agent = WordProblemAgent(format_reward=0.1, unboxed_reward=0.2, empty_box_reward=-0.1)
    assert agent.score("12 + 5 = 17. The answer is \\boxed{}.", row, 0) == -0.1
    assert agent.score("12 + 5 = 17.", row, 0) == 0.2
    assert WordProblemAgent().score("12 + 5 = 17. \\boxed{}", row, 0) == 0.0  # default
    with pytest.raises(ValueError, match="empty_box_reward"):
        WordProblemAgent(empty_box_reward=0.1)


def test_worked_example_is_a_training_problem_in_a_training_phrasing():
    from areal_lite.data.wordproblems import (
        TRAIN_TEMPLATES,
        _is_eval_key,
        problem_key,
        worked_steps,
    )

    template = TRAIN_TEMPLATES["add"][0]
    assert HINT == HINTS["add"] and HINT[0] == template.format(name="Tom", item="apples", a=4, b=5)
    assert HINT[1] == "4 + 5 = 9. The answer is \\boxed{9}."
    assert set(HINTS) == set(TRAIN_TEMPLATES)
    for kind, (question, answer) in HINTS.items():
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        a, b, c = (numbers + [0])[:3]
        assert question == TRAIN_TEMPLATES[kind][0].format(name="Tom", item="apples", a=a, b=b, c=c)
        assert not _is_eval_key(problem_key(kind, a, b, c)), kind
        steps, result = worked_steps(kind, a, b, c)
        assert answer == ". ".join(steps) + f". The answer is \\boxed{{{result}}}."


def test_worked_example_matches_the_question_kind():
    """A hinted training question is shown the worked example of its own kind (a product
    before a product) with `hint_by_kind`; without it, or for a row without a kind, the
    addition."""
    from areal_lite.data.prompts import load_dataset_rows

    agent = WordProblemAgent(hint_prob=1.0, hint_by_kind=True)
    rows = load_dataset_rows("wordproblems:60", split="train", seed=3)
    assert all(WordProblemAgent(hint_prob=1.0).first_messages(r)[1]["content"] == HINT[1]
               for r in rows)
    assert len({r["kind"] for r in rows}) == 6
    for row in rows:
        messages = agent.first_messages(row)
        assert messages[1]["content"] == HINTS[row["kind"]][1]
        assert messages[0]["content"] == PROMPT.format(question=HINTS[row["kind"]][0])
    bare = agent.first_messages({"question": "1 + 2?", "answer": "#### 3", "split": "train"})
    assert bare[1]["content"] == HINT[1]


def _word_cfg(tiny_model_dir, tmp_path, max_tokens: int = 6, hint_prob: float = 0.0,
              style: str = "individual"):
    from areal_lite.config_toml import loads_config

    return loads_config(f"""
workflow = "examples.wordproblems.agent.WordProblemAgent"
run_dir = "{tmp_path}"
[actor]
path = "{tiny_model_dir}"
device = "cpu"
[rollout.agent]
turn_discount = 0.5
export_style = "{style}"
agent_kwargs = {{ max_tokens = {max_tokens}, format_reward = 0.1, hint_prob = {hint_prob} }}
[rollout.sampling]
max_new_tokens = {max_tokens}
""")


async def test_word_problem_agent_retries_three_turns_through_the_proxy(tiny_model_dir, tmp_path):
    """The tiny random model never boxes the answer: the agent asks three times, each
    turn continues the previous one's exact tokens (a chain in the tree, the worked
    example of a training row included), the retry message is in the later prompts, and
    each completion has its own reward."""
    from areal_lite.rollout.stack import open_rollout

    row = {"question": "Tom has 3 apples and finds 4 more. How many apples does Tom have now?",
           "answer": "3 + 4 = 7\n#### 7", "split": "train"}
    async with open_rollout(_word_cfg(tiny_model_dir, tmp_path, hint_prob=1.0)) as stack:
        ep = await stack.controller.run_episode(row)
        prompts = [stack.tokenizer.decode(s.input_ids[: s.loss_mask.index(1)]) for s in ep.samples]
    assert not ep.failed and ep.num_completions == 3 and len(ep.samples) == 3
    for parent, child in zip(ep.samples, ep.samples[1:]):
        assert child.input_ids[: len(parent.input_ids)] == parent.input_ids
    assert prompts[0].count(RETRY) == 0 and prompts[1].count(RETRY) == 1 and prompts[2].count(RETRY) == 2
    assert prompts[0].count(row["question"]) == 1 and prompts[0].count(HINT[1]) == 1
    assert len({s.completion_ids[0] for s in ep.samples}) == 3
    assert all(s.raw_reward == 0.0 for s in ep.samples)


class _SolvesOnTurn(WordProblemAgent):
    """The real agent loop, scored by the row: right exactly on turn `solve_on_turn`."""

    def score(self, text, data, turn):
        return 1.0 if turn + 1 == data["solve_on_turn"] else 0.1


@pytest.mark.parametrize("style", ["individual", "tree"])
async def test_turn_rewards_discount_and_first_try_within_3_metrics(tiny_model_dir, tmp_path,
                                                                    style):
    """Per-turn rewards keyed by completion id flow through the turn discount, and the
    trainer's eval reports first-try and solved-within-3 accuracy from them (a sample per
    turn, or the spans of the episode's one tree sample)."""
    from areal_lite.rollout.stack import open_rollout
    from areal_lite.trainer import Trainer

    cfg = _word_cfg(tiny_model_dir, tmp_path, max_tokens=3, style=style)
    rows = [{"question": f"q{k}", "answer": "#### 1", "solve_on_turn": k} for k in (1, 2, 2, 4)]
    async with open_rollout(cfg, _SolvesOnTurn(max_tokens=3)) as stack:
        ep = await stack.controller.run_episode(rows[1])
        metrics = await Trainer(cfg)._evaluate(stack.controller, rows)
    turns = ep.samples if style == "individual" else ep.samples[0].spans
    assert len(ep.samples) == (2 if style == "individual" else 1)
    assert [s.raw_reward for s in turns] == [0.1, 1.0]  # stopped once right
    assert turns[0].reward == pytest.approx(0.1 + 0.5 * 1.0) and turns[1].reward == 1.0
    assert metrics["eval/first_try"] == 0.25 and metrics["eval/within_3"] == 0.75
    assert metrics["eval/turns"] == (1 + 2 + 2 + 3) / 4 and metrics["eval/num_failed"] == 0.0


@pytest.mark.slow
def test_async_vs_sync_benchmark_quick_run():
    """benchmarks/async_vs_sync.py on the tiny model: one step row per (eta, step) with the
    eval's first-try/within-3 on every eval step, and a summary per eta with its ratio."""
    import json
    import subprocess

    script = ROOT / "benchmarks" / "async_vs_sync.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--model", "tiny", "--steps", "2", "--eval-every", "1",
         "--eval-rows", "2", "--etas", "0,3", "--set", "rollout.batch_size=2",
         "--set", "rollout.group_size=2", "--set", "rollout.sampling.max_new_tokens=4",
         "--set", "rollout.agent.agent_kwargs={max_tokens=4}",
         "--set", "train.compute_dtype=float32"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = [(r["eta"], r["step"]) for r in rows if r["measure"] == "step"]
    assert steps == [(0, 0), (0, 1), (0, 2), (3, 0), (3, 1), (3, 2)]
    for r in rows:
        if r["measure"] == "step":
            assert r["eval_first_try"] == 0.0 and r["eval_within_3"] == 0.0 and r["wall_s"] > 0
    runs = {r["eta"]: r for r in rows if r["measure"] == "run"}
    assert set(runs) == {0, 3} and all(r["steps"] == 2 for r in runs.values())
    assert runs[3]["wall_ratio_vs_sync"] == pytest.approx(runs[3]["wall_s"] / runs[0]["wall_s"])
    assert runs[3]["first_try_delta_vs_sync"] == 0.0
