"""GSPO against GRPO, with and without routing replay, on the same MoE policy and task.

    python tools/compare_objectives.py --out outputs/compare [--steps 80] [--runs gspo,grpo]

The claim this project rests on: on a Mixture-of-Experts model the experts chosen for a token move
between pi_old and the policy being updated, token-level ratios (GRPO) then swing and need
routing replay, while GSPO's sequence ratio does not. This tool trains one policy four times with
the same seeds, data and learning rate, each a plain gspo-train run under torchrun:

    gspo       sequence ratio, clip 3e-4 / 4e-4, no replay (the paper's GSPO)
    grpo       token ratios, clip 0.2 / 0.27, no replay
    grpo_r2    grpo, replaying pi_old's routes in the updates (the paper's GRPO baseline)
    grpo_r3    grpo, replaying the rollout engine's routes

The task is the demo's copy task made longer (16 words, so responses of 17 tokens) on a tiny
Qwen3-MoE with 4 MoE layers of 8 experts (top-2), after a short supervised warm start; every
rollout batch is split into 4 minibatches, so the policy (and its routes) drift within a batch.

Writes ``DIR/compare.png`` (per run and step: reward, clip fraction, train/moe_route_change, the
spread of token log-ratios, the engine/trainer log-prob gap) and ``DIR/summary.json`` (per run:
reward over the first and last 10% of steps, means of route change, clip fraction, token
log-ratio spread and route agreement, whether the reward fell by more than half from its best,
wall seconds). The runs themselves stay under ``DIR/runs/<name>`` (TensorBoard, metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gspo_megatron.checkpoint.atomic import atomic_write_text  # noqa: E402
from gspo_megatron.errors import GspoError, exit_on_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

GRPO = {"loss.variant": "grpo", "loss.clip_low": 0.2, "loss.clip_high": 0.27}
RUNS = {
    "gspo": {"loss.variant": "gspo", "loss.clip_low": 3e-4, "loss.clip_high": 4e-4},
    "grpo": GRPO,
    "grpo_r2": {**GRPO, "loss.routing_replay": "r2"},
    "grpo_r3": {**GRPO, "loss.routing_replay": "r3"},
}

# 4 MoE layers of 8 experts, top-2, on the demo model's hidden size and attention.
MODEL_SHAPE = dict(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2)
MODEL_SHAPE.update(mlp_only_layers=[])
WORDS = 16
ALPHABET = 8  # a random answer gets 1/8 of its positions right

# R2 and R3 coincide wherever the engine routes exactly as the trainer does (CPU, fp32): dashed
# and dotted lines keep both visible.
STYLES = {"gspo": "-", "grpo": "-", "grpo_r2": "--", "grpo_r3": ":"}

PANELS = [
    ("reward/mean", "reward"),
    ("gspo/clip_fraction", "clip fraction"),
    ("train/moe_route_change", "MoE route change (pi_old vs last minibatch)"),
    ("gspo/token_log_ratio_std", "spread of token log-ratios"),
    ("rollout/logprob_abs_diff_mean", "|engine - trainer| log-prob per token"),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="tools/compare_objectives.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=80, help="RL steps per run")
    ap.add_argument(
        "--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}"
    )
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    ap.add_argument("--warm-start-steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier call")
    args = ap.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        raise GspoError(f"--runs {unknown or args.runs}: choose from {', '.join(RUNS)}")
    if args.steps < 1 or args.nproc < 1 or args.warm_start_steps < 0:
        raise GspoError("--steps and --nproc must be >= 1, --warm-start-steps >= 0")
    taken = [r for r in args.runs if (args.out / "runs" / r).exists()]
    if taken and not args.overwrite:
        raise GspoError(
            f"{args.out / 'runs' / taken[0]} already exists (pass --overwrite to run again)"
        )
    return args


def prepare(out: Path, warm_start_steps: int, seed: int) -> Path:
    """The task data and the warm-started policy (once; later calls reuse them)."""
    init = out / "init"
    if not (init / "mcore" / "metadata.json").is_file():
        from gspo_megatron.demo import prepare as prepare_demo

        prepare_demo(
            init,
            rows=2048,
            alphabet=ALPHABET,
            length=WORDS,
            warm_start_steps=warm_start_steps,
            warm_start_lr=3e-3,
            seed=seed,
            model_shape=MODEL_SHAPE,
        )
    return init


def train(name: str, init: Path, out: Path, steps: int, nproc: int, seed: int) -> float:
    """One gspo-train run; returns its wall seconds."""
    run = out / "runs" / name
    if run.exists():
        import shutil

        shutil.rmtree(run)
    overrides = {
        "model.ckpt": init / "mcore",
        "data.path": init / "train.jsonl",
        "train.output_dir": run,
        "train.steps": steps,
        "train.save_every": 0,
        "train.keep_checkpoints": 1,
        "train.seed": 1234 + seed,
        "rollout.max_prompt_tokens": WORDS + 8,
        "rollout.max_new_tokens": WORDS + 8,
        "loss.num_minibatches": 4,
        "train.prompts_per_step": 8,
        "train.eval_every": 0,
        **RUNS[name],
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "gspo_megatron.train"]
    cmd += ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    print(f"compare: {name}: {' '.join(f'{k}={v}' for k, v in RUNS[name].items())}", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.time()
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise GspoError(f"run {name} failed (its output is above; outputs in {run})")
    return time.time() - start


def summarise(name: str, rows: list, seconds: float) -> dict:
    def series(key):
        return [r[key] for r in rows if r.get(key) is not None]

    def mean(values):
        return sum(values) / len(values) if values else None

    reward = series("reward/mean")
    n = max(1, len(reward) // 10)
    window = max(1, min(5, len(reward)))
    smooth = [mean(reward[max(0, i - window + 1) : i + 1]) for i in range(len(reward))]
    best, last = max(smooth), mean(reward[-n:])
    return {
        "name": name,
        "steps": len(rows),
        "reward_first_10pct": mean(reward[:n]),
        "reward_last_10pct": last,
        "reward_best_5step_mean": best,
        "collapsed": last < best / 2,
        "route_change_mean": mean(series("train/moe_route_change")),
        "clip_fraction_mean": mean(series("gspo/clip_fraction")),
        "token_log_ratio_std_mean": mean(series("gspo/token_log_ratio_std")),
        "route_agreement_mean": mean(series("rollout/route_agreement")),
        "logprob_gap_mean": mean(series("rollout/logprob_abs_diff_mean")),
        "wall_seconds": round(seconds, 1),
    }


def plot(runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.3 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows if r.get(key) is not None]
            values = [r[key] for r in rows if r.get(key) is not None]
            ax.plot(steps, values, STYLES.get(name, "-"), label=name)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(runs))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


@exit_on_error
def main(argv=None) -> None:
    from gspo_megatron.metrics import read_metrics

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    init = prepare(args.out, args.warm_start_steps, args.seed)
    runs, summary = {}, []
    for name in args.runs:
        seconds = train(name, init, args.out, args.steps, args.nproc, args.seed)
        runs[name] = read_metrics(args.out / "runs" / name / "metrics.jsonl")
        summary.append(summarise(name, runs[name], seconds))
        print(f"compare: {name}: {json.dumps(summary[-1])}", flush=True)
    plot(runs, args.out / "compare.png")
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"compare: wrote {args.out / 'compare.png'} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
