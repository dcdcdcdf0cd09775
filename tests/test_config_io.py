"""YAML + dotted overrides -> typed dataclasses, with one-line errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from gspo_megatron.config.io import build, load, parse_override
from gspo_megatron.errors import GspoError


@dataclass(frozen=True)
class Term:
    name: str = "a"
    weight: float = 1.0


@dataclass(frozen=True)
class Section:
    steps: int = 10
    lr: float = 1e-6
    flag: bool = False
    label: Optional[str] = None
    sizes: tuple = ()
    terms: List[Term] = field(default_factory=list)


@dataclass(frozen=True)
class Top:
    train: Section = field(default_factory=Section)
    other: Section = field(default_factory=Section)


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  lr: 1e-5\n  terms:\n    - {name: math, weight: 2}\n")
    cfg = load(
        Top,
        path,
        [
            "train.flag=true",
            "other.sizes=[1, 2]",
            "train.label=run1",
            "train.terms=[{name: f, weight: 0.5}, {name: g}]",
            "other.lr=3",
        ],
    )
    assert cfg.train.steps == 5 and cfg.train.lr == 1e-5 and cfg.train.flag is True
    assert cfg.train.label == "run1" and cfg.other.sizes == (1, 2) and cfg.other.lr == 3.0
    assert cfg.train.terms == [Term("f", 0.5), Term("g", 1.0)]
    assert cfg.other.steps == 10  # untouched defaults stay


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"train": {"stpes": 3}},
            "unknown config key 'train.stpes' (allowed: steps, lr, flag, label, sizes, terms)",
        ),
        ({"trian": {}}, "unknown config key 'trian' (allowed: train, other)"),
        ({"train": {"steps": "many"}}, "config train.steps='many': expected an integer"),
        ({"train": {"steps": 2.5}}, "config train.steps=2.5: expected an integer"),
        (
            {"train": {"flag": "yes please"}},
            "config train.flag='yes please': expected true or false",
        ),
        ({"train": {"lr": "fast"}}, "config train.lr='fast': expected a number"),
        (
            {"train": {"terms": [{"name": "a", "wieght": 1}]}},
            "unknown config key 'train.terms[0].wieght'",
        ),
        ({"train": 3}, "config train: expected a mapping, got 3"),
    ],
)
def test_bad_keys_and_types_name_the_key(data, message):
    with pytest.raises(GspoError) as err:
        build(Top, data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    assert parse_override("a.b=[1,2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    with pytest.raises(GspoError, match="expected section.key=value"):
        parse_override("a.b")
    with pytest.raises(GspoError, match="no such config file"):
        load(Top, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(GspoError, match=r"bad.yaml:\d+: not valid YAML"):
        load(Top, bad)


def test_trainer_config_sections_are_checked(tmp_path):
    from gspo_megatron.config import Config, load_config

    cfg = load_config(
        None,
        [
            "rollout.group_size=16",
            "parallel.pp_layers=[3, 5]",
            "optim.lr=1e-6",
            "rewards.functions=[{name: format, weight: 0.2}, {name: math}]",
        ],
    )
    assert isinstance(cfg, Config)
    assert cfg.rollout.group_size == 16 and cfg.parallel.pp_layers == (3, 5)
    assert [(f.name, f.weight) for f in cfg.rewards.functions] == [("format", 0.2), ("math", 1.0)]
    with pytest.raises(GspoError, match="unknown config key 'rollout.grup_size'"):
        load_config(None, ["rollout.grup_size=4"])
    with pytest.raises(GspoError, match="config loss.num_minibatches='four': expected an integer"):
        load_config(None, ["loss.num_minibatches=four"])
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "w1", "answer": "1"}\n')
    (tmp_path / "ckpt").mkdir()
    ok = load_config(
        None,
        [
            f"model.ckpt={tmp_path / 'ckpt'}",
            f"data.path={data}",
            "train.prompts_per_step=3",
            "rollout.group_size=2",
            "loss.num_minibatches=4",
        ],
    )
    with pytest.raises(GspoError, match="6 samples do not split into loss.num_minibatches=4"):
        ok.validate(world_size=1)
    with pytest.raises(GspoError, match="rollout.engine_tp=2: must divide the world size 3"):
        load_config(
            None, [f"model.ckpt={tmp_path / 'ckpt'}", f"data.path={data}", "rollout.engine_tp=2"]
        ).validate(world_size=3)
