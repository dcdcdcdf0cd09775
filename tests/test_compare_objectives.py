"""tools/compare_objectives.py: the GSPO-vs-GRPO experiment end to end (one short run here: GRPO
with R3 replay through the real gspo-train, engine and route capture), and its argument checks."""

from __future__ import annotations

import json

from conftest import REPO, run_cli

TOOL = str(REPO / "tools" / "compare_objectives.py")


def test_a_short_grpo_r3_run_writes_the_plot_and_the_summary(tmp_path):
    out = tmp_path / "cmp"
    args = [TOOL, "--out", str(out), "--steps", "2", "--runs", "grpo_r3", "--nproc", "1"]
    run_cli(args + ["--warm-start-steps", "2"], timeout=900)
    (summary,) = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "grpo_r3" and summary["steps"] == 2
    # r3 replays the engine's routes in pi_old's forward and every update: nothing moves.
    assert summary["route_change_mean"] == 0.0
    # Same weights on both sides after every sync: the trainer's own routers agree.
    assert 0.99 <= summary["route_agreement_mean"] <= 1.0
    # Engine and trainer hold the same fp32 weights: their log-probs differ by kernel rounding
    # (~1e-6 per token on CPU); 1e-4 is the suite's fp32 log-prob bound (test_score_parity).
    assert summary["logprob_gap_mean"] < 1e-4
    assert 0.0 <= summary["reward_last_10pct"] <= 1.0 and summary["collapsed"] in (True, False)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [
        json.loads(x)
        for x in (out / "runs" / "grpo_r3" / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/moe_route_change"] == 0.0 for r in rows)


def test_bad_arguments_are_one_line(tmp_path):
    proc = run_cli([TOOL, "--out", str(tmp_path), "--runs", "gspo,ppo"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --runs ['ppo']: choose from gspo, grpo, grpo_r2, grpo_r3"
    )
    (tmp_path / "runs" / "gspo").mkdir(parents=True)
    proc = run_cli([TOOL, "--out", str(tmp_path), "--runs", "gspo"], check=False)
    assert proc.returncode == 2 and "already exists (pass --overwrite" in proc.stderr
