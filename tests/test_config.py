"""Config tree: TOML + overrides -> ExperimentConfig, error messages, TOML round trip."""

from __future__ import annotations

import inspect
import math
import string
import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from areal_lite import config as config_mod
from areal_lite.config import (
    AgentConfig,
    ConfigError,
    ExperimentConfig,
    RolloutConfig,
    run_path,
)
from areal_lite.config_toml import (
    config_to_toml,
    load_config,
    loads_config,
    validate_config,
)

SCHEMA = msgspec.inspect.type_info(ExperimentConfig)


def _structs(schema=SCHEMA, prefix=()):
    """(dotted prefix, StructType) for the root and every section below it."""
    yield prefix, schema
    for f in schema.fields:
        if isinstance(f.type, msgspec.inspect.StructType):
            yield from _structs(f.type, prefix + (f.name,))


def _leaves(kinds):
    """(dotted key, inspect type) of every non-section field whose type is in `kinds`."""
    return [
        (".".join(prefix + (f.name,)), f.type)
        for prefix, s in _structs()
        for f in s.fields
        if isinstance(f.type, kinds)
    ]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _error(text="", overrides=(), source="config.toml") -> str:
    with pytest.raises(ConfigError) as info:
        loads_config(text, overrides, source=source)
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.actor.path == "smollm2-135m-instruct"
    assert (cfg.rollout.batch_size, cfg.rollout.group_size) == (8, 4)
    assert cfg.rollout.agent.mode == "inline" and cfg.rollout.agent.agent_kwargs == {}
    assert cfg.rollout.backend == "local" and cfg.rollout.sglang.urls == []
    assert cfg.scheduler.type == "local"
    assert run_path(cfg) == cfg.run_path == Path("runs/areal-lite/trial0")


def test_mutable_defaults_are_not_shared():
    a, b = ExperimentConfig(), ExperimentConfig()
    a.rollout.agent.agent_kwargs["x"] = 1
    a.rollout.sglang.urls.append("http://a:1")
    assert b.rollout.agent.agent_kwargs == {} and b.rollout.sglang.urls == []


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        'experiment_name = "math"\n'
        "[rollout]\nbatch_size = 16\ngroup_size = 2\n"
        '[rollout.agent]\nmode = "subproc"\nturn_discount = 0.9\n'
    )
    cfg = load_config(path, ["rollout.batch_size=32", "rollout.batch_size=64", "trial_name=t7"])
    assert cfg.rollout.batch_size == 64  # the last override wins
    assert cfg.rollout.group_size == 2  # file value kept
    assert cfg.rollout.agent.mode == "subproc" and cfg.rollout.agent.turn_discount == 0.9
    assert cfg.run_path == Path("runs/math/t7")
    assert load_config(str(path)) == load_config(path)


def test_override_values_are_toml_else_strings():
    cfg = loads_config(
        "",
        [
            "rollout.agent.mode=subproc",
            "actor.path=/models/x",
            'rollout.sglang.urls=["http://a:1","http://b:2"]',
            "rollout.backend=sglang",
            "rollout.proxy.chat_template_kwargs={enable_thinking=false}",
            "rollout.agent.agent_kwargs.max_turns=3",
            "trial_name=12",  # a string field keeps the text even though 12 parses as int
            "rollout.sampling.temperature=0",  # int accepted for a float field
            "actor.gradient_checkpointing = true",
            "workflow=",
        ],
    )
    assert cfg.rollout.agent.mode == "subproc"
    assert cfg.actor.path == "/models/x"
    assert cfg.rollout.sglang.urls == ["http://a:1", "http://b:2"]
    assert cfg.rollout.proxy.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.rollout.agent.agent_kwargs == {"max_turns": 3}
    assert cfg.trial_name == "12"
    assert cfg.rollout.sampling.temperature == 0.0
    assert isinstance(cfg.rollout.sampling.temperature, float)
    assert cfg.actor.gradient_checkpointing is True
    assert cfg.workflow == ""


