"""Benchmarks of the RL step's update, side by side in one run.

    python tools/bench_step.py long-tail [--samples 64 --budget 1024 --micro-batch-size 4]

long-tail: response lengths drawn log-uniformly from 8 to 512 tokens (16-token prompts), as a
reasoning run's are; one policy update (forward, backward, optimizer step over the whole batch)
of a tiny Qwen3-MoE with 1024 positions, once with padded micro-batches (``micro_batch_size``
rows padded to the longest sequence, today's default) and once packed
(``loss.max_tokens_per_microbatch``). Prints, for each, the padding waste (padded positions /
real tokens), the micro-batch count, the best update time of ``--repeats`` and the real tokens
per second, then the ratios; and one JSON line with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def long_tail_samples(n: int, seed: int, vocab: int):
    from gspo_megatron.batch import Sample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = int(round(8 * math.exp(rng.random() * math.log(512 / 8))))
        ids = [rng.randrange(vocab) for _ in range(16 + r)]
        logp = [-rng.random() * 3 for _ in range(r)]
        out.append(Sample(ids[:16], ids[16:], rng.gauss(0, 1), logp))
    return out


def _model(tmp: Path):
    from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.models.qwen3.model import build_model
    from gspo_megatron.parallel import ParallelLayout, init_distributed
    from gspo_megatron.testing.tiny_model import make_hf_model, tiny_moe_config, write_tokenizer

    hf, mcore = tmp / "hf", tmp / "mcore"
    make_hf_model(tiny_moe_config(max_position_embeddings=1024), hf)
    write_tokenizer(hf)
    convert_hf_to_mcore(hf, mcore, show_progress=False)
    layout = ParallelLayout()
    init_distributed(layout)
    spec = checkpoint_spec(mcore)
    model = build_model(spec, layout)
    load_model_checkpoint(model, mcore, spec)
    return model, spec


def long_tail(args) -> dict:
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.optim import OptimConfig, build_optimizer, wrap_for_training
    from gspo_megatron.update import build_minibatches, train_step

    with tempfile.TemporaryDirectory() as tmp:
        model, spec = _model(Path(tmp))
    ddp = wrap_for_training(model, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-6))
    samples = long_tail_samples(args.samples, args.seed, spec.vocab_size)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    base = PolicyLossConfig(
        num_minibatches=1, old_logprobs="rollout", micro_batch_size=args.micro_batch_size
    )
    results = {}
    for name, cfg in (
        ("padded", base),
        ("packed", replace(base, max_tokens_per_microbatch=args.budget)),
    ):
        [mbs], seq_len = build_minibatches(samples, cfg)
        positions = sum(mb.tokens.numel() for mb in mbs)
        times = []
        for _ in range(args.repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            train_step(ddp, optimizer, mbs, cfg, spec.vocab_size, seq_len)
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        results[name] = {
            "micro_batches": len(mbs),
            "row_length": seq_len,
            "padding_waste": (positions - real) / real,
            "update_seconds": best,
            "tokens_per_second": real / best,
        }
    print(f"{args.samples} samples, {real} real tokens (responses log-uniform 8..512)")
    print(f"{'':8} {'micro-batches':>13} {'row':>6} {'waste':>8} {'update s':>9} {'tok/s':>9}")
    for name, r in results.items():
        print(
            f"{name:8} {r['micro_batches']:>13} {r['row_length']:>6} "
            f"{100 * r['padding_waste']:>7.1f}% {r['update_seconds']:>9.3f} "
            f"{r['tokens_per_second']:>9.0f}"
        )
    speedup = results["packed"]["tokens_per_second"] / results["padded"]["tokens_per_second"]
    print(f"packed / padded update tokens/s: {speedup:.2f}x")
    return {"mode": "long-tail", "speedup": speedup, **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    lt = sub.add_parser("long-tail", help="padded vs packed micro-batches, long-tail lengths")
    lt.add_argument("--samples", type=int, default=64)
    lt.add_argument("--budget", type=int, default=1024, help="loss.max_tokens_per_microbatch")
    lt.add_argument("--micro-batch-size", type=int, default=4, help="padded micro-batch rows")
    lt.add_argument("--repeats", type=int, default=2)
    lt.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = long_tail(args)
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        date=datetime.date.today().isoformat(),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
