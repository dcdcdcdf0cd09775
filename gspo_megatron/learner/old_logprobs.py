"""pi_old's forward pass, and what is measured in it.

Before the first optimizer step of a rollout batch the trainer scores the batch with its current
weights (pi_old). The same pass compares those log-probs with the rollout engine's sampling
log-probs (``rollout/logprob_abs_diff_*``: a weight sync that went wrong shows at once) and,
through ``routing_replay``, the routers' choices with the engine's (``rollout/route_agreement``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.learner import routing_replay
from gspo_megatron.learner.batch import MicroBatch
from gspo_megatron.learner.forward import forward_logprobs


def compute_old_logprobs(
    model, microbatches: List[MicroBatch], vocab_size: int, seq_len: int, keep_rollout: bool = False
) -> torch.Tensor:
    """pi_old = the current weights: fill ``mb.old_logprobs`` (last stage only needs them).

    Where a micro-batch already carries the rollout engine's log-probs, they are compared with
    the trainer's first; returns this rank's ``DIFF`` entries (zeros on ranks that do not own
    log-probs). ``keep_rollout`` keeps the engine's values as pi_old (the comparison is then all
    this pass is for)."""
    unwrapped = unwrap(model)
    was_training = unwrapped.training
    unwrapped.eval()
    lps = forward_logprobs(model, microbatches, vocab_size, seq_len)
    if was_training:
        unwrapped.train()
    diff = empty_diff()
    if lps is None:
        return diff
    owner = ps.get_tensor_model_parallel_rank() == 0  # TP ranks hold identical log-probs
    for mb, lp in zip(microbatches, lps):
        if mb.old_logprobs is not None and owner:
            log_rho = (lp - mb.old_logprobs)[mb.loss_mask].double()  # log pi_old - log mu
            if log_rho.numel():
                d = log_rho.abs()
                diff[0] += d.sum()
                diff[1] = torch.maximum(diff[1], d.max())
                diff[2] += d.numel()
                diff[3] += (d > 0.1).sum()
                diff[4] += (d > 1.0).sum()
                diff[5] = torch.maximum(diff[5], log_rho.max())
        if not keep_rollout:
            mb.old_logprobs = lp
    return diff


def fuse(microbatches: Sequence[MicroBatch]) -> MicroBatch:
    """Micro-batches of one row length stacked into one (the rows of each, in order)."""
    fields = {}
    for f in dataclasses.fields(MicroBatch):
        values = [getattr(mb, f.name) for mb in microbatches]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            fields[f.name] = None
        elif len(tensors) + values.count(None) == len(values):
            # An all-filler micro-batch carries no engine log-probs or routes: its rows hold
            # nothing (no loss-mask positions), and "no expert" is -1 in the routes.
            fill = -1 if f.name == "engine_routes" else 0
            like = tensors[0]
            fields[f.name] = torch.cat(
                [v if v is not None else torch.full_like(like, fill) for v in values]
            )
        else:  # routes (replay) and packing's segments are per micro-batch by nature
            raise ValueError(f"micro-batches with '{f.name}' cannot be stacked")
    return MicroBatch(**fields)


def compute_old_logprobs_stacked(
    model,
    minibatches: List[List[MicroBatch]],
    rows: int,
    vocab_size: int,
    seq_len: int,
    keep_rollout: bool = False,
    route_meter=None,
) -> List[torch.Tensor]:
    """``compute_old_logprobs`` for every micro-batch of every minibatch, in forwards of up to
    ``rows`` rows (``loss.logprob_micro_batch_size``): each stacked micro-batch is scored once
    and its log-probs go back to its members. ``route_meter`` records pi_old's routes of the
    last minibatch's first micro-batch (its rows of the stacked forward), as the per-minibatch
    pass does. Returns the per-forward [sum, max, tokens] differences from the engine."""
    flat = [mb for mbs in minibatches for mb in mbs]
    b = flat[0].tokens.shape[0]
    per = max(1, rows // b)
    watched = minibatches[-1][0]
    diffs = []
    for start in range(0, len(flat), per):
        members = flat[start : start + per]
        stacked = fuse(members)
        at = next((j for j, mb in enumerate(members) if mb is watched), None)
        if route_meter is not None and at is not None:
            mask = torch.zeros_like(stacked.loss_mask)
            mask[at * b : (at + 1) * b] = watched.loss_mask
            route_meter.start("record", mask)
        diffs.append(
            compute_old_logprobs(model, [stacked], vocab_size, seq_len, keep_rollout=keep_rollout)
        )
        if route_meter is not None:
            route_meter.stop()
        if not keep_rollout and stacked.old_logprobs is not None:
            for j, mb in enumerate(members):
                mb.old_logprobs = stacked.old_logprobs[j * b : (j + 1) * b]
    return diffs


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


DIFF = (
    "sum |log rho|",
    "max |log rho|",
    "tokens",
    "|log rho| > 0.1",
    "|log rho| > 1",
    "max log rho",
)
"""What ``compute_old_logprobs`` counts per rank, log rho = log pi_old - log mu (the engine's) per
sampled token: the token importance weight between the trainer and the engine that sampled."""
_MAXED = (1, 5)  # reduced by max; the others add up


def empty_diff() -> torch.Tensor:
    diff = torch.zeros(len(DIFF), dtype=torch.float64)
    diff[5] = -math.inf
    return diff


def reduce_logprob_diff(parts: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Per-rank ``DIFF`` entries -> over every rank: the mean and max |engine - trainer| per
    token, and the distribution of rho = pi_old / mu: the fractions of tokens with |log rho|
    above 0.1 and 1, and the largest rho."""
    stacked = torch.stack(list(parts)) if parts else empty_diff()[None]
    summed, maxed = stacked.sum(0), stacked.max(0).values
    sums = summed[[0, 2, 3, 4]].clone()
    worst = maxed[list(_MAXED)].clone()
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tokens = float(sums[1])
    if not tokens:
        nan = float("nan")
        return {
            "rollout/logprob_abs_diff_mean": nan,
            "rollout/logprob_abs_diff_max": nan,
            "rollout/logprob_diff_tokens": 0.0,
            "rollout/token_log_rho_above_0.1": nan,
            "rollout/token_log_rho_above_1": nan,
            "rollout/token_rho_max": nan,
        }
    return {
        "rollout/logprob_abs_diff_mean": float(sums[0]) / tokens,
        "rollout/logprob_abs_diff_max": float(worst[0]),
        "rollout/logprob_diff_tokens": tokens,
        "rollout/token_log_rho_above_0.1": float(sums[2]) / tokens,
        "rollout/token_log_rho_above_1": float(sums[3]) / tokens,
        "rollout/token_rho_max": math.exp(min(float(worst[1]), 700.0)),
    }
