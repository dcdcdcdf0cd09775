"""gspo-train runs for the tests: the tiny demo's overrides, torchrun launches, SIGKILL of a
whole process tree, and reading a distributed checkpoint back in one process."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import torch
from conftest import REPO, child_env, torchrun_cmd

STEPS = 5
KL = {"loss.kl_coef": 0.01}
"""The reference run and the run killed and resumed against it train with the KL penalty on, so
the resume also proves the frozen reference comes back the same (other runs keep it off)."""
DYNAMIC = {
    "rollout.dynamic_sampling": "true",
    "rewards.functions": "[{name: 'reward_fns:copy_or_flat', weight: 1.0}]",
    "train.save_rollouts": "true",
}
"""... and with dynamic sampling on, over a reward that is flat on about 6 prompts in 16: the
groups it drops, the extra rounds and their prompts must come back the same on resume too."""


def validation(init: Path) -> dict:
    """Validation on the demo's held-out problems at steps 1, 3, 5 (policies after 0, 2, 4
    updates): the resumed run must log the same eval/* figures, and gspo-eval on step 4's
    checkpoint must give step 5's."""
    return {"data.eval_path": init / "held_out.jsonl", "train.eval_every": 2, "train.eval_k": 4}


ASYNC_SAVE = {"train.async_save": "true"}
"""The killed and resumed run writes its checkpoints in the background; the reference writes
them synchronously: the two must hold the same bytes."""


def overrides(init: Path, out: Path, **extra) -> list:
    base = {
        "model.ckpt": init / "mcore",
        "data.path": init / "train.jsonl",
        "train.output_dir": out,
        "train.steps": STEPS,
        "train.save_every": 1,
        "train.keep_checkpoints": 2,
        "train.prompts_per_step": 8,
        "loss.micro_batch_size": 4,
        # tiny_cpu.yaml validates every 5 steps on the quickstart's held-out file: the tests'
        # demo has its own, and validation is on only where a test asks (validation()).
        "data.eval_path": init / "held_out.jsonl",
        "train.eval_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def env() -> dict:
    # torchrun sets 1 thread per process only when a node runs several; the two-node launch
    # (1 process per node) would otherwise reduce in a different order than the one-node run.
    return dict(child_env(), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"))


def torchrun(
    out_log: Path,
    overrides,
    resume: bool = False,
    nproc: int = 2,
    launcher=None,
    config: str = "launch/configs/tiny_cpu.yaml",
) -> subprocess.Popen:
    """gspo-train of ``config`` (the demo's) under ``launcher`` (default: torchrun of ``nproc``
    processes on one node), output in ``out_log``, in a session of its own."""
    cmd = (launcher or torchrun_cmd(nproc)) + ["-m", "gspo_megatron.train", "--config", config]
    cmd += (["--resume"] if resume else []) + list(overrides)
    log = open(out_log, "w")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_tree(proc: subprocess.Popen) -> None:
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


def wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"gspo-train failed ({rc}):\n{log.read_text()[-4000:]}"


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor and object of a megatron distributed checkpoint, read in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(flat))
    return torch.load(flat, weights_only=False)
