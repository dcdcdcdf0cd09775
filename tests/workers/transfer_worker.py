"""torchrun worker, 3 ranks: two training ranks and one rollout rank (rollout.placement:
separate). For each trainer layout (TP2, PP2, EP2, one after another in the same launch) the
trainer builds the model, moves its weights off the checkpoint (seeded noise: a policy the engine
has never seen), and the rollout rank samples before and after the transfer; the trainer scores
both samples with its own forward. Rank 0 writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "ep2": dict(ep=2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.separate import link
    from gspo_megatron.rollout.separate.placement import enter_role, role_of

    cfg = RolloutConfig(
        placement="separate",
        num_ranks=1,
        group_size=2,
        max_prompt_tokens=16,
        max_new_tokens=12,
        kv_cache_gib=0.05,
        sync_bucket_mb=1,
    )
    role = role_of(cfg)
    groups = enter_role(role, timeout_s=300)
    rng = random.Random(0)
    prompts = [[rng.randrange(200) for _ in range(rng.randint(3, 10))] for _ in range(4)]
    if role.kind == "rollout":
        serve(cfg, args, groups, prompts, link)
    else:
        train(cfg, args, role, groups, prompts, link)


def serve(cfg, args, groups, prompts, link) -> None:
    from gspo_megatron.rollout.engines.engine import RolloutEngine

    engine = RolloutEngine(Path(args.hf_dir), cfg, torch.float32, dummy_weights=True)
    me = 1
    for i, _ in enumerate(LAYOUTS):
        for phase in ("before", "after"):
            if phase == "after":
                header = link.receive_header(groups, me)
                assert header["version"] == i, header
                engine.load_from(link.receive_weights(groups, me, link.TransferStats()))
            batch = engine.generate(prompts, step=i)
            rows = [(p, c.token_ids, c.logprobs) for p, g in zip(prompts, batch.groups) for c in g]
            link.send_object(groups.cpu, rows, link.ROOT, "rows")
    engine.close()


def train(cfg, args, role, groups, prompts, link) -> None:
    from megatron.core import parallel_state as ps

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import unwrap, wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.update import rollout_logprob_diff
    from gspo_megatron.models import build_model
    from gspo_megatron.rollout.engines.weight_sync import WeightGatherer

    spec = checkpoint_spec(Path(args.ckpt))
    report = {}
    for i, (name, dims) in enumerate(LAYOUTS.items()):
        layout = ParallelLayout(**dims)
        init_distributed(layout)
        model = build_model(spec, layout)
        load_model_checkpoint(model, Path(args.ckpt), spec)
        ddp = wrap_for_training(model)
        with torch.no_grad():  # the same noise on every replica: seeded by name, full shape
            for pname, p in unwrap(ddp).named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(f"{i}/{pname}".encode()))
                p.add_(0.02 * torch.randn(p.shape, generator=gen))

        def diff(ddp=ddp):
            box = [None]
            if role.link_rank is not None:
                box[0] = link.recv_object(groups.cpu, 1, "rows")
            dist.broadcast_object_list(box, src=0)
            samples = [Sample(p, ids, 0.0, lps) for p, ids, lps in box[0]]
            dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
            return rollout_logprob_diff(ddp, samples[rank::dp], spec.vocab_size, 4)

        before = diff()
        header = {"version": i, "next_index": i, "steps": 3, "staleness": 0}
        stats = link.send_weights(
            groups, role.link_rank, WeightGatherer(ddp, spec, 1 << 20), header, 1 << 20
        )
        report[name] = {"before": before, "after": diff(), "bytes": stats.bytes}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
