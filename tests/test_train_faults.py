"""gspo-train under faults, end to end on CPU with the real trainer, engine and reward worker:
non-finite rewards never reach the weights, a full disk stops the run with its last checkpoint
intact, a training checkpoint is a model checkpoint, a hung rank ends the run within
train.collective_timeout_s, and workers die with their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import train_runs as tr
from conftest import REPO, score_cli

from gspo_megatron.testing.hf_reference import hf_logprobs, max_abs_diff, read_logprobs, write_rows
from gspo_megatron.testing.tiny_model import random_rows


def _start(argv, log: Path) -> subprocess.Popen:
    """gspo-train in one process; tests/ on the path for the reward functions of these tests."""
    env = dict(tr.env(), PYTHONPATH=str(REPO / "tests"))
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd + [str(a) for a in argv], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def _train(argv, log: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    return _finish(_start(argv, log), log, timeout)


def _reward(name: str) -> str:
    return f"rewards.functions=[{{name: 'fault_rewards:{name}', weight: 1.0}}]"


def test_nan_rewards_never_reach_the_weights(multinode_run, demo_init, tmp_path):
    """A reward function returning NaN, inf, 'nan' or None on some samples trains exactly like
    one raising on those samples (each scored 0 and counted), and the weights stay finite.
    Starting point: a training checkpoint as model.ckpt (it is also a model checkpoint)."""
    start = multinode_run / "checkpoints" / "step_000005"
    runs, procs = {}, {}
    # Both at once (one process each, one thread each: the results do not depend on it).
    for name in ("copy_or_nan", "copy_or_raise"):
        runs[name] = tmp_path / name
        argv = tr.overrides(
            demo_init,
            runs[name],
            **{"model.ckpt": start, "train.steps": 2, "train.keep_checkpoints": 1},
        ) + [_reward(name)]
        procs[name] = _start(argv, tmp_path / f"{name}.log")
    for name, proc in procs.items():
        done = _finish(proc, tmp_path / f"{name}.log")
        assert done.returncode == 0, done.stdout[-3000:]
        assert done.stdout.count("reward function failed") == 1, done.stdout[-3000:]  # once a run
    for out in runs.values():  # keep_checkpoints=1: the final one, and latest naming it
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    nan, raised = (tr.checkpoint_tensors(runs[n] / "checkpoints" / "step_000002") for n in runs)
    tensors = [k for k, v in raised.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 20
    for k in tensors:
        assert torch.isfinite(nan[k].float()).all(), k
        assert torch.equal(nan[k], raised[k]), k
    rows = [
        [json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in runs
    ]
    assert [r["reward/errors"] for r in rows[0]] == [r["reward/errors"] for r in rows[1]]
    assert all(r["reward/errors"] > 0 for r in rows[0])


def test_full_disk_stops_the_run_with_the_last_checkpoint_intact(demo_init, small_fs, tmp_path):
    """An 18 MiB disk holds one checkpoint of the demo model (10.8 MB) but not a second: the
    second save is refused before anything is written, the run stops with one line and exit 1,
    and the first checkpoint is complete and still named by `latest`."""
    from gspo_megatron.checkpoint.model import checkpoint_spec

    out = small_fs(18) / "run"
    proc = _train(tr.overrides(demo_init, out, **{"train.steps": 3}), tmp_path / "log")
    assert proc.returncode == 1, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    ckpts = out / "checkpoints"
    assert (
        last.startswith("stopped: no space left on ") and "checkpoint step_000002 needs" in last
    ), last
    assert last.endswith(f"the last complete checkpoint is {ckpts / 'step_000001'}"), last
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]
    assert (ckpts / "latest").read_text().strip() == "step_000001"
    checkpoint_spec(ckpts / "step_000001")  # every data file as long as its metadata says


def test_training_checkpoint_scores_like_its_hf_export(multinode_run, tmp_path):
    """score --ckpt takes a training checkpoint (model + optimizer + scheduler) as it takes a
    converted one; its log-probs equal transformers' on the run's HF export of it."""
    from transformers import AutoModelForCausalLM

    rows = random_rows(6, seed=7)
    write_rows(rows, tmp_path / "rows.jsonl")
    final = multinode_run / "checkpoints" / f"step_{tr.STEPS:06d}"
    score_cli(final, tmp_path / "rows.jsonl", tmp_path / "out.jsonl")
    got = read_logprobs(tmp_path / "out.jsonl")
    want = hf_logprobs(AutoModelForCausalLM.from_pretrained(multinode_run / "hf"), rows)
    assert max_abs_diff(got, want) <= 1e-4  # fp32 megatron vs HF: test_score_parity's bound


def _workers(launcher: subprocess.Popen) -> list:
    return psutil.Process(launcher.pid).children(recursive=True)


def _wait_for_first_step(out: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.2)


def test_hung_rank_ends_the_run_within_the_collective_timeout(demo_init, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = tr.torchrun(
        log,
        tr.overrides(
            demo_init,
            out,
            **{"train.steps": 200, "train.save_every": 0, "train.collective_timeout_s": 10},
        ),
    )
    try:
        _wait_for_first_step(out, proc, log)
        rank1 = [
            p
            for p in _workers(proc)
            if p.environ().get("RANK") == "1" and p.environ().get("LOCAL_RANK") == "1"
        ]
        assert rank1, "no rank-1 worker found"
        stopped_at = time.time()
        for p in rank1:
            p.send_signal(signal.SIGSTOP)  # alive, holding its sockets, never answering
        rc = proc.wait(timeout=150)
        took = time.time() - stopped_at
    finally:
        tr.kill_tree(proc)
    text = log.read_text()
    assert rc != 0
    # 10 s for rank 0's collective to time out, then torchrun's grace period for the stopped
    # rank (SIGTERM waits while a process is stopped; torchrun SIGKILLs it after 30 s).
    assert took < 10 + 60, took
    assert "stopped: a collective waited longer than train.collective_timeout_s=10 s" in text, text[
        -3000:
    ]


def test_workers_die_with_their_launcher(demo_init, tmp_path):
    """SIGKILL of torchrun (as a scheduler or the OOM killer does) takes its workers along
    instead of leaving them training unobserved."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = tr.torchrun(
        log, tr.overrides(demo_init, out, **{"train.steps": 200, "train.save_every": 0})
    )
    workers = []
    try:
        _wait_for_first_step(out, proc, log)
        workers = _workers(proc)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        tr.kill_tree(proc)
        for p in workers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_rewards_that_defeat_the_numbers_the_logs_and_the_process_table(demo_init, tmp_path):
    """A reward of ~1e300 on some prompts (float64 sums and squares of it overflow) and ~1e-300
    on the others (differences far below the advantage's eps), printing 20 KB and leaving a
    child process behind at every call: the run trains on the large ones (finite statistics,
    weights move), says once that the tiny ones taught nothing, shows a bounded part of the
    printing, and no process it started outlives it."""
    out, children = tmp_path / "run", tmp_path / "children"
    argv = tr.overrides(demo_init, out, **{"train.steps": 2, "train.save_every": 0})
    env = dict(tr.env(), PYTHONPATH=str(REPO / "tests"), GSPO_TEST_CHILDREN=str(children))
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    proc = subprocess.run(
        cmd + argv + ["rewards.functions=[{name: 'reward_fns:huge_or_tiny', weight: 1.0}]"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        # Finite (metrics.jsonl writes null for inf) and of the rewards' own size: not overflowed.
        assert r["reward/std"] is not None and r["reward/std"] > 1e200, r["reward/std"]
        assert r["train/grad_norm"] > 0
    assert sum(r["reward/zero_advantage_groups"] for r in rows) > 0
    assert proc.stderr.count("group(s) of different rewards got advantage 0") == 1
    # 2 steps x 64 responses x 20 KB printed: 64 KiB shown, then one line that says so.
    assert proc.stderr.count("[reward huge_or_tiny] rrrr") <= 4
    assert "the rest of their output is not shown" in proc.stderr
    assert len(proc.stderr) < 200_000
    final = tr.checkpoint_tensors(out / "checkpoints" / "step_000002")
    first = tr.checkpoint_tensors(demo_init / "mcore")
    assert not torch.equal(
        final["embedding.word_embeddings.weight"], first["embedding.word_embeddings.weight"]
    )
    pids = [int(x) for x in children.read_text().split()]
    assert len(pids) == 2 * 64
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, f"{len(alive)} of the reward's child processes outlived the run"


@pytest.mark.parametrize("sharded", ["false", "true"], ids=["optimizer", "distributed optimizer"])
def test_dynamic_sampling_that_finds_nothing_saves_and_resumes(demo_init, tmp_path, sharded):
    """A constant reward: every group is flat, dynamic sampling finds nothing to train on in
    any step. Each step says so (numbered as the metrics number it), the checkpoints before any
    optimizer step save, hold the initial weights exactly, and resume; with megatron's plain
    optimizer (the demo's) and its distributed one, whose states before a first step differ."""
    out = tmp_path / "run"
    common = {
        "optim.use_distributed_optimizer": sharded,
        "rollout.dynamic_sampling": "true",
        "rollout.max_sampling_rounds": 2,
        "rewards.functions": "[{name: 'reward_fns:constant', weight: 1.0}]",
    }
    first = _train(tr.overrides(demo_init, out, **common, **{"train.steps": 2}), tmp_path / "a")
    assert first.returncode == 0, first.stdout[-3000:]
    for step in (1, 2):
        assert f"step {step}: no informative group to train on" in first.stdout
    assert "step 0:" not in first.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/sequences"] == 0 for r in rows)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001", "step_000002"]
    saved = tr.checkpoint_tensors(ckpts / "step_000002")
    initial = tr.checkpoint_tensors(demo_init / "mcore")
    weights = [k for k in initial if isinstance(initial[k], torch.Tensor)]
    assert weights and all(torch.equal(saved[k], initial[k]) for k in weights)
    argv = tr.overrides(demo_init, out, **common, **{"train.steps": 3})
    again = _train(["--resume"] + argv, tmp_path / "b")
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {ckpts / 'step_000002'} (step 2)" in again.stdout
    assert "step 3: no informative group to train on" in again.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


_WRITER_SCRIPT = """
import multiprocessing, os, sys
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from gspo_megatron.checkpoint.training import writers_die_with_trainer
if sys.argv[2] == "guarded":
    writers_die_with_trainer()
print(os.getpid(), flush=True)
bucket = (sys.argv[1], "shard", ([], []))
queue = multiprocessing.get_context("fork").Queue()
FileSystemWriterAsync.write_preloaded_data_multiproc([], False, 0, [bucket], queue)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_checkpoint_writers_die_with_a_killed_trainer(tmp_path):
    """megatron's checkpoint save forks a writer per bucket (from the trainer, or from the
    process an async save forks). Here megatron's own writer function runs on a bucket whose
    file is a FIFO nobody reads, so the writer blocks in open() as a slow disk would hold it;
    the trainer is SIGKILLed. With the trainer's guard (save_checkpoint installs it) the writer
    is gone within seconds; without it (megatron alone, run beside it) it is left orphaned, the
    leak the guard exists for."""
    runs = {}
    for mode in ("guarded", "plain"):
        fifo = tmp_path / f"{mode}.distcp"
        os.mkfifo(fifo)
        runs[mode] = subprocess.Popen(
            [sys.executable, "-c", _WRITER_SCRIPT, str(fifo), mode],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            start_new_session=True,
        )
    writers = {}
    for mode, proc in runs.items():
        trainer = psutil.Process(int(proc.stdout.readline()))
        deadline = time.time() + 60
        while not trainer.children():
            assert proc.poll() is None and time.time() < deadline, "no writer was forked"
            time.sleep(0.05)
        (writers[mode],) = trainer.children()
    time.sleep(0.5)  # the writers are past their start, blocked in open()
    assert all(_alive(w.pid) for w in writers.values())
    for proc in runs.values():
        proc.kill()
        proc.wait()
    deadline = time.time() + 5  # the kernel's signal is immediate; 5 s is for a loaded machine
    while _alive(writers["guarded"].pid) and time.time() < deadline:
        time.sleep(0.05)
    left = {mode: _alive(w.pid) for mode, w in writers.items()}
    if left["plain"]:
        writers["plain"].kill()
    assert left == {"guarded": False, "plain": True}


@pytest.mark.parametrize(
    "sig, code, what",
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGHUP, 129, "SIGHUP (the terminal or session closed)"),
    ],
    ids=["SIGTERM", "SIGHUP"],
)
def test_a_signal_to_the_launch_is_one_line_and_its_exit_status(
    demo_init, tmp_path, sig, code, what
):
    """SIGTERM (a scheduler) or SIGHUP (a closed terminal) to launch/train.sh mid-run: the
    workers' one line, the signal's exit status, no torchrun traceback or shutdown log."""
    out, log = tmp_path / "run", tmp_path / "log"
    argv = tr.overrides(demo_init, out, **{"train.steps": 200, "train.save_every": 0})
    proc = subprocess.Popen(
        ["bash", "launch/train.sh", "launch/configs/tiny_cpu.yaml", *argv],
        cwd=REPO,
        env=dict(tr.env(), NPROC_PER_NODE="2", PYTHON=sys.executable),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_first_step(out, proc, log)
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == code, log.read_text()[-3000:]
    finally:
        tr.kill_tree(proc)
    text = log.read_text()
    lines = [x for x in text.splitlines() if "terminated:" in x]
    assert lines == [f"terminated: {what}; no partial output was left looking complete"], text
    assert "Traceback" not in text and "closing signal" not in text, text[-3000:]


def test_a_failed_checkpoint_write_names_the_os_error(demo_init, tmp_path):
    """The file-size limit (ulimit -f 2 MiB) makes the first checkpoint's write fail inside
    torch.save's C++ writer, which loses the OS error: the run stops in one line that names it
    (errno, text and file), the partial checkpoint removed."""
    import resource

    out = tmp_path / "run"
    argv = tr.overrides(demo_init, out, **{"train.steps": 1})
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    proc = subprocess.run(
        cmd + argv,
        cwd=REPO,
        env=tr.env(),
        capture_output=True,
        text=True,
        timeout=400,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    step = out / "checkpoints" / "step_000001"
    assert (
        f"\nstopped: writing checkpoint {step} failed ([Errno 27] File too large: "
        f"'{step}.partial/__0_0.distcp'); no complete checkpoint was written yet\n"
    ) in proc.stderr
    assert not (out / "checkpoints" / "step_000001.partial").exists() and not step.exists()
