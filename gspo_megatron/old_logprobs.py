"""pi_old's forward pass, and what is measured in it.

Before the first optimizer step of a rollout batch the trainer scores the batch with its current
weights (pi_old). The same pass compares those log-probs with the rollout engine's sampling
log-probs (``rollout/logprob_abs_diff_*``: a weight sync that went wrong shows at once) and,
through ``routing_replay``, the routers' choices with the engine's (``rollout/route_agreement``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gspo_megatron import routing_replay
from gspo_megatron.batch import MicroBatch
from gspo_megatron.forward import forward_logprobs
from gspo_megatron.optim import unwrap


def compute_old_logprobs(
    model, microbatches: List[MicroBatch], vocab_size: int, seq_len: int, keep_rollout: bool = False
) -> torch.Tensor:
    """pi_old = the current weights: fill ``mb.old_logprobs`` (last stage only needs them).

    Where a micro-batch already carries the rollout engine's log-probs, they are compared with
    the trainer's first; returns this rank's [sum |diff|, max |diff|, tokens] (zeros on ranks
    that do not own log-probs). ``keep_rollout`` keeps the engine's values as pi_old (the
    comparison is then all this pass is for)."""
    unwrapped = unwrap(model)
    was_training = unwrapped.training
    unwrapped.eval()
    lps = forward_logprobs(model, microbatches, vocab_size, seq_len)
    if was_training:
        unwrapped.train()
    diff = torch.zeros(3, dtype=torch.float64)
    if lps is None:
        return diff
    owner = ps.get_tensor_model_parallel_rank() == 0  # TP ranks hold identical log-probs
    for mb, lp in zip(microbatches, lps):
        if mb.old_logprobs is not None and owner:
            d = (lp - mb.old_logprobs).abs()[mb.loss_mask].double()
            if d.numel():
                diff[0] += d.sum()
                diff[1] = torch.maximum(diff[1], d.max())
                diff[2] += d.numel()
        if not keep_rollout:
            mb.old_logprobs = lp
    return diff


def observe_route_agreement(model, minibatches, vocab_size: int, seq_len: int) -> None:
    """One forward pass per minibatch without routing replay, counting where the trainer's own
    router agrees with the engine's routes (``RoutingReplay.take_agreement`` reads the count).
    Under r3 the pi_old pass replays the engine's routes, so this pass is what measures them."""
    replay = routing_replay.of(model)
    unwrapped = unwrap(model)
    was_training = unwrapped.training
    unwrapped.eval()
    with replay.observe_pass():
        for mbs in minibatches:
            forward_logprobs(model, mbs, vocab_size, seq_len)
    if was_training:
        unwrapped.train()


def reduce_logprob_diff(parts: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Per-rank [sum, max, tokens] -> the global mean and max |engine - trainer| per token."""
    total = torch.stack(list(parts)).sum(0) if parts else torch.zeros(3, dtype=torch.float64)
    worst = (
        torch.stack([p[1] for p in parts]).max() if parts else torch.zeros((), dtype=torch.float64)
    )
    sums = torch.stack([total[0], total[2]])
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tokens = float(sums[1])
    return {
        "rollout/logprob_abs_diff_mean": float(sums[0]) / tokens if tokens else float("nan"),
        "rollout/logprob_abs_diff_max": float(worst) if tokens else float("nan"),
        "rollout/logprob_diff_tokens": tokens,
    }
