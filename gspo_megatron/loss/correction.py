"""Rollout correction: weights that account for the engine sampling from a slightly different
policy than the trainer's pi_old (another kernel, another precision, on MoE other routes).

With ``old_t`` the trainer's pi_old log-prob of a response token and ``roll_t`` the engine's,
``rho_t = exp(old_t - roll_t)`` and, per sequence, ``rho_i = exp(mean_t (old_t - roll_t))``
(log-ratios clamped like the policy's). The weights are detached: they reweight or mask the
objective's terms and never carry a gradient of their own.

- ``tis`` (truncated importance sampling): token terms times ``min(rho_t, cap)``; an objective
  without token terms (gspo) has J_i times ``min(rho_i, cap)``.
- ``mis`` (masked importance sampling): J_i is dropped (weight 0) when ``rho_i`` is outside
  [low, high]; the sequence stays in the normalising count.
- ``icepop``: token terms whose ``rho_t`` is outside [low, high] are dropped; objectives with
  token terms only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
import torch.distributed as dist

from gspo_megatron.loss.groups import extreme_over_group, sum_over_group

if TYPE_CHECKING:  # config.py imports this module for CORRECTIONS
    from gspo_megatron.loss.config import PolicyLossConfig

CORRECTIONS = ("none", "tis", "mis", "icepop")
"""``loss.rollout_correction``: the allowed values."""


@dataclass
class Correction:
    token_weight: Optional[torch.Tensor]  # [B, T], or None
    seq_weight: Optional[torch.Tensor]  # [B], or None
    metrics: Dict[str, torch.Tensor]
    """correction_weight_sum / correction_units / correction_masked_sum (units: tokens for the
    token forms, non-empty sequences for the sequence forms; summed over CP ranks), and
    rho_min / rho_max over the same units (+inf / -inf when there are none)."""


def uses_token_weights(kind: str, token_terms: bool) -> bool:
    """Whether ``kind`` weights token terms (else it weights whole sequences)."""
    return kind == "icepop" or (kind == "tis" and token_terms)


@torch.no_grad()
def correction_weights(
    cfg: "PolicyLossConfig",
    *,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor,
    seq_mean: Callable[[torch.Tensor], torch.Tensor],
    token_terms: bool,
    log_ratio_clamp: float,
    cp_group=None,
) -> Correction:
    """``cfg.rollout_correction`` (one of CORRECTIONS but none, with its cap / range) for a
    batch: ``mask`` [B, T] response tokens in the log-probs' dtype, ``valid`` [B] non-empty
    sequences, ``seq_mean`` the CP-aware per-sequence mean of ``policy_loss``, ``token_terms``
    whether the objective's J_i is made of token terms."""
    kind, cap = cfg.rollout_correction, cfg.correction_cap
    low, high = cfg.correction_low, cfg.correction_high
    if kind == "icepop" and not token_terms:
        raise ValueError("icepop masks token terms: the objective has one ratio per sequence")
    delta = torch.where(mask > 0, old_logprobs - rollout_logprobs, torch.zeros_like(mask))
    token_form = uses_token_weights(kind, token_terms)
    if token_form:
        rho = torch.exp(delta.clamp(-log_ratio_clamp, log_ratio_clamp))
        on = mask > 0
        group = cp_group
    else:
        rho = torch.exp(seq_mean(delta).clamp(-log_ratio_clamp, log_ratio_clamp))
        on = valid
        group = None  # seq_mean already summed the CP shards: every CP rank holds rho_i
    if kind == "tis":
        weight = rho.clamp(max=cap)
        changed = rho > cap
    else:  # mis, icepop: keep or drop
        keep = (rho >= low) & (rho <= high)
        weight = keep.to(rho.dtype)
        changed = ~keep
    weight = torch.where(on, weight, torch.zeros_like(weight))
    inf = torch.full((1,), float("inf"), dtype=rho.dtype)
    metrics = {
        "correction_weight_sum": sum_over_group(weight.sum(), group),
        "correction_units": sum_over_group(on.to(rho.dtype).sum(), group),
        "correction_masked_sum": sum_over_group((changed & on).to(rho.dtype).sum(), group),
        "rho_min": extreme_over_group(_extreme(rho, on, inf, torch.min), group, dist.ReduceOp.MIN),
        "rho_max": extreme_over_group(_extreme(rho, on, -inf, torch.max), group, dist.ReduceOp.MAX),
    }
    if token_form:
        return Correction(weight, None, metrics)
    return Correction(None, weight, metrics)


def _extreme(rho: torch.Tensor, on: torch.Tensor, empty: torch.Tensor, fn) -> torch.Tensor:
    """min or max of rho where ``on``; ``empty`` (+-inf, the reduction's identity) if none."""
    return fn(torch.cat([rho[on], empty]))
