"""Weight sync (trainer -> vLLM) seconds against bytes moved, next to a plain memory copy of the
same bytes on the same machine, in one run.

    python tools/bench_weight_sync.py                         # single process
    torchrun --nproc-per-node 2 tools/bench_weight_sync.py --tp 2   # or --ep 2, --pp 2

A random Qwen3-MoE of the requested size is written as an HF directory (vLLM starts from it),
the Megatron model is built in the requested layout, and the sync runs ``--repeats`` times after
one warm-up. Columns:

- sync: the whole in-memory sync as the trainer runs it (bucketed all-gather of the Megatron
  slices, HF renaming / q-k-v split through hf_mapping, vLLM's in-place reload and repack);
- gather only: the same iterator drained without vLLM (what the layout costs);
- engine load: the engine's in-place load of the same tensors already in memory (on CPU
  ``rollout.cpu_reload``: vLLM's loader into the live weights, then repacking every weight into
  its oneDNN / grouped-GEMM layouts; on GPU vLLM's own reload);
- vLLM reload (CPU): the same tensors through vLLM's generic layerwise reload, the baseline the
  CPU path replaces;
- memcpy: ``dst.copy_(src)`` of a buffer of the same byte count (the floor; the target is sync
  within 3x of it).

Best of repeats; rank 0 prints. After the timed runs, the engine's log-probs of a short
sequence are compared with the trainer's to show the synced weights are the right ones.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("outputs/bench_weight_sync"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--moe-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    for name in ("tp", "pp", "ep"):
        ap.add_argument(f"--{name}", type=int, default=1)
    return ap.parse_args()


def make_model_dir(args, out: Path) -> None:
    from gspo_megatron.testing.tiny_model import make_hf_model, tiny_moe_config, write_tokenizer

    if (out / "config.json").is_file():
        return
    cfg = tiny_moe_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        num_local_experts=args.experts,
        moe_intermediate_size=args.moe_ffn,
        intermediate_size=4 * args.moe_ffn,
        mlp_only_layers=[],
        max_position_embeddings=256,
    )
    tmp = out.with_name(out.name + ".tmp")
    make_hf_model(cfg, tmp)
    write_tokenizer(tmp, args.vocab)
    tmp.rename(out)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    args = parse_args()
    from gspo_megatron.distributed.parallel import (
        ParallelLayout,
        check_layout,
        init_distributed,
        shutdown,
    )
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.update import rollout_logprob_diff
    from gspo_megatron.models import build_model, spec_from_hf_dir
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine
    from gspo_megatron.rollout.engines.weight_sync import WeightGatherer

    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    init_distributed(layout)
    rank = dist.get_rank()
    hf_dir = args.work / f"hf_h{args.hidden}_l{args.layers}_e{args.experts}_v{args.vocab}"
    if rank == 0:
        hf_dir.parent.mkdir(parents=True, exist_ok=True)
        make_model_dir(args, hf_dir)
    dist.barrier()
    spec = spec_from_hf_dir(hf_dir)
    check_layout(layout, spec, dist.get_world_size())
    model = build_model(spec, layout)  # random weights: the sync overwrites vLLM's
    engine = RolloutEngine(
        hf_dir,
        RolloutConfig(
            max_prompt_tokens=64, max_new_tokens=8, kv_cache_gib=0.1, sync_bucket_mb=args.bucket_mb
        ),
    )
    gatherer = WeightGatherer(model, spec, bucket_bytes=args.bucket_mb << 20)

    engine.sync_from(gatherer)  # warm-up (also builds the plan)
    nbytes = gatherer.stats.bytes
    sync_s = best_seconds(lambda: engine.sync_from(gatherer), args.repeats)
    gather_s = best_seconds(lambda: sum(1 for _ in gatherer), args.repeats)
    held = [(n, t.clone()) for n, t in gatherer]
    load_s = best_seconds(lambda: engine.load_weights(iter(held)), args.repeats)
    generic_s = float("nan")
    if not torch.cuda.is_available():  # the baseline the CPU in-place load replaces
        from gspo_megatron.rollout.engines.cpu_reload import reload_generic

        runner = engine._model_runner()
        generic_s = best_seconds(lambda: reload_generic(runner, held), args.repeats)
        engine.load_weights(iter(held))
    held.clear()
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), args.repeats)

    # The engine now holds the trainer's (random) weights: its sampling log-probs must agree.
    batch = engine.generate([[5, 6, 7, 8]], n=2, max_new_tokens=8)
    samples = [Sample([5, 6, 7, 8], c.token_ids, 0.0, c.logprobs) for c in batch.groups[0]]
    diff = rollout_logprob_diff(model, samples, spec.vocab_size, micro_batch_size=2)

    if rank == 0:
        gb = nbytes / 1e9
        print(
            f"# weight sync benchmark, {datetime.date.today()}, {platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        print(
            f"# model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, vocab "
            f"{args.vocab}; layout TP{args.tp} PP{args.pp} EP{args.ep} (world "
            f"{dist.get_world_size()}); {gatherer.stats.tensors} HF tensors; bucket {args.bucket_mb} MiB"
        )
        print(f"{'what':<14}{'bytes':>14}{'seconds':>10}{'GB/s':>8}{'x memcpy':>10}")
        rows = (
            ("sync", sync_s),
            ("gather only", gather_s),
            ("engine load", load_s),
            ("vLLM reload", generic_s),
            ("memcpy", copy_s),
        )
        for name, s in rows:
            print(f"{name:<14}{nbytes:>14,}{s:>10.3f}{gb / s:>8.2f}{s / copy_s:>10.2f}")
        print(
            f"# buckets per sync: {gatherer.stats.buckets}, received per rank: "
            f"{gatherer.stats.bytes_communicated:,} bytes; engine vs trainer log-prob after "
            f"sync: mean |diff| {diff['rollout/logprob_abs_diff_mean']:.2e}"
        )
    engine.close()
    shutdown()


if __name__ == "__main__":
    main()
