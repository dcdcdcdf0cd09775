"""torchrun worker: rollouts from vLLM, one GSPO optimizer step on megatron, weight sync, and
the checks that vLLM then samples with exactly the trainer's weights.

Writes, on rank 0, a JSON report the test asserts on.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default="tp2,ep2,pp2")
    args = ap.parse_args()

    from gspo_megatron.rollout.config import RolloutConfig

    cfg = RolloutConfig(
        group_size=4, max_prompt_tokens=16, max_new_tokens=12, kv_cache_gib=0.05, sync_bucket_mb=1
    )
    engine, reports = None, {}
    for name in args.layouts.split(","):
        reports[name], engine = run_layout(args, name, cfg, engine)
    # A sync that leaves an engine parameter without weights is refused, naming one.
    try:
        engine.load_weights(iter([]))
        reports["empty_sync"] = ""
    except Exception as err:  # noqa: BLE001 - the report carries what was raised
        reports["empty_sync"] = f"{type(err).__name__}: {err}"
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(reports, indent=1))
    engine.close()
    from gspo_megatron.distributed.parallel import shutdown

    shutdown()


def run_layout(args, name, cfg, engine):
    """One trainer layout against the engine (made at the first; later layouts first sync their
    freshly loaded checkpoint weights into it, which it already holds)."""
    from megatron.core import parallel_state as ps

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, check_layout, init_distributed
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer
    from gspo_megatron.learner.routing_replay import RoutingReplay
    from gspo_megatron.learner.update import policy_update, rollout_logprob_diff
    from gspo_megatron.loss import PolicyLossConfig, group_advantages
    from gspo_megatron.models import build_model
    from gspo_megatron.rollout.engines.cpu_reload import reload_generic
    from gspo_megatron.rollout.engines.engine import RolloutEngine
    from gspo_megatron.rollout.engines.kv_cache import block_bytes
    from gspo_megatron.rollout.engines.weight_sync import WeightGatherer
    from gspo_megatron.testing.generate import greedy_continuation
    from gspo_megatron.testing.hf_reference import read_hf_tensors

    spec = checkpoint_spec(Path(args.ckpt))
    layout = ParallelLayout(**LAYOUTS[name])
    init_distributed(layout)
    check_layout(layout, spec, dist.get_world_size())
    model = build_model(spec, layout)
    load_model_checkpoint(model, Path(args.ckpt), spec)
    ddp = wrap_for_training(model)
    optimizer = build_optimizer(ddp, OptimConfig(lr=3e-3, clip_grad=1.0))
    report = {}

    # 1. The gatherer reproduces the HF checkpoint from this layout, bit for bit (small buckets
    #    so that several all-gathers happen).
    gatherer = WeightGatherer(ddp, spec, bucket_bytes=1 << 20)
    hf = read_hf_tensors(Path(args.hf_dir))
    gathered = {n: torch.equal(t, hf[n]) if n in hf else False for n, t in gatherer}
    report["gather_mismatched"] = sorted(n for n, same in gathered.items() if not same)
    report["gather_missing"] = sorted(set(hf) - set(gathered))
    report["gather_buckets"] = gatherer.stats.buckets

    if engine is None:
        engine = RolloutEngine(Path(args.hf_dir), cfg, torch.float32, capture_routes=True)
        cache = engine.llm.llm_engine.vllm_config.cache_config
        # Enough prompts that each engine's sequences need one block more than it has.
        crowded = engine.num_engines * (cache.num_gpu_blocks // cfg.group_size + 1)
        report["kv"] = {
            "num_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "block_bytes": block_bytes(spec, 4, cfg.engine_tp, cache.block_size),
            "fits": engine.waves_note(1),
            "crowded": engine.waves_note(crowded),
            "crowded_per_engine": crowded // engine.num_engines * cfg.group_size,
        }
    else:
        engine.sync_from(WeightGatherer(ddp, spec, bucket_bytes=cfg.sync_bucket_mb << 20))
    replay = RoutingReplay(ddp)  # route agreement with the engine in every pi_old pass
    rng = random.Random(0)
    prompts = [
        [rng.randrange(spec.vocab_size - 2) for _ in range(rng.randint(3, 10))] for _ in range(4)
    ]
    prompts.insert(2, list(range(20)))  # longer than max_prompt_tokens: skipped, counted

    def samples_of(batch, rewards: bool):
        out = []
        for prompt, group in zip(prompts, batch.groups):
            if group is None:
                continue
            r = torch.tensor(
                [sum(t % 2 == 0 for t in c.token_ids) / max(len(c.token_ids), 1) for c in group]
            )
            adv = group_advantages(r, len(group)) if rewards else torch.zeros(len(group))
            out += [
                Sample(prompt, c.token_ids, float(a), c.logprobs, routes=c.routes)
                for c, a in zip(group, adv)
            ]
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        return out[rank::dp]

    first = engine.generate(prompts, step=0)
    report["skipped_overlong"] = first.skipped_overlong
    report["skipped_is_none"] = first.groups[2] is None
    report["group_sizes"] = [len(g) for g in first.groups if g is not None]
    report["first_routes"] = [
        [prompt, c.token_ids, c.routes.tolist()]
        for prompt, group in zip(prompts, first.groups)
        for c in group or []
    ]

    # 2. One optimizer step; pi_old from the trainer, compared with vLLM's sampling log-probs.
    loss_cfg = PolicyLossConfig(num_minibatches=1, micro_batch_size=4, clip_low=0.2, clip_high=0.27)
    result = policy_update(ddp, optimizer, samples_of(first, True), loss_cfg, spec.vocab_size)
    report["pre_step"] = result.rollout
    report["step"] = result.steps[0]

    # 3. Before the sync vLLM still scores with the old weights: a visible mismatch, and the
    #    trainer's routers now choose otherwise on some tokens (the weights as HF, for the test).
    with replay.old_pass():
        stale = rollout_logprob_diff(
            ddp, samples_of(first, False), spec.vocab_size, micro_batch_size=4
        )
    report["stale"] = stale
    report["stale_agreement"] = replay.take_agreement()
    moved = dict(WeightGatherer(ddp, spec, bucket_bytes=1 << 20))
    if dist.get_rank() == 0:
        after = Path(args.out).parent / f"hf_after_step_{name}"
        after.mkdir(exist_ok=True)
        save_file({n: t.contiguous() for n, t in moved.items()}, str(after / "model.safetensors"))
        for f in Path(args.hf_dir).iterdir():
            if f.suffix == ".json" and f.name != "model.safetensors.index.json":
                shutil.copy(f, after / f.name)

    # 4. Sync, then sample again and compare.
    stats = engine.sync_from(WeightGatherer(ddp, spec, bucket_bytes=cfg.sync_bucket_mb << 20))
    report["sync"] = {
        "seconds": stats.seconds,
        "bytes": stats.bytes,
        "buckets": stats.buckets,
        "tensors": stats.tensors,
    }
    second = engine.generate(prompts, step=1)
    report["post_sync"] = rollout_logprob_diff(
        ddp, samples_of(second, False), spec.vocab_size, micro_batch_size=4
    )
    # 4b. CPU: the same weights through vLLM's own generic reload, the reference for the
    #     engine's in-place path (rollout.cpu_reload): the same samples, bit for bit.
    if not torch.cuda.is_available():
        reload_generic(engine._model_runner(), moved.items())
        engine.llm.reset_prefix_cache()
        again = engine.generate(prompts, step=1)
        report["reload_same"] = [
            [a.token_ids == b.token_ids, a.logprobs == b.logprobs]
            for ga, gb in zip(second.groups, again.groups)
            for a, b in zip(ga or [], gb or [])
        ]

    # 5. Greedy continuations: vLLM's and the trainer's own.
    valid = [p for p in prompts if len(p) <= cfg.max_prompt_tokens]
    greedy = engine.generate(valid, greedy=True, max_new_tokens=10)
    report["greedy_engine"] = [g[0].token_ids for g in greedy.groups]
    report["greedy_trainer"] = greedy_continuation(
        ddp, valid, 10, spec.vocab_size, eos_token_id=engine.eos_token_id
    )
    report["hf_bytes"] = sum(t.numel() * t.element_size() for t in hf.values())
    return report, engine


if __name__ == "__main__":
    main()
