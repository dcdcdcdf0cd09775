"""Plot a run's reward and GSPO clip-fraction curves to a PNG.

    python tools/plot_metrics.py --run outputs/quickstart/run [--out curves.png]

Reads ``<run>/metrics.jsonl`` (written by gspo-train), draws ``reward/mean`` (with its
per-step spread) and ``gspo/clip_fraction`` (and, for multi-turn runs, ``agent/tool_calls``)
against the step, and prints the mean reward over
the first and last 10% of steps, the demo's success measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gspo_megatron.errors import GspoError, exit_on_error  # noqa: E402


def first_last_tenth(values):
    """Mean over the first and the last 10% of ``values`` (at least one each)."""
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    reward = [r["reward/mean"] for r in rows]
    std = [r.get("reward/std") or 0.0 for r in rows]
    clip = [r.get("gspo/clip_fraction") or 0.0 for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(steps, reward, color="tab:blue", label="reward/mean")
    a.fill_between(
        steps,
        [m - s for m, s in zip(reward, std)],
        [m + s for m, s in zip(reward, std)],
        color="tab:blue",
        alpha=0.15,
        label="± reward/std",
    )
    held = [
        (r["step"], r["eval/mean_reward"]) for r in rows if r.get("eval/mean_reward") is not None
    ]
    if held:  # validation (train.eval_every): the held-out reward of the policy at that step
        a.plot(*zip(*held), "o-", color="tab:green", label="eval/mean_reward (held out)")
    a.set_ylabel("reward")
    # Rewards in [0, 1] for the demos' functions; an environment's per-turn rewards add to it.
    a.set_ylim(-0.05, max([1.05] + [m + sd + 0.05 for m, sd in zip(reward, std)]))
    a.legend(loc="lower right")
    a.grid(alpha=0.3)
    b.plot(steps, clip, color="tab:red", label="gspo/clip_fraction")
    b.set_ylabel("clipped sequences")
    b.set_xlabel("GSPO step")
    top = 1.0
    if any("agent/tool_calls" in r for r in rows):  # multi-turn episodes (agent.environment)
        calls = [r.get("agent/tool_calls") or 0.0 for r in rows]
        b.plot(steps, calls, color="tab:purple", label="agent/tool_calls (per episode)")
        b.set_ylabel("clipped sequences / tool calls")
        top = max(1.0, max(calls) * 1.05)
    b.set_ylim(0, top)
    b.legend(loc="upper right")
    b.grid(alpha=0.3)
    fig.suptitle("GSPO training curves")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".partial.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    plt.close(fig)


@exit_on_error
def main(argv=None) -> None:
    from gspo_megatron.metrics import METRICS_FILE, read_metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="gspo-train output directory")
    ap.add_argument("--out", type=Path, help="PNG path (default <run>/curves.png)")
    args = ap.parse_args(argv)
    path = args.run / METRICS_FILE
    if not path.is_file():
        raise GspoError(f"{path}: no such file (is --run a gspo-train output directory?)")
    rows = read_metrics(path)
    if not rows:
        raise GspoError(f"{path}: no steps logged yet")
    out = args.out or args.run / "curves.png"
    plot(rows, out)
    first, last = first_last_tenth([r["reward/mean"] for r in rows])
    held = [r["eval/mean_reward"] for r in rows if r.get("eval/mean_reward") is not None]
    held_out = f"; held-out reward {held[0]:.3f} -> {held[-1]:.3f}" if held else ""
    print(
        f"{len(rows)} steps; mean reward first 10%: {first:.3f}, last 10%: {last:.3f} "
        f"(gain {last - first:+.3f}){held_out}; plot: {out}"
    )


if __name__ == "__main__":
    main()
