"""torchrun worker: the MoE route-change metric of a policy update. With one minibatch the
compared policy is pi_old itself (0 changes, and the metric must say exactly 0); with four and
a large step size routes do change. Also reports how many choices were compared, which must be
the response positions x MoE layers x top-k of the sampled micro-batch. Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    ckpt, tp = Path(sys.argv[1]), int(sys.argv[2])
    from samples import random_samples

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer
    from gspo_megatron.learner.route_change import RouteChangeMeter
    from gspo_megatron.learner.update import policy_update
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.models import build_model

    spec = checkpoint_spec(ckpt)
    layout = ParallelLayout(tp=tp)
    init_distributed(layout)
    samples = random_samples(8)
    out = {}
    for k in (1, 4):
        model = build_model(spec, layout)
        load_model_checkpoint(model, ckpt, spec)
        ddp = wrap_for_training(model)
        opt = build_optimizer(ddp, OptimConfig(lr=3e-2))
        meter = RouteChangeMeter(ddp)
        totals = []

        def result(meter=meter, totals=totals, orig=meter.result):
            totals.append(meter.changed.clone())  # this rank's raw counts, before the reset
            return orig()

        meter.result = result
        cfg = PolicyLossConfig(num_minibatches=k, micro_batch_size=2, clip_low=0.2, clip_high=0.27)
        res = policy_update(ddp, opt, samples, cfg, spec.vocab_size, route_meter=meter)
        out[f"k{k}"] = res.routes.get("train/moe_route_change")
        total = totals[0]
        dist.all_reduce(total)
        out[f"k{k}_choices"] = float(total[1])
        # Expected: response positions of the last minibatch's first micro-batch (2 samples).
        last = samples[(k - 1) * (8 // k) : (k - 1) * (8 // k) + 2]
        moe_layers = sum(spec.moe_layers)
        out[f"k{k}_expected"] = float(
            sum(len(s.response_ids) for s in last) * moe_layers * spec.moe_top_k
        )
    if dist.get_rank() == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
