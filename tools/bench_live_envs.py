"""gspo-eval of the agent config at scale: live environment processes and memory, capped by
agent.max_parallel_envs, beside the same evaluation with every episode live at once, in one run.

    python tools/bench_live_envs.py [--prompts 64] [--n 64] [--baseline-n 8]

The agent demo's tiny model (made under ``--init`` if missing) and its lookup environment;
``--prompts`` x ``--n`` episodes with the machine's default cap, then ``--prompts`` x
``--baseline-n`` with the cap lifted to their number (how gspo-eval ran before the cap: every
episode's processes at once; at the full --n that exhausted this 24 GiB machine). Each run is a
gspo-eval subprocess whose process tree is sampled every 0.2 s: the most processes at once, the
tree's largest total PSS and the machine's lowest available memory, and the wall time. Prints a
table and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def watch(cmd, env) -> dict:
    """Run ``cmd``; its peak process count, peak tree PSS, lowest available memory, wall."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    top = psutil.Process(proc.pid)
    peak_procs = peak_pss = 0
    low_avail = psutil.virtual_memory().available
    while proc.poll() is None:
        try:
            tree = [top] + top.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        pss = 0
        for p in tree:
            try:
                pss += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak_procs, peak_pss = max(peak_procs, len(tree)), max(peak_pss, pss)
        low_avail = min(low_avail, psutil.virtual_memory().available)
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"bench_live_envs: gspo-eval failed:\n{err[-3000:]}")
    return {
        "procs": peak_procs,
        "pss_gib": peak_pss / (1 << 30),
        "low_avail_gib": low_avail / (1 << 30),
        "seconds": time.monotonic() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", type=Path, default=Path("outputs/bench_live_envs/init"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--baseline-n", type=int, default=8)
    args = ap.parse_args()

    import yaml

    from gspo_megatron.rollout.episodes.agent_config import AgentConfig
    from gspo_megatron.rollout.machine import machine_envs
    from gspo_megatron.tasks.agent_demo import prepare

    if not (args.init / "hf" / "model.safetensors").is_file():
        prepare(args.init, rows=256, warm_start_steps=40, warm_start_lr=2e-3, seed=0)
    cap = machine_envs(AgentConfig(environment="m:C"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_live_envs_"))
    rows = (args.init / "train.jsonl").read_text().splitlines()[: args.prompts]
    (tmp / "data.jsonl").write_text("\n".join(rows) + "\n")
    base = yaml.safe_load((REPO / "launch/configs/tiny_agent_cpu.yaml").read_text())
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", PYTHONWARNINGS="ignore")
    results = []
    for name, n, max_envs in (
        ("capped (default)", args.n, 0),
        ("all live at once", args.baseline_n, args.prompts * args.baseline_n),
    ):
        cfg = dict(base, agent=dict(base["agent"], max_parallel_envs=max_envs))
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [
            sys.executable,
            "-m",
            "gspo_megatron.evaluate",
            "--model",
            str(args.init / "hf"),
            "--config",
            str(tmp / "config.yaml"),
            "--data",
            str(tmp / "data.jsonl"),
            "--n",
            str(n),
            "--max-new-tokens",
            "64",
            "--kv-cache-gib",
            "0.25",
            "--out",
            str(tmp / name.split()[0]),
            "--overwrite",
        ]
        got = watch(cmd, env)
        summary = json.loads((tmp / name.split()[0] / "summary.json").read_text())
        results.append((name, n, max_envs or cap, got, summary.get("mean_reward")))
    print(
        f"bench_live_envs: gspo-eval of {args.prompts} prompts on the agent config; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB, {datetime.date.today()}"
    )
    print(
        f"{'run':>18} {'episodes':>9} {'live cap':>9} {'procs peak':>11} "
        f"{'tree PSS GiB':>13} {'min avail GiB':>14} {'wall s':>7} {'reward':>7}"
    )
    for name, n, live, got, reward in results:
        print(
            f"{name:>18} {args.prompts * n:>9} {live:>9} {got['procs']:>11} "
            f"{got['pss_gib']:>13.2f} {got['low_avail_gib']:>14.1f} {got['seconds']:>7.1f} "
            f"{reward:>7.3f}"
        )


if __name__ == "__main__":
    main()
