"""gspo-train end to end on CPU: bad input stops before heavy work; a run killed with SIGKILL
(mid checkpoint, and at a random moment) resumes to exactly the parameters and optimizer state
of an uninterrupted run; the multi-node script runs two torchrun nodes on loopback.

The uninterrupted reference run is the two-node launch (2 nodes x 1 process); the interrupted
run is one node x 2 processes. Same world, same layout, so the results must agree bit for bit,
which also shows that the multi-node launch computes what a single node computes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port

STEPS = 5


def _overrides(init: Path, out: Path, **extra) -> list:
    base = {"model.ckpt": init / "mcore", "data.path": init / "train.jsonl",
            "train.output_dir": out, "train.steps": STEPS, "train.save_every": 1,
            "train.keep_checkpoints": 2, "train.prompts_per_step": 8,
            "loss.micro_batch_size": 4}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    # torchrun sets 1 thread per process only when a node runs several; the two-node launch
    # (1 process per node) would otherwise reduce in a different order than the one-node run.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(out_log: Path, overrides, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    cmd += (["--resume"] if resume else []) + list(overrides)
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(out_log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker it started (as a crashed node would lose them)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"gspo-train failed ({rc}):\n{log.read_text()[-4000:]}"


def _checkpoint_tensors(path: Path) -> dict:
    """Every tensor and object of a megatron distributed checkpoint, read in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(flat))
    return torch.load(flat, weights_only=False)


@pytest.fixture(scope="module")
def demo_init(tmp_path_factory) -> Path:
    from gspo_megatron.demo import prepare

    out = tmp_path_factory.mktemp("demo") / "init"
    prepare(out, rows=256, alphabet=16, length=4, warm_start_steps=10, warm_start_lr=3e-3, seed=0)
    return out


@pytest.fixture(scope="module")
def multinode_run(demo_init, tmp_path_factory) -> Path:
    """The reference: two 'nodes' of one process each, launched by launch/multinode.sh."""
    out = tmp_path_factory.mktemp("multinode") / "run"
    port = str(free_port())
    procs, logs = [], []
    for node in (0, 1):
        env = dict(_env(), NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, NPROC_PER_NODE="1", PYTHON=sys.executable)
        log = out.parent / f"node{node}.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            ["bash", "launch/multinode.sh", "launch/configs/tiny_cpu.yaml"]
            + _overrides(demo_init, out) + ["train.export_hf=true"], cwd=REPO, env=env, stdout=open(log, "w"),
            stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        _wait(proc, log)
    return out


