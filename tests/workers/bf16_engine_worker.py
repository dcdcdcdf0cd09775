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

    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed, shutdown
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine

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
        trainer = report.pop("trainer")
        report["metrics"] = mismatch(trainer, report["samples"])
        report.update(replays(trainer, report["samples"]))
        report["corrections"] = corrections(trainer, report["samples"])
    (out / f"{args.mode}.json").write_text(json.dumps(report))
    engine.close()
    shutdown()


def sync(args, cfg, out: Path, prompts):
    """The fp32 trainer and the bf16 engine it syncs into."""
    from safetensors.torch import save_file

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout
    from gspo_megatron.learner.routing_replay import RoutingReplay
    from gspo_megatron.models import build_model
    from gspo_megatron.rollout.engines.engine import RolloutEngine
    from gspo_megatron.rollout.engines.kv_cache import block_bytes
    from gspo_megatron.rollout.engines.weight_sync import WeightGatherer

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


def _rows(samples, advantage: float = 0.0):
    from gspo_megatron.learner.batch import Sample

    return [
        Sample(p, ids, advantage, lps, routes=torch.tensor(routes))
        for p, ids, lps, routes in samples
    ]


def replays(trainer, samples) -> dict:
    """The routes the pi_old pass records for the updates under r2 (the trainer's own) and r3
    (the engine's), per sample: [fed positions, MoE layers, top-k]; and the trainer's pi_old
    log-prob of every response token."""
    from gspo_megatron.learner.old_logprobs import compute_old_logprobs
    from gspo_megatron.learner.routing_replay import RoutingReplay
    from gspo_megatron.learner.update import agreed_seq_len, make_microbatches

    ddp, spec, _ = trainer
    rows = _rows(samples)
    seq_len = agreed_seq_len(rows)
    out = {}
    for mode in ("r2", "r3"):
        replay = RoutingReplay(ddp, mode)
        mbs = make_microbatches(rows, 4, seq_len)
        with replay.old_pass():
            compute_old_logprobs(ddp, mbs, spec.vocab_size, seq_len)
        replay.take_agreement()
        per, old = [], []
        for mb in mbs:
            b = mb.tokens.shape[0]
            layers = torch.stack([mb.routes[i] for i in range(len(mb.routes))], 1)
            per += list(layers.reshape(seq_len, b, *layers.shape[1:]).transpose(0, 1))
            old += list(mb.old_logprobs)
        out[mode] = [
            per[i][: len(r.prompt_ids) + len(r.response_ids) - 1].tolist()
            for i, r in enumerate(rows)
        ]
        if mode == "r2":  # the trainer's own routes: pi_old as the updates compare with it
            # Response token j is predicted at position len(prompt) + j - 1.
            out["pi_old"] = [
                old[i][len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + len(r.response_ids)].tolist()
                for i, r in enumerate(rows)
            ]
    RoutingReplay(ddp, "none")  # the corrections' updates route as the trainer does
    return out


CORRECTIONS = {
    "grpo_tis": dict(variant="grpo", rollout_correction="tis", correction_cap=1.01),
    "gspo_mis": dict(
        variant="gspo", rollout_correction="mis", correction_low=0.999, correction_high=1.001
    ),
    "grpo_icepop": dict(
        variant="grpo", rollout_correction="icepop", correction_low=0.98, correction_high=1.02
    ),
}
"""Bands narrow enough for this model's bf16 mismatch (|log rho| > 0.1 for well under 1% of
tokens): at the defaults (cap 2, [0.5, 2]) nothing here leaves them."""


def corrections(trainer, samples) -> dict:
    """One update per rollout correction (learning rate ~0: the weights stay the pi_old the
    correction compares with): its first minibatch step's metrics."""
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer
    from gspo_megatron.learner.update import policy_update
    from gspo_megatron.loss import PolicyLossConfig

    ddp, spec, _ = trainer
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-30))
    out = {}
    for name, settings in CORRECTIONS.items():
        cfg = PolicyLossConfig(num_minibatches=1, micro_batch_size=4, **settings)
        result = policy_update(ddp, optimizer, _rows(samples, 1.0), cfg, spec.vocab_size)
        out[name] = result.steps[0]
    return out


def mismatch(trainer, samples) -> dict:
    """The pi_old pass's measurements of the fp32 trainer against the bf16 engine's samples."""
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.update import rollout_logprob_diff

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
