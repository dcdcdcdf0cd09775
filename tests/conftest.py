"""Shared fixtures: tiny random HF models, their converted checkpoints, reference log-probs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from gspo_megatron.distributed.parallel import free_port
from gspo_megatron.testing.hf_reference import hf_logprobs, write_rows
from gspo_megatron.testing.tiny_model import (
    make_hf_model,
    random_rows,
    tiny_dense_config,
    tiny_glm_config,
    tiny_moe_config,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
# Test helpers (train_runs, reward functions imported by path) live beside the tests.
sys.path.insert(0, str(REPO / "tests"))


def child_env() -> dict:
    """The environment for a child process: no torchrun rendezvous inherited (a test process
    that built a model in-process has torch.distributed state of its own), no warnings."""
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def interruptible() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: its default action back. A
    suite started from a background job (``bash .ci/run &``, nohup) inherits SIGINT ignored, and
    Python then leaves it ignored in every child (measured: gspo-convert wrote to the end)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def torchrun_cmd(nproc: int) -> list:
    """`python -m torch.distributed.run` for ``nproc`` processes on a free loopback port."""
    port = str(free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return torchrun + ["--master-addr", "127.0.0.1", "--master-port", port]


def run_cli(
    args, nproc: int = 0, timeout: int = 600, check: bool = True, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """Run `python -m ...` (nproc=0) or `torchrun --nproc-per-node nproc -m ...`; ``env``: extra
    environment variables."""
    cmd = (torchrun_cmd(nproc) if nproc else [sys.executable]) + list(args)
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=dict(child_env(), **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def score_cli(ckpt, rows, out, *extra, nproc: int = 0, check: bool = True):
    """`python -m gspo_megatron.score --ckpt CKPT --input ROWS --output OUT [extra]`."""
    paths = ["--ckpt", str(ckpt), "--input", str(rows), "--output", str(out)]
    return run_cli(["-m", "gspo_megatron.score", *paths, *extra], nproc=nproc, check=check)


class BatchedRuns:
    """Worker cases that share a world size run in one launch, the first time one of them is
    asked for: starting torchrun and importing megatron in every process costs more than a case
    on CPU. ``cases`` maps a name to (processes, case dict); the worker gets the list of its
    world size's cases (each with its name) as ``--cases FILE`` and writes ``--out FILE``
    (``{name: result}``, read back with ``load``). ``env``: extra environment variables of
    the launches (``harmless_change``)."""

    def __init__(self, worker: str, cases: dict, tmp: Path, load, args=(), env=None):
        self.worker, self.cases, self.tmp, self.load, self.args = (
            worker,
            cases,
            tmp,
            load,
            list(args),
        )
        self.env = env
        self.done = {}

    def __getitem__(self, name: str):
        nproc = self.cases[name][0]
        if nproc not in self.done:
            import json

            batch = [{**case, "name": n} for n, (p, case) in self.cases.items() if p == nproc]
            spec, out = self.tmp / f"cases{nproc}.json", self.tmp / f"out{nproc}"
            spec.write_text(json.dumps(batch))
            run_cli(
                [self.worker, "--cases", str(spec), "--out", str(out)] + self.args,
                nproc=nproc if nproc > 1 else 0,
                env=self.env,
            )
            self.done[nproc] = self.load(out)
        return self.done[nproc][name]


def harmless_change() -> dict:
    """Environment under which a computation must give the same result up to rounding: the
    other end of ATen's vectorised kernels (``default`` unless that is what runs now, then
    ``avx2``) and one thread instead of several, so reductions are summed in another order.
    A single-process reference run under it shows the spread that rounding alone makes, after
    however many optimizer steps: what a comparison after such steps may allow (with a margin),
    on whatever machine the suite runs. Adam divides by sqrt(v), so where a gradient element is
    nearly 0 a last-bit change moves its weight by up to the learning rate: no fixed tolerance
    holds on every CPU (docs/platform.md)."""
    import torch

    current = torch.backends.cpu.get_cpu_capability().lower()
    return {
        "ATEN_CPU_CAPABILITY": "avx2" if current == "default" else "default",
        "OMP_NUM_THREADS": "1",
    }


class TinyModel:
    def __init__(self, root: Path, config) -> None:
        from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore

        self.root = root
        self.hf_dir = root / "hf"
        self.model = make_hf_model(config, self.hf_dir)
        write_tokenizer(self.hf_dir)
        self.rows = random_rows(12, seed=1)
        self.input = root / "rows.jsonl"
        write_rows(self.rows, self.input)
        self.reference = hf_logprobs(self.model, self.rows)
        self.ckpt = root / "mcore"
        convert_hf_to_mcore(self.hf_dir, self.ckpt, show_progress=False)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> TinyModel:
    return TinyModel(tmp_path_factory.mktemp("moe"), tiny_moe_config())


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory) -> TinyModel:
    return TinyModel(tmp_path_factory.mktemp("dense"), tiny_dense_config())


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory) -> TinyModel:
    """GLM-4.5-style MoE (sigmoid router with correction bias, grouped top-k, shared expert,
    dense first layer, partial RoPE, q/k/v biases, an MTP layer in the checkpoint)."""
    return TinyModel(tmp_path_factory.mktemp("glm"), tiny_glm_config())


# -- gspo-train runs shared by several test modules -------------------------------------------


@pytest.fixture(scope="session")
def vllm_moe(tmp_path_factory) -> TinyModel:
    """A tiny MoE vLLM's CPU backend runs (head_dim 64: its attention rejects 16)."""
    from gspo_megatron.testing.tiny_model import tiny_moe_config

    return TinyModel(
        tmp_path_factory.mktemp("vllm_moe"), tiny_moe_config(head_dim=64, hidden_size=128)
    )


