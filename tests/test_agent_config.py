"""Multi-turn settings the pre-flight refuses in one line, before any model exists: an
environment path that does not name a usable class, limits that cannot hold, a tokenizer
without a chat template or the tool-call tokens, routing replay r3 with episodes."""

from __future__ import annotations

import shutil

import pytest
from conftest import REPO
from test_preflight import _main

AGENT_CONFIG = str(REPO / "launch/configs/tiny_agent_cpu.yaml")


@pytest.fixture()
def agent_good(agent_init, tmp_path):
    return [
        "--config",
        AGENT_CONFIG,
        f"model.ckpt={agent_init / 'mcore'}",
        f"data.path={agent_init / 'train.jsonl'}",
        f"data.eval_path={agent_init / 'held_out.jsonl'}",
        f"train.output_dir={tmp_path / 'o'}",
    ]


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "agent.environment=no_such_module:Env",
            "agent.environment='no_such_module:Env': cannot import module",
        ),
        ("agent.environment=episode_envs:NoSuchEnv", "has no 'NoSuchEnv'"),
        ("agent.environment=episode_envs", "expected an import path 'package.module:Class'"),
        ("agent.environment=gspo_megatron.tasks.agent_demo:value_reward", "not a class"),
        ("agent.max_turns=0", "agent.max_turns=0 must be >= 1"),
        (
            "agent.max_episode_tokens=5000",
            "agent.max_episode_tokens=5000 exceeds what the engine holds",
        ),
        ("agent.max_tokens_per_turn=400", "agent.max_tokens_per_turn=400 leaves no room"),
        ("agent.tool_call_format=xml", "agent.tool_call_format='xml' (allowed: qwen3)"),
        ("agent.turn_rewards=mean", "agent.turn_rewards='mean' (allowed: sum, ignore)"),
        ("agent.step_timeout_s=0", "agent.step_timeout_s=0.0 must be > 0"),
        ("agent.env_start_timeout_s=-1", "agent.env_start_timeout_s=-1.0 must be > 0"),
        ("agent.max_failed_steps=-1", "agent.max_failed_steps=-1 must be >= 0 (0 = never stop)"),
        ("agent.env_memory_gib=-1", "agent.env_memory_gib=-1.0 must be >= 0 (0 = no limit)"),
        (
            "agent.max_parallel_envs=100000000",
            "agent.max_parallel_envs=100000000: 100000000 live episodes take about 1562500.0 "
            "GiB, more than half of this machine's free memory",
        ),
        (
            "agent.environment=episode_envs:NeedsTwo",
            "agent.environment='episode_envs:NeedsTwo': NeedsTwo(row) on the first data row "
            "raised TypeError: NeedsTwo.__init__() missing 1 required positional argument",
        ),
        (
            "agent.environment=env_exits_at_import:Env",
            "agent.environment='env_exits_at_import:Env': importing and constructing it from "
            "the first data row ended its process (exit status 0) without a word",
        ),
        ("loss.routing_replay=r3", "multi-turn episodes (agent.environment) do not assemble"),
    ],
)
def test_bad_agent_settings(agent_good, monkeypatch, capsys, override, message):
    err = _main(agent_good + [override], monkeypatch, capsys)
    assert message in err, err


def test_good_agent_config_passes_the_check(agent_good, monkeypatch, capsys):
    from gspo_megatron import train

    monkeypatch.setenv("WORLD_SIZE", "1")
    train.main(agent_good + ["--check"])
    assert "is ready for 1 rank(s)" in capsys.readouterr().err


def test_a_tokenizer_without_tool_call_tokens(agent_good, demo_init, monkeypatch, capsys):
    """The copy demo's word-level tokenizer: no <tool_call> token to write calls with."""
    err = _main(
        agent_good
        + [
            f"model.ckpt={demo_init / 'mcore'}",
            f"data.path={demo_init / 'train.jsonl'}",
            f"data.eval_path={demo_init / 'held_out.jsonl'}",
            "rollout.max_prompt_tokens=16",
            "rollout.max_new_tokens=8",
            "agent.max_tokens_per_turn=4",
        ],
        monkeypatch,
        capsys,
    )
    assert "agent.tool_call_format=qwen3 writes tool calls between <tool_call> and" in err, err


def test_a_tokenizer_without_a_chat_template(agent_good, agent_init, monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "mcore"
    shutil.copytree(agent_init / "mcore", ckpt)
    (ckpt / "hf" / "chat_template.jinja").unlink()
    err = _main(agent_good + [f"model.ckpt={ckpt}"], monkeypatch, capsys)
    assert "multi-turn episodes need a chat template" in err, err


def test_per_turn_rewards_may_be_the_whole_signal(agent_good, monkeypatch, capsys):
    """No reward function with agent.turn_rewards=sum (the environment's rewards are the
    signal, as in the README's example); with ignore there would be nothing: refused."""
    from gspo_megatron import train

    monkeypatch.setenv("WORLD_SIZE", "1")
    train.main(agent_good + ["rewards.functions=[]", "--check"])
    assert "is ready for 1 rank(s)" in capsys.readouterr().err
    err = _main(
        agent_good + ["rewards.functions=[]", "agent.turn_rewards=ignore"], monkeypatch, capsys
    )
    assert "rewards.functions is empty" in err


def test_a_slow_import_says_so_and_a_hung_one_is_refused(agent_good, monkeypatch, capsys):
    """An environment module that takes 1.5 s to import: the pre-flight says what it waits
    for while it waits (here every 0.5 s), and with agent.env_start_timeout_s=1 refuses it."""
    from gspo_megatron import train
    from gspo_megatron.rollout.episodes import env_pool

    monkeypatch.setattr(env_pool, "PROGRESS_EVERY_S", 0.5)
    monkeypatch.setenv("GSPO_TEST_IMPORT_S", "1.5")
    train.main(agent_good + ["agent.environment=env_slow_import:Env", "--check"])
    err = capsys.readouterr().err
    assert "pre-flight: importing and constructing it from the first data row " in err
    monkeypatch.setattr(env_pool, "PROGRESS_EVERY_S", 60.0)
    err = _main(
        agent_good + ["agent.environment=env_slow_import:Env", "agent.env_start_timeout_s=1"],
        monkeypatch,
        capsys,
    )
    assert err == (
        "error: agent.environment='env_slow_import:Env': importing and constructing it from the "
        "first data row took more than agent.env_start_timeout_s=1 s (raise it for a module "
        "that imports slowly)"
    )
