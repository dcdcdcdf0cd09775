"""torchrun worker: one GSPO forward/backward (or a full policy update) in a given layout.

Writes, on rank 0, the global metrics and every parameter's full gradient (or weights after the
update), keyed like the checkpoint, so the test can compare layouts with the single process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from gspo_megatron.batch import Sample
from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
from gspo_megatron.testing.gather import gather_full_tensors, grads_as_data
from gspo_megatron.models.qwen3.model import build_model
from gspo_megatron.optim import OptimConfig, build_optimizer, wrap_for_training
from gspo_megatron.parallel import ParallelLayout, check_layout, init_distributed, shutdown
from gspo_megatron.loss import PolicyLossConfig
from gspo_megatron.update import agreed_seq_len, make_microbatches, policy_update, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("grads", "update"), default="grads")
    ap.add_argument("--variant", default="gspo")
    ap.add_argument("--clip-low", type=float, default=3e-4)
    ap.add_argument("--clip-high", type=float, default=4e-4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--trainer-old-logprobs", action="store_true",
                    help="ignore the samples' old_logprobs; take pi_old from a trainer forward")
    ap.add_argument("--num-minibatches", type=int, default=2)
    for name in ("tp", "pp", "ep", "cp"):
        ap.add_argument(f"--{name}", type=int, default=1)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    spec = checkpoint_spec(Path(args.ckpt))
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, cp=args.cp)
    init_distributed(layout)
    check_layout(layout, spec, dist.get_world_size())
    model = build_model(spec, layout)
    load_model_checkpoint(model, Path(args.ckpt), spec)
    ddp = wrap_for_training(model, use_distributed_optimizer=args.mode == "update")

    rows = json.loads(Path(args.samples).read_text())
    samples = [Sample(r["prompt_ids"], r["response_ids"], r["advantage"],
                      None if args.trainer_old_logprobs else r.get("old_logprobs")) for r in rows]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(samples) // dp
    # Minibatch k of the single process is samples[k*M:(k+1)*M]; give each rank its slice of
    # every minibatch so the minibatches are the same sequences in every layout.
    k = args.num_minibatches if args.mode == "update" else 1
    m = len(samples) // k
    mine = [s for i in range(k) for s in samples[i * m + dp_rank * (m // dp): i * m + (dp_rank + 1) * (m // dp)]]
    cfg = PolicyLossConfig(variant=args.variant, clip_low=args.clip_low, clip_high=args.clip_high,
                           micro_batch_size=args.micro_batch_size, num_minibatches=args.num_minibatches,
                           old_logprobs="rollout" if mine[0].old_logprobs is not None else "trainer")

    if args.mode == "grads":
        seq_len = agreed_seq_len(mine)
        mbs = make_microbatches(mine, cfg.micro_batch_size, seq_len,
                                num_microbatches=-(-per // cfg.micro_batch_size))
        metrics = train_step(ddp, None, mbs, cfg, spec.vocab_size, seq_len)
        with grads_as_data(ddp):
            tensors = gather_full_tensors(ddp)
        result = {"metrics": metrics, "tensors": tensors}
    else:
        optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=1.0))
        steps = policy_update(ddp, optimizer, mine, cfg, spec.vocab_size).steps
        result = {"metrics": steps, "tensors": gather_full_tensors(ddp)}
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    shutdown()


if __name__ == "__main__":
    main()