@pytest.fixture(scope="session")
def vllm_glm(tmp_path_factory) -> TinyModel:
    """A tiny GLM-4.5-style MoE vLLM's CPU backend runs (head_dim 64)."""
    return TinyModel(
        tmp_path_factory.mktemp("vllm_glm"), tiny_glm_config(head_dim=64, hidden_size=128)
    )


@pytest.fixture(scope="session")
def demo_init(tmp_path_factory) -> Path:
    from gspo_megatron.tasks.demo import prepare

    out = tmp_path_factory.mktemp("demo") / "init"
    prepare(out, rows=256, alphabet=16, length=4, warm_start_steps=10, warm_start_lr=3e-3, seed=0)
    return out


@pytest.fixture(scope="session")
def agent_init(tmp_path_factory) -> Path:
    """The agent demo's init/ (BPE chat tokenizer, warm-started tiny MoE), smaller."""
    from gspo_megatron.tasks.agent_demo import prepare

    out = tmp_path_factory.mktemp("agent_demo") / "init"
    prepare(out, rows=256, warm_start_steps=40, warm_start_lr=2e-3, seed=0)
    return out


@pytest.fixture(scope="session")
def multinode_run(demo_init, tmp_path_factory) -> Path:
    """The reference: two 'nodes' of one process each, launched by launch/multinode.sh."""
    import train_runs as tr

    out = tmp_path_factory.mktemp("multinode") / "run"
    port = str(free_port())
    procs, logs = [], []
    for node in (0, 1):
        env = dict(
            tr.env(),
            NNODES="2",
            NODE_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            NPROC_PER_NODE="1",
            PYTHON=sys.executable,
        )
        log = out.parent / f"node{node}.log"
        logs.append(log)
        procs.append(
            subprocess.Popen(
                ["bash", "launch/multinode.sh", "launch/configs/tiny_cpu.yaml"]
                + tr.overrides(demo_init, out, **tr.KL, **tr.DYNAMIC, **tr.validation(demo_init))
                + ["train.export_hf=true"],
                cwd=REPO,
                env=env,
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
        )
    for proc, log in zip(procs, logs):
        tr.wait(proc, log)
    return out


@pytest.fixture()
def small_fs(tmp_path):
    """``make(size_mib)`` -> a directory on a tmpfs of that size (a disk that fills up for
    real). Needs the right to mount (root, as on the project's CI machines); skipped otherwise."""
    mounted = []

    def make(size_mib: int) -> Path:
        path = tmp_path / f"small_fs{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(
                f"cannot mount a {size_mib} MiB tmpfs here (needs root): {proc.stderr.strip()}"
            )
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
