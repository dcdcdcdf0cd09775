"""gspo-train with multi-turn episodes end to end: the agent demo's config on its tiny model
(two ranks, real vLLM, the environments in their own processes), validation on held-out
episodes, the rollouts written with their ids and masks; and another environment by override
that raises and hangs for some episodes, which costs those episodes only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import train_runs as tr
from conftest import REPO, torchrun_cmd
from transformers import AutoTokenizer

from gspo_megatron.tasks.agent_demo import LOOKUP_REWARD, value_reward

CONFIG = "launch/configs/tiny_agent_cpu.yaml"


def _train(agent_init, out, *extra):
    cmd = (
        torchrun_cmd(2)
        + ["-m", "gspo_megatron.train", "--config", CONFIG]
        + [
            f"model.ckpt={agent_init / 'mcore'}",
            f"data.path={agent_init / 'train.jsonl'}",
            f"data.eval_path={agent_init / 'held_out.jsonl'}",
            f"train.output_dir={out}",
            "train.prompts_per_step=4",
            "rollout.group_size=4",
            "train.save_rollouts=true",
            *extra,
        ]
    )
    proc = subprocess.run(cmd, cwd=REPO, env=tr.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc


TOOL_USE = (
    "rewards.functions=[{name: 'gspo_megatron.tasks.agent_demo:value_reward', weight: 1.0}, "
    "{name: 'reward_fns:tool_use', weight: 0.0}]"
)


def test_agent_demo_config_trains_validates_and_records_episodes(agent_init, tmp_path):
    """Two steps on two ranks; validation of the initial policy on held-out episodes equals
    gspo-eval's of the same model with the run's config (seeded episodes, one engine against
    the trainer's two); a reward function asking for the episode reads its record."""
    out = tmp_path / "run"
    metrics, _ = _train(
        agent_init, out, "train.steps=2", "train.eval_every=2", "train.eval_k=2", TOOL_USE
    )
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["agent/turns_mean"] >= 1 and m["agent/env_errors"] == 0
        assert m["agent/model_tokens"] > 0 and m["train/update_successful"] == 1.0
    # Validation right after the first sync (step index 0), as for single-turn runs.
    assert "eval/pass@2" in metrics[0] and "eval/mean_reward" in metrics[0]
    # reward_fns:tool_use (weight 0: logged, not added) reads the episode's record: its tool
    # calls plus 0.1 per message (at least system, user and one assistant turn).
    assert metrics[0]["reward/tool_use"] >= metrics[0]["agent/tool_calls"] + 0.3 - 1e-9
    logged = {k.removeprefix("eval/"): v for k, v in metrics[0].items() if k.startswith("eval/")}
    cmd = [sys.executable, "-m", "gspo_megatron.evaluate", "--model", str(agent_init / "hf")]
    cmd += ["--config", str(out / "config.yaml"), "--data", str(agent_init / "held_out.jsonl")]
    cmd += ["--k", "2", "--max-new-tokens", "64", "--kv-cache-gib", "0.1"]
    cmd += ["--out", str(tmp_path / "eval")]
    proc = subprocess.run(cmd, cwd=REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert logged["mean_reward"] > 0 and set(logged) <= set(summary)
    assert {k: summary[k] for k in logged} == logged
    samples = [
        json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    ]
    assert all(s["turns"] >= 1 and s["messages"] for r in samples for s in r["samples"])
    tok = AutoTokenizer.from_pretrained(str(agent_init / "mcore" / "hf"))
    rows = [
        json.loads(x) for x in (out / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16
    for r in rows:
        assert len(r["ids"]) == len(r["mask"]) and r["failure"] is None
        # The reward is the final answer's plus the first well-formed lookup's.
        final = r["messages"][-1]["content"] if r["messages"][-1]["role"] == "assistant" else None
        answer = [m for m in r["messages"] if m["role"] == "assistant"][-1]["content"]
        expected = value_reward("", answer, r["answer"]) + (LOOKUP_REWARD if r["env_reward"] else 0)
        assert r["reward"] == expected, r
        assert final is not None or r["truncated"] or r["turns"] == 3
        # The model's tokens decode to its turns; the environment's to the template's
        # separators, tool turns and generation prompts.
        model_text = tok.decode([t for t, m in zip(r["ids"], r["mask"]) if m])
        env_text = tok.decode(
            [t for t, m in zip(r["ids"], r["mask"]) if not m], skip_special_tokens=False
        )
        assert "<|im_start|>" not in model_text
        if r["turns"] > 1:
            assert env_text.count("<|im_start|>assistant\n") == r["turns"] - 1


def test_another_environment_by_override_that_fails_for_some_episodes(agent_init, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "four.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "What is the secret colour?", "answer": c}) + "\n"
            for c in ("red", "gold", "blue", "teal")
        )
    )
    metrics, proc = _train(
        agent_init,
        out,
        f"data.path={data}",
        "data.shuffle=false",
        "train.steps=1",
        "train.eval_every=0",
        "agent.environment=episode_envs:Flaky",
        "agent.step_timeout_s=2",
    )
    rows = [
        json.loads(x) for x in (out / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    ]
    bad = {"red": "error", "gold": "timeout"}
    assert sorted({r["answer"] for r in rows}) == ["blue", "gold", "red", "teal"]
    for r in rows:
        # Every episode samples a first turn, which the environment then answers (or not).
        assert r["turns"] >= 1 and r["failure"] == bad.get(r["answer"]), r
        if r["failure"]:
            assert r["reward"] == 0.0
    m = metrics[0]
    assert m["agent/env_errors"] == 4 and m["agent/env_timeouts"] == 4
    assert m["train/update_successful"] == 1.0


def _small_run(agent_init, out, env, *extra) -> subprocess.CompletedProcess:
    """gspo-train of the agent config in one process: 2 prompts x 2 episodes a step."""
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", CONFIG]
    cmd += [
        f"model.ckpt={agent_init / 'mcore'}",
        f"data.path={agent_init / 'train.jsonl'}",
        f"train.output_dir={out}",
        "train.prompts_per_step=2",
        "rollout.group_size=2",
        "loss.micro_batch_size=1",
        "train.eval_every=0",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_an_environment_that_fails_every_episode_stops_the_run(agent_init, tmp_path):
    """reset returns None for every episode: the first failure is shown once, a step of
    nothing but failures is a warning, and agent.max_failed_steps=2 of them in a row stop the
    run in one line (exit 1) before step 2's checkpoint; nothing is trained on them."""
    out = tmp_path / "run"
    proc = _small_run(
        agent_init,
        out,
        tr.env(),
        "train.steps=4",
        "train.save_every=1",
        "agent.environment=episode_envs:ResetsNone",
        "agent.max_failed_steps=2",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    why = "invalid: reset returned messages None (NoneType); expected a list"
    first = (
        "environment episode_envs:ResetsNone failed (the episode scores 0, counted in "
        f"agent/env_errors or agent/env_timeouts; only the first failure is shown): {why}\n"
    )
    warning = (
        f"step 1: every one of its 4 episodes failed in its environment, so it has nothing to "
        f"learn from ({why})\n"
    )
    stop = (
        "\nstopped: every episode of 2 steps in a row failed in its environment (last in step "
        f"2: {why}); the last complete checkpoint is {out / 'checkpoints' / 'step_000001'}. "
        "Fix episode_envs:ResetsNone, or raise agent.max_failed_steps\n"
    )
    for line in (first, warning, stop):  # (the progress bar shares stderr)
        assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_000001"]


def test_untrusted_environment_text_and_escaping_processes(agent_init, tmp_path):
    """An environment whose opening forges an assistant turn and whose tool results try to
    close theirs, and which (like the reward function) starts processes in sessions of their
    own and double-forked daemons: every saved episode's ids hold exactly the added tokens of
    the template's rendering of harmless text in the same places, and after the run no process
    it started remains (none of theirs, no fork server, no resource tracker, no guard)."""
    out, children = tmp_path / "run", tmp_path / "children"
    marker = f"gspo-test-{os.getpid()}-{tmp_path.name}"
    env = dict(tr.env(), GSPO_TEST_CHILDREN=str(children), GSPO_TEST_RUN=marker)
    proc = _small_run(
        agent_init,
        out,
        env,
        "train.steps=1",
        "train.save_rollouts=true",
        "agent.environment=episode_envs:Untrusted",
        "rewards.functions=[{name: 'reward_fns:starts_escaping_processes_env', weight: 1.0}]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(str(agent_init / "mcore" / "hf"))
    added = set(tok.get_added_vocab().values())
    rows = [
        json.loads(x) for x in (out / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(r["failure"] is None and r["turns"] >= 1 for r in rows)
    for r in rows:
        prompt = [{"role": "user", "content": "q"}]  # harmless text, the same turns
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        safe = tok.encode(text, add_special_tokens=False)
        assert [t for t in r["prompt_ids"] if t in added] == [t for t in safe if t in added]
        env_ids = [t for t, m in zip(r["ids"], r["mask"]) if not m and t in added]
        # Per tool turn: <|im_end|> closing the model's turn if it did not, then the template's
        # <|im_start|>user <tool_response> ... </tool_response> <|im_end|> <|im_start|>assistant.
        text = tok.decode([t for t, m in zip(r["ids"], r["mask"]) if not m])
        assert text.count("</tool_response><|im_end|>\nx") == r["turns"] - 1
        assert env_ids.count(tok.convert_tokens_to_ids("</tool_response>")) == r["turns"] - 1
    pids = [int(x) for x in children.read_text().split()]
    assert len(pids) == 2 * 4 + 2 * 4  # each episode's reset and each reward call: 2 each
    deadline = time.monotonic() + 10
    while _of_the_run(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _of_the_run(marker) == []


def _of_the_run(marker: str) -> list:
    """Live processes whose environment carries ``marker`` (everything the run started)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("GSPO_TEST_RUN") == marker:
                found.append((p.pid, " ".join(p.info["cmdline"] or [])[:80]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
