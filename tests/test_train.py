"""gspo-train end to end on CPU: bad input stops before heavy work; a run killed with SIGKILL
(mid checkpoint, and at a random moment) resumes to exactly the parameters and optimizer state
of an uninterrupted run; the multi-node script runs two torchrun nodes on loopback.

The uninterrupted reference run is the two-node launch (2 nodes x 1 process); the interrupted
run is one node x 2 processes. Same world, same layout, so the results must agree bit for bit,
which also shows that the multi-node launch computes what a single node computes.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import torch
import train_runs as tr
from conftest import REPO


def test_multinode_script_runs_two_nodes_on_loopback(multinode_run):
    logs = [(multinode_run.parent / f"node{n}.log").read_text() for n in (0, 1)]
    assert "node 0/2" in logs[0] and "node 1/2" in logs[1]
    rows = [json.loads(line) for line in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, tr.STEPS + 1))
    for r in rows:
        # The engine samples with exactly the trainer's weights after every sync (fp32 kernels on
        # both sides: ~1e-6 per token; the suite's fp32 log-prob bound is 1e-4).
        assert r["rollout/logprob_abs_diff_mean"] < 1e-4
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert 0.0 <= r["train/moe_route_change"] <= 1.0
        for tag in ("gspo/clip_fraction", "train/lr", "train/grad_norm", "perf/sync_seconds"):
            assert tag in r
        assert r["data/prompts"] == 256 and r["data/skipped_overlong"] == 0
        # The trainer's routers under pi_old choose the experts the engine routed each response
        # token to (same weights after every sync; fp32 leaves only near-ties to differ).
        assert 0.99 <= r["rollout/route_agreement"] <= 1.0
        # The KL penalty to the frozen initial policy: 0 only while the policy is still it.
        assert r["gspo/ref_kl"] >= 0
    assert rows[-1]["gspo/ref_kl"] > 0
    assert (multinode_run / "checkpoints" / "latest").read_text().strip() == f"step_{tr.STEPS:06d}"
    # TensorBoard events exist and carry the required tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(multinode_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward/mean", "rollout/logprob_abs_diff_mean", "gspo/clip_fraction"} <= tags
    assert [e.step for e in acc.Scalars("reward/mean")] == list(range(1, tr.STEPS + 1))


def test_dynamic_sampling_trains_only_informative_groups(multinode_run):
    """rollout.dynamic_sampling over a reward that is flat on some prompts (reward_fns
    .copy_or_flat): the samples that reached the loss (train.save_rollouts) hold no group of
    equal rewards and none of the flat prompts; every step still trained on prompts_per_step
    groups (the extra rounds found enough), which the optimizer's sequence count confirms; and
    the dumped rewards are the reward function's own."""
    from reward_fns import FLAT_WORDS, copy_or_flat

    rows = [json.loads(line) for line in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["reward/filtered_groups"] for r in rows) > 0
    assert any(r["rollout/sampling_rounds"] >= 2 for r in rows)
    for r in rows:
        dumped = (multinode_run / "rollouts" / f"step_{r['step']:06d}.jsonl").read_text()
        samples = [json.loads(line) for line in dumped.splitlines()]
        assert len(samples) == r["train/sequences"] == 8 * 8  # prompts_per_step x group_size
        groups = [samples[k : k + 8] for k in range(0, len(samples), 8)]
        for g in groups:
            assert len({s["row"] for s in g}) == 1
            assert len({s["reward"] for s in g}) > 1  # no group of equal rewards
            assert g[0]["answer"].split()[0] not in FLAT_WORDS
            for s in g:
                assert s["reward"] == copy_or_flat(s["prompt"], s["response"], s["answer"])
        assert len({g[0]["row"] for g in groups}) == 8  # 8 different prompts


