"""torchrun worker (one process): a bf16 rollout engine beside an fp32 megatron trainer.

``--mode sync``: the engine starts from dummy weights and receives the trainer's fp32 weights
through the weight sync, cast to bf16; it samples, the gathered bf16 weights are saved as an HF
directory (``--out``/hf_bf16), and the trainer's pi_old pass measures the mismatch (log-prob
gap, token rho, route agreement). ``--mode fresh``: an engine loaded from that directory samples
the same prompts with the same seeds. Each writes ``--out``/<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

PROMPTS = 6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("sync", "fresh"), required=True)
    args = ap.parse_args()
    out = Path(args.out)

    from gspo_megatron.parallel import ParallelLayout, init_distributed, shutdown
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engine import RolloutEngine

    cfg = RolloutConfig(
        group_size=4, max_prompt_tokens=16, max_new_tokens=12, kv_cache_gib=0.05, dtype="bf16"
    )
    init_distributed(ParallelLayout())
    rng = random.Random(0)
    prompts = [[rng.randrange(250) for _ in range(rng.randint(3, 10))] for _ in range(PROMPTS)]
    report = {}
    if args.mode == "fresh":
        engine = RolloutEngine(out / "hf_bf16", cfg, torch.bfloat16, capture_routes=True)
    else:
        engine, report = sync(args, cfg, out, prompts)
    batch = engine.generate(prompts, step=0)
    report["samples"] = [
        [p, c.token_ids, c.logprobs, c.routes.tolist()]
        for p, group in zip(prompts, batch.groups)
        for c in group
    ]
    if args.mode == "sync":
        report["metrics"] = mismatch(report.pop("trainer"), report["samples"])
    (out / f"{args.mode}.json").write_text(json.dumps(report))
    engine.close()
    shutdown()


def sync(args, cfg, out: Path, prompts):
    """The fp32 trainer and the bf16 engine it syncs into."""
    from safetensors.torch import save_file

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.models.qwen3.model import build_model
    from gspo_megatron.optim import wrap_for_training
    from gspo_megatron.parallel import ParallelLayout
    from gspo_megatron.rollout.engine import RolloutEngine
    from gspo_megatron.rollout.kv_cache import block_bytes
    from gspo_megatron.rollout.weight_sync import WeightGatherer
    from gspo_megatron.routing_replay import RoutingReplay

    spec = checkpoint_spec(Path(args.ckpt))
    model = build_model(spec, ParallelLayout())
    load_model_checkpoint(model, Path(args.ckpt), spec)
    ddp = wrap_for_training(model)
    engine = RolloutEngine(
        Path(args.hf_dir), cfg, torch.bfloat16, dummy_weights=True, capture_routes=True
    )
    engine.sync_from(WeightGatherer(ddp, spec, cfg.sync_bucket_mb << 20, torch.bfloat16))
    weights = dict(WeightGatherer(ddp, spec, 1 << 20, torch.bfloat16))
    (out / "hf_bf16").mkdir()
    save_file(
        {n: t.contiguous() for n, t in weights.items()}, str(out / "hf_bf16" / "model.safetensors")
    )
    for f in Path(args.hf_dir).iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / "hf_bf16" / f.name)
    cache = engine.llm.llm_engine.vllm_config.cache_config
    kv = {
        "num_blocks": cache.num_gpu_blocks,
        "block_bytes": block_bytes(spec, 2, cfg.engine_tp, cache.block_size),
    }
    return engine, {"kv": kv, "trainer": (ddp, spec, RoutingReplay(ddp))}


def mismatch(trainer, samples) -> dict:
    """The pi_old pass's measurements of the fp32 trainer against the bf16 engine's samples."""
    from gspo_megatron.batch import Sample
    from gspo_megatron.update import rollout_logprob_diff

    ddp, spec, replay = trainer
    rows = [
        Sample(p, ids, 0.0, lps, routes=torch.tensor(routes)) for p, ids, lps, routes in samples
    ]
    with replay.old_pass():
        got = rollout_logprob_diff(ddp, rows, spec.vocab_size, micro_batch_size=4)
    got.update(replay.take_agreement())
    return got


if __name__ == "__main__":
    main()