def test_multinode_script_runs_two_nodes_on_loopback(multinode_run):
    logs = [(multinode_run.parent / f"node{n}.log").read_text() for n in (0, 1)]
    assert "node 0/2" in logs[0] and "node 1/2" in logs[1]
    rows = [json.loads(line) for line in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # The engine samples with exactly the trainer's weights after every sync.
        assert r["rollout/logprob_abs_diff_mean"] < 1e-4
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert 0.0 <= r["train/moe_route_change"] <= 1.0
        for tag in ("gspo/clip_fraction", "train/lr", "train/grad_norm", "perf/sync_seconds"):
            assert tag in r
    assert (multinode_run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:06d}"
    # TensorBoard events exist and carry the required tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(multinode_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward/mean", "rollout/logprob_abs_diff_mean", "gspo/clip_fraction"} <= tags
    assert [e.step for e in acc.Scalars("reward/mean")] == list(range(1, STEPS + 1))


def test_export_hf_holds_the_final_policy(multinode_run, demo_init):
    """train.export_hf=true: the final checkpoint as an HF model that transformers loads."""
    from transformers import AutoModelForCausalLM

    from gspo_megatron.hf_reference import read_hf_tensors

    exported = read_hf_tensors(multinode_run / "hf")
    initial = read_hf_tensors(demo_init / "hf")
    assert set(exported) == set(initial)
    assert not torch.equal(exported["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    final = _checkpoint_tensors(multinode_run / "checkpoints" / f"step_{STEPS:06d}")
    emb = exported["model.embed_tokens.weight"]
    # megatron pads the vocabulary (250 -> 256 rows); the export drops the padding.
    assert torch.equal(emb, final["embedding.word_embeddings.weight"][: emb.shape[0]])
    model = AutoModelForCausalLM.from_pretrained(multinode_run / "hf")
    assert torch.equal(model.lm_head.weight.detach(), exported["lm_head.weight"])


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(multinode_run, demo_init, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    overrides = _overrides(demo_init, out)

    # 1. Killed while step 2's checkpoint is being written.
    log = tmp_path / "a.log"
    proc = _torchrun(log, overrides)
    deadline = time.time() + 300
    while not (ckpts / "step_000002.partial").exists():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    _kill_tree(proc)
    assert (ckpts / "latest").read_text().strip() == "step_000001"
    assert (ckpts / "step_000002.partial").exists()  # the torn one is still there...

    # 2. Resumed, then killed at a random moment.
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(5.0, 30.0)
    log = tmp_path / "b.log"
    proc = _torchrun(log, overrides, resume=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
    latest = (ckpts / "latest").read_text().strip()

    # 3. Resumed to the end, from the newest complete checkpoint (never the torn one).
    log = tmp_path / "c.log"
    proc = _torchrun(log, overrides, resume=True)
    _wait(proc, log)
    assert f"resumed from {ckpts / latest} " in log.read_text()

    final = f"step_{STEPS:06d}"
    got = _checkpoint_tensors(ckpts / final)
    want = _checkpoint_tensors(multinode_run / "checkpoints" / final)
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert any(k.startswith("optimizer.") for k in tensors) and len(tensors) > 20
    different = [k for k in tensors if not torch.equal(got[k], want[k])]
    assert not different, f"kill delay seed {seed}: {len(different)} tensors differ, e.g. {different[:3]}"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (multinode_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in ref]
    assert not list(ckpts.glob("*.partial"))


# -- bad input: one line, exit 2, before any process group or model ---------------------------

def _main(argv, monkeypatch, capsys, world: int = 1) -> str:
    from gspo_megatron import train

    def no_heavy_work(plan):
        raise AssertionError("the bad input got past the pre-flight checks to the Trainer")

    # The Trainer is where process groups, models and engines are made: it must not be reached.
    monkeypatch.setattr(train, "Trainer", no_heavy_work)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture()
def good(demo_init, tmp_path):
    return ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + _overrides(demo_init, tmp_path / "o")


def test_missing_dataset_file(good, monkeypatch, capsys, tmp_path):
    err = _main(good + [f"data.path={tmp_path / 'nope.jsonl'}"], monkeypatch, capsys)
    assert "nope.jsonl" in err and "data" in err


def test_dataset_without_the_configured_field(good, monkeypatch, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "w1 w2 w0", "answer": "w1 w2"}\n')
    err = _main(good + [f"data.path={data}"], monkeypatch, capsys)
    assert f"{data}:1: no field 'prompt' (data.prompt_field; this line has: question, answer)" in err


def test_unknown_key_and_wrong_type(good, monkeypatch, capsys):
    err = _main(good + ["train.stpes=3"], monkeypatch, capsys)
    assert "unknown config key 'train.stpes'" in err and "steps" in err
    err = _main(good + ["optim.lr=fast"], monkeypatch, capsys)
    assert "optim.lr='fast': expected a number" in err


def test_layout_that_does_not_fit_the_world(good, monkeypatch, capsys):
    err = _main(good + ["parallel.tp=2"], monkeypatch, capsys, world=3)
    assert "world size 3" in err and "TP2" in err


def test_samples_that_do_not_split_over_ranks(good, monkeypatch, capsys):
    err = _main(good + ["train.prompts_per_step=2", "rollout.group_size=3", "loss.num_minibatches=2"],
                monkeypatch, capsys, world=2)
    assert "= 6 samples do not split over 2 data-parallel ranks x loss.num_minibatches=2" in err


def test_existing_run_needs_resume(multinode_run, demo_init, monkeypatch, capsys):
    argv = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + _overrides(demo_init, multinode_run)
    err = _main(argv, monkeypatch, capsys)
    assert "already holds a run" in err and "--resume" in err


def test_torn_latest_pointer_is_refused(tmp_path):
    from gspo_megatron.errors import GspoError
    from gspo_megatron.train_state import latest_checkpoint

    (tmp_path / "step_000003.partial").mkdir()
    (tmp_path / "latest").write_text("step_000003.partial\n")
    with pytest.raises(GspoError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_000002\n")  # pointer to a directory that is gone
    with pytest.raises(GspoError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "none") is None
