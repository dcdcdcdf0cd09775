"""Layouts that do not divide the model or the world are refused with a line naming why."""

from __future__ import annotations

import random
import socket

import pytest

from gspo_megatron.distributed.parallel import (
    ParallelLayout,
    _ephemeral_low,
    check_layout,
    free_port,
)
from gspo_megatron.errors import GspoError
from gspo_megatron.models import spec_from_hf_config
from gspo_megatron.testing.tiny_model import tiny_moe_config


def _moe_spec(**overrides):
    cfg = tiny_moe_config(**overrides).to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    return spec_from_hf_config(cfg)


@pytest.mark.parametrize(
    "layout,world,message",
    [
        (ParallelLayout(tp=8), 8, "num_attention_heads=4 is not divisible by TP=8"),
        (ParallelLayout(tp=4), 4, "num_key_value_heads (query groups)=2 is not divisible by TP=4"),
        (ParallelLayout(ep=8), 8, "num_experts=4 is not divisible by EP=8"),
        (ParallelLayout(pp=3), 3, "num_hidden_layers=4 is not divisible by PP=3"),
        (ParallelLayout(tp=2), 3, "do not divide world size 3"),
        (ParallelLayout(pp=2, pp_layers=(1, 2)), 2, "sums to 3, the model has 4 layers"),
        (
            ParallelLayout(etp=3, ep=1, tp=1),
            3,
            "moe_intermediate_size=32 is not divisible by ETP=3",
        ),
        (ParallelLayout(tp=2, etp=1), 2, "with ep=1, etp must equal tp"),
    ],
)
def test_bad_layouts_are_named(layout, world, message):
    with pytest.raises(GspoError) as err:
        check_layout(layout, _moe_spec(), world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_glm_shared_expert_is_split_by_tensor_parallelism():
    """GLM's shared expert is a dense MLP under TP: its size must divide (a family's own rule)."""
    from gspo_megatron.testing.tiny_model import tiny_glm_config

    cfg = tiny_glm_config(moe_intermediate_size=33).to_dict()
    cfg["architectures"] = ["Glm4MoeForCausalLM"]
    spec = spec_from_hf_config(cfg)
    with pytest.raises(GspoError, match="shared expert size=33 is not divisible by TP=2"):
        check_layout(ParallelLayout(tp=2, etp=1, ep=2), spec, 2)
    check_layout(ParallelLayout(ep=2), spec, 2)


def test_vocabulary_divisibility_is_checked():
    spec = _moe_spec(num_attention_heads=8, num_key_value_heads=8)
    spec = spec.__class__(**{**spec.__dict__, "vocab_pad_multiple": 4})  # 252 rows
    with pytest.raises(GspoError, match="padded vocabulary=252 is not divisible by TP=8"):
        check_layout(ParallelLayout(tp=8), spec, 8)


def test_good_layouts_pass():
    spec = _moe_spec()
    for layout, world in [
        (ParallelLayout(tp=2, pp=2), 4),
        (ParallelLayout(ep=2), 4),
        (ParallelLayout(pp=2, pp_layers=(1, 3)), 2),
    ]:
        check_layout(layout, spec, world)


def test_free_ports_are_outside_the_ephemeral_range_and_free():
    """Launch ports come from below the range the kernel gives outgoing connections, so no
    connection can take one between the choice and torchrun's listen; each is bindable. Ranks
    and test workers seed ``random`` alike: the choice must not follow it (three tries, so a
    chance repeat of 1 in ~20k cannot fail the test)."""
    low = _ephemeral_low()
    same = []
    for _ in range(3):
        random.seed(0)
        a = free_port()
        random.seed(0)
        b = free_port()
        same.append(a == b)
        assert 10000 <= a < low and 10000 <= b < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", a))
    assert not all(same)