def test_export_hf_holds_the_final_policy(multinode_run, demo_init):
    """train.export_hf=true: the final checkpoint as an HF model that transformers loads."""
    from transformers import AutoModelForCausalLM

    from gspo_megatron.testing.hf_reference import read_hf_tensors

    exported = read_hf_tensors(multinode_run / "hf")
    initial = read_hf_tensors(demo_init / "hf")
    assert set(exported) == set(initial)
    assert not torch.equal(
        exported["model.embed_tokens.weight"], initial["model.embed_tokens.weight"]
    )
    final = tr.checkpoint_tensors(multinode_run / "checkpoints" / f"step_{tr.STEPS:06d}")
    emb = exported["model.embed_tokens.weight"]
    # megatron pads the vocabulary (250 -> 256 rows); the export drops the padding.
    assert torch.equal(emb, final["embedding.word_embeddings.weight"][: emb.shape[0]])
    model = AutoModelForCausalLM.from_pretrained(multinode_run / "hf")
    assert torch.equal(model.lm_head.weight.detach(), exported["lm_head.weight"])


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(multinode_run, demo_init, tmp_path):
    """Killed and resumed with checkpoints written in the background (train.async_save), against
    the reference's synchronous ones: the kill lands while a forked writer is at work, and a
    checkpoint written while the next step trained must hold the state of its own step."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    overrides = tr.overrides(
        demo_init, out, **tr.KL, **tr.DYNAMIC, **tr.ASYNC_SAVE, **tr.validation(demo_init)
    )

    # 1. Killed while step 2's checkpoint is being written.
    log = tmp_path / "a.log"
    proc = tr.torchrun(log, overrides)
    deadline = time.time() + 300
    while not (ckpts / "step_000002.partial").exists():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    tr.kill_tree(proc)
    assert (ckpts / "latest").read_text().strip() == "step_000001"
    assert (ckpts / "step_000002.partial").exists()  # the torn one is still there...

    # 2. Resumed, then killed at a random moment.
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(5.0, 30.0)
    log = tmp_path / "b.log"
    proc = tr.torchrun(log, overrides, resume=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        tr.kill_tree(proc)
    latest = (ckpts / "latest").read_text().strip()

    # 3. Resumed to the end, from the newest complete checkpoint (never the torn one); a run
    # the kill came too late for is complete, and says so.
    log = tmp_path / "c.log"
    proc = tr.torchrun(log, overrides, resume=True)
    tr.wait(proc, log)
    if latest == f"step_{tr.STEPS:06d}":
        assert "gspo-train: the run is complete: " in log.read_text()
    else:
        assert f"resumed from {ckpts / latest} " in log.read_text()

    # The last checkpoint, and the one before it (written while the last step trained).
    for step in (tr.STEPS - 1, tr.STEPS):
        name = f"step_{step:06d}"
        got = tr.checkpoint_tensors(ckpts / name)
        want = tr.checkpoint_tensors(multinode_run / "checkpoints" / name)
        tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
        assert any(k.startswith("optimizer.") for k in tensors) and len(tensors) > 20
        different = [k for k in tensors if not torch.equal(got[k], want[k])]
        assert not different, (
            f"kill delay seed {seed}, {name}: {len(different)} tensors differ, e.g. {different[:3]}"
        )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, tr.STEPS + 1))  # each step logged once
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in ref]
    held = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows]
    assert held == [{k: v for k, v in r.items() if k.startswith("eval/")} for r in ref]
    assert [bool(h) for h in held] == [True, False, True, False, True]
    assert not list(ckpts.glob("*.partial"))


def test_skip_guard_stops_after_the_limit_in_a_row():
    """Skipped optimizer steps are counted in a row across RL steps; a good step resets the
    count; the limit stops the run with one line naming the last checkpoint."""
    import pytest

    from gspo_megatron.errors import TrainingStopped
    from gspo_megatron.train import SkipGuard

    guard = SkipGuard(limit=3)
    guard.update([False, True, True], step=1, last_checkpoint="ckpt A")
    guard.update([False, True], step=2, last_checkpoint="ckpt A")  # reset by the good one
    guard.update([True], step=3, last_checkpoint="ckpt A")
    with pytest.raises(TrainingStopped) as stop:
        guard.update([True, False], step=4, last_checkpoint="the last complete checkpoint is B")
    assert str(stop.value).startswith(
        "3 optimizer steps in a row were skipped for a non-finite "
        "loss or gradient norm (last in step 4); the last complete "
        "checkpoint is B."
    )


def test_validation_equals_gspo_eval_of_the_same_checkpoint(multinode_run, demo_init, tmp_path):
    """Step 5's validation sampled the policy after 4 updates on the trainer's two engines,
    synced in memory; gspo-eval reads checkpoint step_000004 from disk into one engine, with
    the run's own config (its data fields, rewards and prompt length): the same figures."""
    rows = [json.loads(x) for x in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    logged = {k.removeprefix("eval/"): v for k, v in rows[4].items() if k.startswith("eval/")}
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "gspo_megatron.evaluate"]
    cmd += ["--model", str(multinode_run / "checkpoints" / "step_000004")]
    cmd += [
        "--config",
        str(multinode_run / "config.yaml"),
        "--data",
        str(demo_init / "held_out.jsonl"),
    ]
    cmd += ["--k", "4", "--max-new-tokens", "8", "--kv-cache-gib", "0.05", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert logged["mean_reward"] > 0 and set(logged) <= set(summary)
    assert {k: summary[k] for k in logged} == logged
