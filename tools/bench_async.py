"""Separate rollout ranks with rollout.max_staleness=1 against colocated on-policy training, on
a workload where the rollout waits rather than computes; and the weight transfer beside a bare
broadcast of the same bytes. One run, one machine.

    python tools/bench_async.py [--steps 8] [--sleep 0.1] [--partial]

Both runs are gspo-train on the agent demo's tiny model (made under ``--init`` if missing) with
episodes of 3 turns whose every tool call sleeps ``--sleep`` s (``testing.sleepy_env``):
colocated = 1 process, engine and trainer in turn, s = 0; separate = the same trainer plus one
rollout rank, s = 1, so each batch is sampled while the previous one trains. Steps per second
from the steps after the first (start-up excluded); the trainer's idle time waiting for
batches, the rollout rank's waiting for weights. The bare broadcast: two processes, gloo, the
transfer's byte count in the same bucket size, no gathering, no engine load. ``--partial`` adds
a third run: separate, s=2, partial rollouts with each episode interrupted after its first
turn (heads and tails both sampled while earlier steps train; each environment rebuilt by
replaying that turn's call: ``perf/agent_replay_seconds``). Prints a table and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gspo_megatron.distributed.parallel import free_port  # noqa: E402  (after the path: run from a clone)


def train(init: Path, out: Path, nproc: int, steps: int, sleep: float, extra) -> list:
    data = out.parent / "sleepy.jsonl"
    rows = [json.loads(x) for x in (init / "train.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps(dict(r, sleep_s=sleep)) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "gspo_megatron.train", "--config", "launch/configs/tiny_agent_cpu.yaml"]
    cmd += [
        f"model.ckpt={init / 'mcore'}",
        f"data.path={data}",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "agent.environment=gspo_megatron.testing.sleepy_env:SleepyEnv",
    ] + list(extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_async: gspo-train failed:\n{proc.stderr[-3000:]}")
    print(f"  {out.name}: {time.perf_counter() - t0:.0f} s with start-up", file=sys.stderr)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _bare(rank: int, port: int, nbytes: int, bucket: int, reps: int, q) -> None:
    import datetime as dt

    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=dt.timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, rank, 2, dt.timedelta(seconds=60))
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    sizes = [bucket] * (nbytes // bucket) + ([nbytes % bucket] if nbytes % bucket else [])
    bufs = [torch.ones(n // 4 or 1) for n in sizes]
    best = float("inf")
    for _ in range(reps):
        pg.barrier().wait()
        t0 = time.perf_counter()
        for b in bufs:
            pg.broadcast([b], opts).wait()
        best = min(best, time.perf_counter() - t0)
    if rank == 0:
        q.put(best)


def bare_broadcast(nbytes: int, bucket: int, reps: int = 5) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_bare, args=(r, port, nbytes, bucket, reps, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    best = q.get(timeout=120)
    for p in procs:
        p.join()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", type=Path, default=REPO / "outputs/agent_demo/init")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.1)
    ap.add_argument(
        "--partial", action="store_true", help="also separate s=2 with partial rollouts"
    )
    args = ap.parse_args()
    if not (args.init / "hf" / "model.safetensors").is_file():
        from gspo_megatron.tasks.agent_demo import prepare

        prepare(args.init, rows=64, warm_start_steps=10, warm_start_lr=3e-3, seed=0)
    init = args.init.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("bench_async: colocated s=0, then separate s=1 ...", file=sys.stderr)
        col = train(init, tmp / "colocated", 1, args.steps, args.sleep, [])
        sep = train(
            init,
            tmp / "separate",
            2,
            args.steps,
            args.sleep,
            ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.max_staleness=1"],
        )
        part = None
        if args.partial:
            print("bench_async: separate s=2 with partial rollouts ...", file=sys.stderr)
            part = train(
                init,
                tmp / "partial",
                2,
                args.steps,
                args.sleep,
                ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.max_staleness=2"]
                + ["rollout.partial=true", "rollout.partial_turns=1"],
            )
    later = slice(1, None)

    def per_second(rows):
        return 1.0 / statistics.median(r["perf/step_seconds"] for r in rows[later])

    def median(rows, key):
        values = [r[key] for r in rows[later] if key in r]  # (the last steps transfer nothing)
        return statistics.median(values) if values else 0.0

    transfer = median(sep, "perf/transfer_seconds")
    nbytes = int(round(sep[0]["perf/transfer_gb"] * 1e9))
    bucket = 512 << 20  # rollout.sync_bucket_mb's default
    bare = bare_broadcast(nbytes, min(bucket, nbytes))
    print()
    print(
        f"tools/bench_async.py  {datetime.date.today()}  {platform.processor() or platform.machine()}"
    )
    print(
        f"  {os.cpu_count()} cores, agent demo model, {args.steps} steps, 3-turn episodes, tool {args.sleep * 1000:.0f} ms"
    )
    print()
    print("| | colocated, s=0 | separate (1 trainer + 1 rollout rank), s=1 | ratio |")
    print("|---|---|---|---|")
    a, b = per_second(col), per_second(sep)
    print(
        f"| steps per second (median, steps 2..{args.steps}) | {a:.3f} | {b:.3f} | {b / a:.2f}x |"
    )
    print(
        f"| trainer idle, waiting for a batch (s/step) | {median(col, 'perf/rollout_seconds'):.2f} "
        f"(the rollout itself) | {median(sep, 'perf/trainer_wait_seconds'):.2f} | |"
    )
    print(
        f"| rollout rank waiting for weights (s/step) | - | {median(sep, 'perf/rollout_wait_seconds'):.2f} | |"
    )
    print(
        f"| weight transfer of {nbytes / 1e6:.1f} MB (s) | sync {median(col, 'perf/sync_seconds'):.3f} "
        f"| {transfer:.3f} (gather + broadcast + engine load) | bare gloo broadcast {bare:.3f} |"
    )
    same = [r["rollout/policy_version"] for r in sep]
    print(f"\npolicy versions of the separate run's batches: {same}")
    if part is not None:
        c = per_second(part)
        print(
            f"separate s=2 with partial rollouts (episodes cut after turn 1): {c:.3f} steps/s "
            f"({c / a:.2f}x colocated), trainer idle {median(part, 'perf/trainer_wait_seconds'):.2f}"
            f" s/step, replaying the first turn's tool calls "
            f"{median(part, 'perf/agent_replay_seconds'):.3f} s/step, "
            f"episodes spanning two versions {median(part, 'rollout/partial_fraction'):.2f}, "
            f"replay mismatches {sum(r['agent/replay_mismatches'] for r in part):.0f}"
        )


if __name__ == "__main__":
    main()
