"""One process: the MoE load-balancing loss gradient through the GSPO update path equals
coeff x the mean over micro-batches of the aux-loss gradient (megatron's pre-training meaning),
whatever the micro-batch size and padded length.

Advantages are 0, so the policy term has no gradient and the router weight's gradient is the aux
loss's alone. The reference runs the model forward per micro-batch outside any schedule, with
megatron's aux-loss scaler set to 1/num_microbatches (as its schedules do without per-token
loss), and backpropagates. Prints one JSON line: the largest relative difference per
configuration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _compare(routers, want) -> float:
    return max(
        float((p.main_grad - want[n]).abs().max() / want[n].abs().max()) for n, p in routers.items()
    )


def _ratio(routers, want) -> float:
    num = sum(float((p.main_grad * want[n]).sum()) for n, p in routers.items())
    return num / sum(float((w * w).sum()) for w in want.values())


def main() -> None:
    ckpt = Path(sys.argv[1])
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from samples import random_samples

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.learner.forward import model_forward
    from gspo_megatron.learner.old_logprobs import compute_old_logprobs
    from gspo_megatron.learner.update import (
        agreed_seq_len,
        make_microbatches,
        scale_moe_aux_loss,
        train_step,
    )
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.models import build_model

    coeff = 0.01
    spec = checkpoint_spec(ckpt)
    layout = ParallelLayout()
    init_distributed(layout)
    samples = random_samples(4, advantage=0.0)
    out = {}
    for mbs, pad in ((1, 0), (2, 0), (2, 16)):
        model = build_model(spec, layout, moe_aux_loss_coeff=coeff)
        load_model_checkpoint(model, ckpt, spec)
        routers = {n: p for n, p in model.named_parameters() if "router" in n}
        seq_len = agreed_seq_len(samples) + pad
        mbs_list = make_microbatches(samples, mbs, seq_len)

        # Reference: plain forward/backward per micro-batch, megatron's 1/M aux scaling.
        model.config.calculate_per_token_loss = False
        model.config.moe_aux_loss_coeff = coeff
        MoEAuxLossAutoScaler.set_loss_scale(
            torch.tensor([1.0 / len(mbs_list)])
        )  # shape [1], as the schedules pass
        model.zero_grad()
        for mb in mbs_list:
            (model_forward(model, mb).sum() * 0.0).backward()
        want = {n: p.grad.clone() for n, p in routers.items()}
        model.zero_grad(set_to_none=True)  # DDP's hooks would add leftover .grad to main_grad

        # The update path: DDP, per-sequence loss normalisation, scaled coefficient.
        ddp = wrap_for_training(model, use_distributed_optimizer=False)
        cfg = PolicyLossConfig(num_minibatches=1, micro_batch_size=mbs)
        compute_old_logprobs(ddp, mbs_list, spec.vocab_size, seq_len)
        scale_moe_aux_loss(ddp, coeff, mbs)
        train_step(ddp, None, mbs_list, cfg, spec.vocab_size, seq_len)
        out[f"mbs{mbs}_pad{pad}"] = _compare(routers, want)
        # Without the scaling (megatron's coefficient as configured): off by micro_batch_size.
        ddp.module.config.moe_aux_loss_coeff = coeff
        train_step(ddp, None, mbs_list, cfg, spec.vocab_size, seq_len)
        out[f"unscaled_ratio_mbs{mbs}"] = _ratio(routers, want)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
