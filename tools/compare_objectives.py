"""GSPO against GRPO, with and without routing replay, under a real engine/trainer mismatch.

    python tools/compare_objectives.py --out outputs/compare [--seeds 0,1,2] [--steps 60]
    python tools/compare_objectives.py --out outputs/compare --quick          # one seed, ~10 min
    python tools/compare_objectives.py --out outputs/clip_sweep --sweep-clip 3e-4,1e-3,3e-3,1e-2

The claim this project rests on: on a Mixture-of-Experts model the experts chosen for a token
differ between the engine that samples and the trainer, and move between pi_old and the policy
being updated; token-level ratios (GRPO) then become noise and need routing replay, while GSPO's
sequence ratio does not. Each run is a plain gspo-train under torchrun, all with the same data,
learning rate and seeds, under the conditions the published accounts name: a bf16 engine beside
an fp32 trainer (rollout.dtype=bf16), 4 off-policy minibatches per rollout batch, responses of
65 tokens (a 64-word copy task), and an MoE deeper and wider than the demo's (6 MoE layers of 16
experts, top-2, against the demo's 2 of 4). The runs:

    gspo           sequence ratio, clip CLIP_GSPO (see below), no replay
    grpo           token ratios, clip 0.2 / 0.27, no replay
    grpo_r2        grpo, replaying pi_old's routes in the updates
    grpo_r3        grpo, replaying the engine's routes in pi_old's forward and the updates
    gspo_rollout   gspo with pi_old's log-probs taken from the engine (loss.old_logprobs=rollout)
    grpo_rollout   grpo with pi_old's log-probs taken from the engine

Every seed warm-starts its own model from its own initialisation and data, so the spread over
seeds covers the model as well as the sampling. The warm start (240 supervised steps) ends just
after the copy loss leaves its plateau at ln 8 (measured on seed 0: flat until step ~190, 1.78 at
240, 0.57 at 300), so RL starts from a policy that copies part of the words, not from chance
(after a 60-step warm start, at chance, the reward moved from 0.09 to 0.11 in 40 RL steps: too
little learning to compare objectives on).

``--sweep-clip`` runs gspo alone at each clip_low (clip_high = 4/3 of it, the paper's ratio) for
``--steps`` steps on seed 0 and writes ``sweep.json`` with each value's mean clip fraction and the
one nearest (in log scale) to the paper's clipping of about 15% of tokens. The sweep looks at the
clip fraction only, never at the reward; CLIP_GSPO below is what it chose (docs/benchmarks.md).

Writes ``DIR/compare.png`` (per run, the mean over seeds and its min-max band per step: reward,
clip fraction, route change, spread of token log-ratios, engine/trainer gap, route agreement) and
``DIR/summary.json`` (per run: each seed's figures and their mean, min and max) and ``DIR/table.md``
(the same as a Markdown table: mean over seeds and min-max). The runs stay
under ``DIR/runs/<name>/seed<k>`` (TensorBoard, metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gspo_megatron.checkpoint.atomic import atomic_write_text  # noqa: E402
from gspo_megatron.errors import GspoError, exit_on_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# GSPO's clip_low here: the paper's 3e-4 clips about 15% of tokens at its learning rate (1e-6 on
# Qwen3-30B-A3B); at this tiny model's learning rate (1e-3) its sequence ratios move further per
# update, so the same 15% needs a wider range. Chosen by --sweep-clip (clip fraction only; the
# sweep and its figures are in docs/benchmarks.md). clip_high keeps the paper's 4/3 of clip_low.
CLIP_GSPO = 1e-2
PAPER_CLIP_FRACTION = 0.15

GRPO = {"loss.variant": "grpo", "loss.clip_low": 0.2, "loss.clip_high": 0.27}
ENGINE_OLD = {"loss.old_logprobs": "rollout"}


def gspo(clip_low: float) -> dict:
    high = float(f"{clip_low * 4 / 3:.3g}")  # 4e-4, not 3.9999999999999996e-4, on the command line
    return {"loss.variant": "gspo", "loss.clip_low": clip_low, "loss.clip_high": high}


RUNS = {
    "gspo": gspo(CLIP_GSPO),
    "grpo": GRPO,
    "grpo_r2": {**GRPO, "loss.routing_replay": "r2"},
    "grpo_r3": {**GRPO, "loss.routing_replay": "r3"},
    "gspo_rollout": {**gspo(CLIP_GSPO), **ENGINE_OLD},
    "grpo_rollout": {**GRPO, **ENGINE_OLD},
}

# 6 MoE layers of 16 experts (top-2) on the demo model's hidden size and attention; positions
# for the 65-token prompt and up to 72 new tokens.
MODEL_SHAPE = dict(num_hidden_layers=6, num_local_experts=16, num_experts_per_tok=2)
MODEL_SHAPE.update(mlp_only_layers=[], max_position_embeddings=160)
WORDS = 64
ALPHABET = 8  # a random answer gets 1/8 of its positions right

# What every run shares: the mismatch (bf16 engine, fp32 trainer) and the off-policy updates.
CONDITIONS = {
    "model.dtype": "fp32",
    "rollout.dtype": "bf16",
    "loss.num_minibatches": 4,
    "train.prompts_per_step": 8,
    "rollout.max_prompt_tokens": WORDS + 8,
    "rollout.max_new_tokens": WORDS + 8,
    "rollout.kv_cache_gib": 0.1,
    "train.eval_every": 0,
    "train.save_every": 0,
    "train.keep_checkpoints": 1,
}

# Replay variants drawn dashed / dotted so that lines lying on each other stay visible.
STYLES = {"grpo_r2": "--", "grpo_r3": ":", "gspo_rollout": "-.", "grpo_rollout": "-."}

PANELS = [
    ("reward/mean", "reward"),
    ("gspo/clip_fraction", "clip fraction (sequences for gspo, tokens for grpo)"),
    ("train/moe_route_change", "MoE route change (pi_old vs last minibatch)"),
    ("gspo/token_log_ratio_std", "spread of token log-ratios"),
    ("rollout/logprob_abs_diff_mean", "|engine - trainer| log-prob per token"),
    ("rollout/route_agreement", "engine/trainer route agreement"),
]

# summary.json's per-seed figures: name -> metrics.jsonl key averaged over the run's steps.
MEANS = {
    "clip_fraction": "gspo/clip_fraction",
    "token_log_ratio_std": "gspo/token_log_ratio_std",
    "route_change": "train/moe_route_change",
    "route_agreement": "rollout/route_agreement",
    "route_differs_tokens": "rollout/route_differs_tokens",
    "logprob_gap": "rollout/logprob_abs_diff_mean",
    "token_log_rho_above_0.1": "rollout/token_log_rho_above_0.1",
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="tools/compare_objectives.py", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--steps", type=int, help="RL steps per run (default 60; --quick 8)")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick 0)")
    ap.add_argument(
        "--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}"
    )
    ap.add_argument("--quick", action="store_true", help="one seed, 8 steps: under 10 minutes")
    ap.add_argument(
        "--sweep-clip", help="comma-separated GSPO clip_low values to try instead (seed 0)"
    )
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    ap.add_argument("--warm-start-steps", type=int, default=240)
    ap.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier call")
    args = ap.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 60)
    seeds = args.seeds or ("0" if args.quick else "0,1,2")
    try:
        args.seeds = [int(s) for s in seeds.split(",") if s.strip()]
        args.sweep = [float(c) for c in (args.sweep_clip or "").split(",") if c.strip()]
    except ValueError as e:
        raise GspoError(f"--seeds takes integers and --sweep-clip numbers: {e}") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise GspoError(f"--seeds {seeds!r}: give distinct integers, e.g. 0,1,2")
    if args.sweep_clip is not None and not all(0 < c < 1 for c in args.sweep):
        raise GspoError(f"--sweep-clip {args.sweep_clip!r}: give clip_low values in (0, 1)")
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        raise GspoError(f"--runs {unknown or args.runs}: choose from {', '.join(RUNS)}")
    if args.steps < 1 or args.nproc < 1 or args.warm_start_steps < 0:
        raise GspoError("--steps and --nproc must be >= 1, --warm-start-steps >= 0")
    taken = [d for d in planned(args) if d.exists()]
    if taken and not args.overwrite:
        raise GspoError(f"{taken[0]} already exists (pass --overwrite to run again)")
    return args


def planned(args) -> list:
    """The run directories this call writes."""
    if args.sweep_clip is not None:
        return [args.out / "runs" / sweep_name(c) for c in args.sweep]
    return [args.out / "runs" / r / f"seed{s}" for r in args.runs for s in args.seeds]


def sweep_name(clip_low: float) -> str:
    return f"gspo_clip{clip_low:g}"


def prepare(out: Path, warm_start_steps: int, seed: int) -> Path:
    """One seed's task data and warm-started policy (once; later calls reuse them)."""
    init = out / f"init_seed{seed}"
    if not (init / "mcore" / "metadata.json").is_file():
        from gspo_megatron.tasks.demo import prepare as prepare_demo

        print(
            f"compare: warm-starting the seed {seed} model ({warm_start_steps} steps)", flush=True
        )
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