def test_override_replaces_a_table_and_quoted_keys_work():
    text = "[rollout.proxy.chat_template_kwargs]\nb = 2\n"
    overrides = ["rollout.proxy.chat_template_kwargs={a=1}", 'rollout.agent.agent_kwargs."x.y"=1']
    cfg = loads_config(text, overrides)
    assert cfg.rollout.proxy.chat_template_kwargs == {"a": 1}
    assert cfg.rollout.agent.agent_kwargs == {"x.y": 1}


def test_alias_agent_module_path():
    assert loads_config('agent_module_path = "pkg.mod:Agent"').workflow == "pkg.mod:Agent"
    same = loads_config('workflow = "a.B"\nagent_module_path = "a.B"')
    assert same.workflow == "a.B" and same.agent_module_path == ""
    assert ExperimentConfig(agent_module_path="a.B").workflow == "a.B"
    msg = _error('workflow = "a.B"\nagent_module_path = "c.D"')
    assert "workflow" in msg and "agent_module_path" in msg and "(config.toml)" in msg
    msg = _error('agent_module_path = "c.D"', ["workflow=a.B"])
    assert "override 'workflow=a.B'" in msg and "config.toml" in msg


def test_sglang_backend_needs_urls():
    cfg = loads_config('[rollout]\nbackend = "sglang"\n[rollout.sglang]\nurls = ["http://h:30000"]')
    assert cfg.rollout.sglang.urls == ["http://h:30000"]
    msg = _error('[rollout]\nbackend = "sglang"')
    assert msg.startswith("rollout.sglang.urls ") and "rollout.backend = 'sglang'" in msg
    assert msg.endswith("(config.toml)")
    with pytest.raises(ConfigError, match="sglang.urls"):
        RolloutConfig(backend="sglang")  # the same rule holds for configs built in code


def test_validate_config_rechecks_code_mutations():
    cfg = ExperimentConfig()
    cfg.rollout.group_size = 0
    with pytest.raises(ConfigError, match=r"^rollout.group_size must be >= 1, got 0 \(in code\)"):
        validate_config(cfg)
    assert validate_config(ExperimentConfig(seed=5)) == ExperimentConfig(seed=5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("[rollout]\ngroup_size = 0", [], "rollout.group_size must be >= 1, got 0 (config.toml)"),
        (
            "[rollout]\nagnet = 1",
            [],
            "unknown key 'rollout.agnet' in config.toml (did you mean 'rollout.agent'?)",
        ),
        (
            '[rollout.agent]\nmode = "thread"',
            [],
            "rollout.agent.mode must be one of 'inline', 'subproc', 'online', got 'thread' (config.toml)",
        ),
        (
            "",
            ["rollout.batch_size=abc"],
            "rollout.batch_size: expected int, got str (override 'rollout.batch_size=abc')",
        ),
        (
            "",
            ["rollout.agnet.mode=subproc"],
            "unknown key 'rollout.agnet' in command-line override 'rollout.agnet.mode=subproc'"
            " (did you mean 'rollout.agent'?)",
        ),
        (
            "",
            ["rollout.agent.turn_discount=1.5"],
            "rollout.agent.turn_discount must be <= 1.0, got 1.5 "
            "(override 'rollout.agent.turn_discount=1.5')",
        ),
        ("[rollout.sampling]\ntop_p = 0", [], "rollout.sampling.top_p must be > 0.0, got 0"),
        ("[rollout.sampling]\ntop_k = 0", [], "rollout.sampling.top_k must be -1"),
        ("[rollout.proxy]\nport = 70000", [], "rollout.proxy.port must be <= 65535, got 70000"),
        ("[actor]\ngradient_checkpointing = 1", [], "actor.gradient_checkpointing: expected bool"),
        ("[rollout]\nbatch_size = true", [], "rollout.batch_size: expected int, got bool"),
        ("[rollout]\nbatch_size = 8.0", [], "rollout.batch_size: expected int, got float"),
        ("rollout = 3", [], "rollout: expected table, got int (config.toml)"),
        ("[rollout.sglang]\nurls = [1]", [], "rollout.sglang.urls[0]: expected str, got int"),
        ('[rollout.sglang]\nurls = ["h:1"]', [], "rollout.sglang.urls[0] must start with http"),
        ('[actor]\ndtype = "fp8"', [], "actor.dtype must be one of 'auto', 'float32', "),
        ("[scheduler]\nnodes = 2", [], "scheduler.nodes must be 1 when scheduler.type = 'local'"),
        ('trial_name = "a/b"', [], "trial_name must be a directory name"),
        ('[rollout.sglang]\nurls = ["{0}"]', [], "rollout.sglang.urls[0] must start with http"),
        ('workflow = "a{"\nagent_module_path = "b}"', [], "workflow = 'a{' and agent_module_path"),
        ("zzzz = 1", [], "unknown key 'zzzz' in config.toml (valid keys here: actor, "),
        ("rollout = 3", ["rollout.x=1"], "cannot set rollout.x: rollout is not a table"),
    ],
)
def test_error_messages_name_key_and_source(text, overrides, expected):
    msg = _error(text, overrides)
    assert expected in msg
    assert "config.toml" in msg or "override '" in msg


