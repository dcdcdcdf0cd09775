"""An optimizer step's metrics: per-micro-batch sums from the loss, reduced to global values.

The loss (``loss.policy_loss``) returns sums and counts per micro-batch; ``reduce_metrics`` adds
them over micro-batches on the last pipeline stage and over data-parallel ranks (TP and CP
duplicates count once) and turns them into the logged means; ``summarise_steps`` folds the
optimizer steps of one rollout batch into the batch's metrics.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gspo_megatron.loss import PolicyLossConfig, finalize_metrics

REDUCED = (
    "loss_sum",
    "num_sequences",
    "num_tokens",
    "clipped_sum",
    "clip_denominator",
    "clamp_sum",
    "clamp_denominator",
    "abs_log_ratio_sum",
    "approx_kl_sum",
    "token_log_ratio_sum",
    "token_log_ratio_sq_sum",
    "entropy_sum",
    "entropy_tokens",
)
"""Per-micro-batch sums that add up over micro-batches and data-parallel ranks."""
REF_KL = ("ref_kl_sum",)
CORRECTION = ("correction_weight_sum", "correction_units", "correction_masked_sum")
RANGE = ("rho_min", "rho_max")
"""Reduced by min / max instead (the rollout correction's range of rho)."""
FROM_LOSS = REDUCED + REF_KL + CORRECTION + RANGE
"""Every entry of ``policy_loss``'s metrics a micro-batch reports for reduction."""


def reduce_metrics(
    store: List[dict], cfg: PolicyLossConfig, nonfinite_grads: float = 0.0
) -> Dict[str, float]:
    """Sum per-micro-batch sums on the last stage, then over data-parallel ranks; every rank
    receives the result (counted once per sequence: TP and CP duplicates contribute zero).
    ``nonfinite_grads`` (every rank's own flag) comes back summed over all ranks. ``cfg``
    decides the extras: ``gspo/ref_kl`` (the KL penalty's k3 estimate) when the penalty is on,
    the rollout correction's ``rollout/*`` metrics when it is on, and the loss per response
    token for a per-token objective (what it is normalised by)."""
    correcting = cfg.rollout_correction != "none"
    keys = list(REDUCED) + (list(REF_KL) if cfg.kl_coef else [])
    keys += list(CORRECTION) if correcting else []
    local = torch.zeros(len(keys) + 1, dtype=torch.float64)
    local[-1] = nonfinite_grads
    # max of (rho_max, -rho_min): one collective for both; -inf is the identity.
    extremes = torch.full((2,), float("-inf"), dtype=torch.float64)
    owner = (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    if owner:
        for d in store:
            # A filler micro-batch (no tokens) reports no ref_kl_sum.
            local[:-1] += torch.tensor([float(d.get(k, 0.0)) for k in keys], dtype=torch.float64)
            if correcting:
                mb_ext = torch.tensor([float(d["rho_max"]), -float(d["rho_min"])])
                extremes = torch.maximum(extremes, mb_ext.double())
    if dist.is_initialized():
        dist.all_reduce(local)
        if correcting:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    sums = {k: torch.tensor(v) for k, v in zip(keys, local.tolist())}
    out = {f"gspo/{k}": float(v) for k, v in finalize_metrics(sums).items()}
    if correcting:
        for name in ("correction_weight_mean", "correction_masked_fraction"):
            out[f"rollout/{name}"] = out.pop(f"gspo/{name}")
        seen = math.isfinite(float(extremes[0]))
        out["rollout/rho_max"] = float(extremes[0]) if seen else float("nan")
        out["rollout/rho_min"] = -float(extremes[1]) if seen else float("nan")
    n = max(float(sums["num_sequences"]), 1.0)
    if cfg.per_token:
        n = max(float(sums["num_tokens"]), 1.0)
    out["gspo/loss"] = float(sums["loss_sum"]) / n
    out["train/entropy"] = float(sums["entropy_sum"]) / max(float(sums["entropy_tokens"]), 1.0)
    out["train/sequences"] = float(sums["num_sequences"])
    out["train/tokens"] = float(sums["num_tokens"])
    out["nonfinite_grads"] = float(local[-1])
    return out


SUMMED = ("train/sequences", "train/tokens", "train/skipped_steps")
"""Step metrics that add up over a batch's optimizer steps; the others are averaged."""
LOWEST, HIGHEST = ("rollout/rho_min",), ("rollout/rho_max",)
"""Step metrics whose batch value is the lowest / highest of its steps'."""


def summarise_steps(steps: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """One rollout batch's metrics from its optimizer steps' (sequences, tokens and skipped steps
    add up; rho's range is the widest; losses, fractions, norms, the LR are averaged)."""
    out: Dict[str, float] = {}
    for key in dict.fromkeys(k for s in steps for k in s):  # every key, first-seen order
        values = [s[key] for s in steps if key in s]
        if key in SUMMED:
            out[key] = sum(values)
        elif key in LOWEST or key in HIGHEST:
            finite = [v for v in values if not math.isnan(v)]
            pick = min if key in LOWEST else max
            out[key] = pick(finite) if finite else float("nan")
        else:
            out[key] = sum(values) / len(values)
    return out
