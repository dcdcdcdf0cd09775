"""Real multi-turn rollouts: vLLM samples every turn (token prompts, prefix cache on), the
environments run in their own processes on each engine's rank, and the trainer (megatron, TP2)
scores the model's tokens exactly as the engine sampled them: the context the engine saw."""

from __future__ import annotations

import json

from conftest import REPO, run_cli
from transformers import AutoTokenizer


def test_trainer_scores_the_engines_multi_turn_tokens(agent_init, tmp_path):
    """Episodes of three turns (a scripted environment that always answers, so that every
    episode has them whatever the tiny policy writes), two engines, the trainer in TP2."""
    env = "episode_envs:Scripted"
    out = tmp_path / "report.json"
    run_cli(
        [
            str(REPO / "tests/workers/agent_worker.py"),
            "--ckpt",
            str(agent_init / "mcore"),
            "--out",
            str(out),
            "--tp",
            "2",
            "--env",
            env,
        ],
        nproc=2,
        env={"PYTHONPATH": str(REPO / "tests")},  # the environment's module, episode_envs
    )
    r = json.loads(out.read_text())
    assert r["failures"] == [None] * 12, r["failure_details"]
    assert r["turns"] == [3] * 12
    assert r["model_tokens"] > 100 and r["env_tokens"] > 0
    # The engine's sampling log-probs are the trainer's on every model token (fp32 on both
    # sides, other kernels: ~1e-6 per token; 1e-4 is the suite's fp32 log-prob bound, as in
    # test_rollout; the max over the tokens gets 1e-3). Had the trainer scored other ids or
    # another context (a re-encoded transcript, a dropped separator), the gap would be ~1.
    d = r["diff"]
    assert d["rollout/logprob_diff_tokens"] == r["model_tokens"]
    assert d["rollout/logprob_abs_diff_mean"] <= 1e-4
    assert d["rollout/logprob_abs_diff_max"] <= 1e-3
    assert r["repeatable"]
    tok = AutoTokenizer.from_pretrained(str(agent_init / "hf"))
    for ep in r["episodes"]:
        # The engine's log-probs exist for the model's tokens only, aligned with them.
        assert len(ep["logprobs"]) == len(ep["ids"]) == len(ep["mask"])
        assert all(lp == 0.0 for lp, m in zip(ep["logprobs"], ep["mask"]) if not m)
        assert all(lp < 0.0 or lp == 0.0 for lp in ep["logprobs"])
        # Between model turns the environment's ids are the template's: the transcript's
        # environment spans decode to tool turns and generation prompts.
        text = tok.decode(
            [t for t, m in zip(ep["ids"], ep["mask"]) if not m], skip_special_tokens=False
        )
        assert "<|im_start|>user\n<tool_response>\nseen " in text
        assert text.count("<|im_start|>assistant\n") == 2