def test_override_errors():
    with pytest.raises(ConfigError, match="override 'rollout.batch_size' must be key=value"):
        loads_config("", ["rollout.batch_size"])
    with pytest.raises(ConfigError, match="'a b' is not a valid key"):
        loads_config("", ["a b=1"])
    with pytest.raises(ConfigError, match="'' is not a valid key"):
        loads_config("", [" =1"])


def test_toml_and_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[rollout]\nbatch_size = 8\ngroup_size = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*line 3"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.toml.*not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory


# --------------------------------------------------------------------------- writing


def test_round_trip_defaults_and_custom(tmp_path):
    assert loads_config(config_to_toml(ExperimentConfig())) == ExperimentConfig()
    cfg = loads_config(
        "",
        [
            "experiment_name=exp one",
            "rollout.backend=sglang",
            'rollout.sglang.urls=["http://a:1"]',
            "rollout.episode_timeout_s=inf",
            "rollout.agent.agent_kwargs={a=[1, 2.5, \"x\"], b={c=true}, \"d e\"=\"q\\\"\\n\"}",
            "rollout.agent.agent_kwargs.when=2024-01-02T03:04:05Z",
        ],
    )
    text = config_to_toml(cfg)
    tomllib.loads(text)  # valid TOML
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_toml_writer_rejects_values_toml_cannot_hold():
    cfg = ExperimentConfig(rollout=RolloutConfig(agent=AgentConfig(agent_kwargs={"x": None})))
    with pytest.raises(ConfigError, match=r"rollout\.agent\.agent_kwargs\.x = None"):
        config_to_toml(cfg)


_scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.text(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(kwargs=st.dictionaries(st.text(max_size=8), _values, max_size=4), name=st.text(max_size=20))
def test_round_trip_arbitrary_kwargs_and_strings(kwargs, name):
    cfg = ExperimentConfig(actor=config_mod.ActorConfig(path=name))
    cfg.rollout.agent.agent_kwargs = kwargs
    assert loads_config(config_to_toml(cfg)) == cfg


# --------------------------------------------------------------------------- properties

_NUMERIC = _leaves((msgspec.inspect.IntType, msgspec.inspect.FloatType))


def _in_bounds(t):
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    if isinstance(t, msgspec.inspect.IntType):
        lo = -(2**63) if lo is None else lo + (t.gt is not None)
        hi = 2**63 - 1 if hi is None else hi - (t.lt is not None)
        return st.integers(lo, hi)
    return st.floats(
        min_value=lo, max_value=hi, exclude_min=t.gt is not None, exclude_max=t.lt is not None,
        allow_nan=False,
    )


@st.composite
def _numeric_assignment(draw):
    key, t = draw(st.sampled_from(_NUMERIC))
    value = draw(_in_bounds(t).filter(lambda v: not (key.endswith("top_k") and v == 0)))
    return key, value


@settings(max_examples=150, deadline=None)
@given(assignments=st.lists(_numeric_assignment(), min_size=1, max_size=6))
def test_numeric_overrides_round_trip(assignments):
    overrides = ["scheduler.type=slurm"] + [f"{k}={v!r}" for k, v in assignments]
    cfg = loads_config("", overrides)
    final = dict(assignments)  # the last assignment of a key wins
    for key, value in final.items():
        got = _get(cfg, key)
        assert got == value and (math.copysign(1, got) == math.copysign(1, value))
    assert loads_config(config_to_toml(cfg)) == cfg


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_numeric_out_of_bounds_names_key(data):
    bounded = [(k, t) for k, t in _NUMERIC if t.ge is not None or t.gt is not None]
    key, t = data.draw(st.sampled_from(bounded))
    low = t.ge if t.ge is not None else t.gt
    if isinstance(t, msgspec.inspect.IntType):
        below = st.integers(-(2**40), low - 1 if t.ge is not None else low)
    else:
        below = st.floats(max_value=low, exclude_max=t.ge is not None, allow_nan=False)
    bad = data.draw(below)
    msg = _error("", [f"{key}={bad!r}"])
    assert msg.startswith(f"{key} must be ") and f"(override '{key}={bad!r}')" in msg


_KEY_CHARS = string.ascii_lowercase + "_"


@st.composite
def _misspelled(draw):
    """(prefix, original field, misspelling) with the misspelling not a field there."""
    prefix, struct = draw(st.sampled_from(list(_structs())))
    names = [f.name for f in struct.fields]
    name = draw(st.sampled_from(names))
    i = draw(st.integers(0, len(name) - 1))
    op = draw(st.sampled_from(["drop", "insert", "replace", "swap"]))
    ch = draw(st.sampled_from(_KEY_CHARS))
    typo = {
        "drop": name[:i] + name[i + 1 :],
        "insert": name[:i] + ch + name[i:],
        "replace": name[:i] + ch + name[i + 1 :],
        "swap": name[:i] + name[i + 1 : i + 2] + name[i : i + 1] + name[i + 2 :],
    }[op]
    assume(typo and typo not in names)
    return prefix, name, typo


@settings(max_examples=150, deadline=None)
@given(case=_misspelled(), via_file=st.booleans())
def test_misspelled_keys_are_named(case, via_file):
    prefix, original, typo = case
    dotted = ".".join(prefix + (typo,))
    if via_file:
        header = f"[{'.'.join(prefix)}]\n" if prefix else ""
        msg = _error(f"{header}{typo} = 1\n")
        assert "in config.toml" in msg
    else:
        msg = _error("", [f"{dotted}=1"])
        assert f"in command-line override '{dotted}=1'" in msg
    assert msg.startswith(f"unknown key {dotted!r}")
    assert repr(".".join(prefix + (original,))) in msg or "valid keys here" in msg


# --------------------------------------------------------------------------- style


def test_every_section_is_keyword_only_strict_and_commented():
    for prefix, struct in _structs():
        cls = struct.cls
        assert struct.forbid_unknown_fields, cls.__name__
        with pytest.raises(TypeError):
            cls(*[f.default for f in struct.fields[:1]])  # positional args are refused
        source = inspect.getsource(cls)
        for f in struct.fields:
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{'.'.join(prefix + (f.name,))} needs a unit/meaning comment"


def test_all_is_sorted():
    assert config_mod.__all__ == sorted(config_mod.__all__)
    assert all(hasattr(config_mod, name) for name in config_mod.__all__)