def train(label: str, loss: dict, init: Path, run: Path, steps: int, nproc: int, seed: int):
    """One gspo-train run into ``run``; returns its wall seconds."""
    if run.exists():
        shutil.rmtree(run)
    overrides = {
        **CONDITIONS,
        "model.ckpt": init / "mcore",
        "data.path": init / "train.jsonl",
        "train.output_dir": run,
        "train.steps": steps,
        "train.seed": 1234 + seed,
        **loss,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "gspo_megatron.train"]
    cmd += ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    print(f"compare: {label}: {' '.join(f'{k}={v}' for k, v in loss.items())}", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.time()
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise GspoError(f"run {label} failed (its output is above; outputs in {run})")
    return time.time() - start


def mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarise(rows: list, seconds: float) -> dict:
    """One run's figures: the reward's first/last 10% and best, and the MEANS over its steps."""
    reward = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
    n = max(1, len(reward) // 10)
    window = max(1, min(5, len(reward)))
    smooth = [mean(reward[max(0, i - window + 1) : i + 1]) for i in range(len(reward))]
    best, last = max(smooth), mean(reward[-n:])
    out = {
        "steps": len(rows),
        "reward_first_10pct": mean(reward[:n]),
        "reward_last_10pct": last,
        "reward_best_5step_mean": best,
        "fell_by_half": last < best / 2,
    }
    for name, key in MEANS.items():
        out[name] = mean([r.get(key) for r in rows])
    out["wall_seconds"] = round(seconds, 1)
    return out


def over_seeds(per_seed: dict) -> dict:
    """Mean, min and max over seeds of every figure (fell_by_half: how many seeds fell)."""
    seeds = list(per_seed.values())
    out = {"seeds": per_seed, "fell_by_half": sum(s["fell_by_half"] for s in seeds)}
    for key in seeds[0]:
        values = [s[key] for s in seeds if isinstance(s[key], (int, float))]
        if key == "fell_by_half" or not values:
            continue
        out[key] = {"mean": mean(values), "min": min(values), "max": max(values)}
    return out


# table.md's columns: (summary key, header, format).
COLUMNS = [
    ("reward_first_10pct", "reward, first 10%", ".3f"),
    ("reward_last_10pct", "last 10%", ".3f"),
    ("reward_best_5step_mean", "best (5-step mean)", ".3f"),
    ("clip_fraction", "clip fraction", ".3f"),
    ("token_log_ratio_std", "token log-ratio spread", ".3f"),
    ("route_change", "route change", ".3f"),
    ("route_agreement", "route agreement", ".4f"),
    ("route_differs_tokens", "tokens routed otherwise", ".3f"),
    ("logprob_gap", "engine gap", ".1e"),
]


def markdown_table(summary: dict) -> str:
    """summary.json as a Markdown table: each figure's mean over seeds and (min-max), and how
    many seeds' rewards fell by half from their best."""
    n = len(next(iter(summary["runs"].values()))["seeds"])
    head = ["run", *[h for _, h, _ in COLUMNS], "fell by half"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in summary["runs"].items():
        cells = [f"`{name}`"]
        for key, _, fmt in COLUMNS:
            v = run.get(key)
            if v is None:
                cells.append("-")  # not measured by this run (no trainer pi_old pass, no replay)
            elif n == 1:
                cells.append(format(v["mean"], fmt))
            else:
                low, high = format(v["min"], fmt), format(v["max"], fmt)
                cells.append(f"{format(v['mean'], fmt)} ({low}-{high})")
        cells.append(f"{run['fell_by_half']} of {n}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, out: Path) -> None:
    """``runs``: name -> list of each seed's metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.3 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for name, seeds in runs.items():
            by_step: dict = {}
            for rows in seeds:
                for r in rows:
                    v = r.get(key)
                    if v is not None and not math.isnan(v):
                        by_step.setdefault(r["step"], []).append(v)
            if not by_step:
                continue
            steps = sorted(by_step)
            line = ax.plot(
                steps, [mean(by_step[s]) for s in steps], STYLES.get(name, "-"), label=name
            )
            if len(seeds) > 1:
                low = [min(by_step[s]) for s in steps]
                high = [max(by_step[s]) for s in steps]
                ax.fill_between(steps, low, high, color=line[0].get_color(), alpha=0.12)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def sweep(args) -> None:
    """GSPO alone at each clip_low: the clip fraction each gives (seed 0)."""
    from gspo_megatron.metrics import read_metrics

    init = prepare(args.out, args.warm_start_steps, 0)
    results = []
    for clip in args.sweep:
        run = args.out / "runs" / sweep_name(clip)
        seconds = train(sweep_name(clip), gspo(clip), init, run, args.steps, args.nproc, 0)
        rows = read_metrics(run / "metrics.jsonl")
        high = gspo(clip)["loss.clip_high"]
        results.append({"clip_low": clip, "clip_high": high, **summarise(rows, seconds)})
        print(f"compare: {sweep_name(clip)}: clip fraction {results[-1]['clip_fraction']:.3f}")
    target = math.log(PAPER_CLIP_FRACTION)
    chosen = min(results, key=lambda r: abs(math.log(max(r["clip_fraction"] or 0, 1e-6)) - target))
    body = {"target_clip_fraction": PAPER_CLIP_FRACTION, "chosen": chosen["clip_low"]}
    body["steps"] = args.steps
    body["results"] = results
    atomic_write_text(args.out / "sweep.json", json.dumps(body, indent=1) + "\n")
    print(f"compare: nearest to {PAPER_CLIP_FRACTION:.0%} clipped: clip_low={chosen['clip_low']:g}")
    print(f"compare: wrote {args.out / 'sweep.json'}")


@exit_on_error
def main(argv=None) -> None:
    from gspo_megatron.metrics import read_metrics

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep_clip is not None:
        return sweep(args)
    inits = {seed: prepare(args.out, args.warm_start_steps, seed) for seed in args.seeds}
    runs: dict = {name: [] for name in args.runs}
    per_seed: dict = {name: {} for name in args.runs}
    for seed in args.seeds:  # seed by seed: a cut-short call still has whole seeds to show
        for name in args.runs:
            run = args.out / "runs" / name / f"seed{seed}"
            label = f"{name} seed {seed}"
            seconds = train(label, RUNS[name], inits[seed], run, args.steps, args.nproc, seed)
            runs[name].append(read_metrics(run / "metrics.jsonl"))
            per_seed[name][f"seed{seed}"] = summarise(runs[name][-1], seconds)
            print(f"compare: {label}: {json.dumps(per_seed[name][f'seed{seed}'])}", flush=True)
    summary = {
        "conditions": {**CONDITIONS, "words": WORDS, "model_shape": MODEL_SHAPE},
        "steps": args.steps,
        "runs": {name: {"loss": RUNS[name], **over_seeds(per_seed[name])} for name in args.runs},
    }
    plot(runs, args.out / "compare.png")
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    atomic_write_text(args.out / "table.md", table)
    print(table, end="")
    print(f"compare: wrote {args.out / 'compare.png'}, summary.json and table.md", flush=True)


if __name__ == "__main__":
    main()
