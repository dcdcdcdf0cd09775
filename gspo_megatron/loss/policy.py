"""``policy_loss``: what every objective shares, from log-probs to a loss and its metrics.

The per-sequence log-ratio (clamped), the objective's J_i (``loss.objectives``), the rollout
correction's weights (``loss.correction``), the normalisation, an optional KL term, the metrics:

    log s_i = (1/|y_i|) sum_t (logp_t - old_t)                     (clamped to +-log_ratio_clamp)
    loss    = -(1/N) sum_i c_i J_i   (+ kl_coef * k3 KL to a reference policy, off by default)

N is the number of non-empty sequences (every sequence weighs the same whatever its length) or,
for objectives normalised per token (cispo), the number of response tokens; c_i is a sequence
correction weight (1 without one).

Distribution: ``num_sequences`` / ``num_tokens`` are the global counts (all micro-batches and
data-parallel ranks), so per-micro-batch losses add up to the single-process full-batch loss.
Under context parallelism pass ``cp_group``: the per-sequence sums of log-ratios, token terms and
token counts are all-reduced over it before anything non-linear (the exp, the clip) is applied.
A row with no response tokens contributes nothing (and never a NaN).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from gspo_megatron.loss.config import PolicyLossConfig
from gspo_megatron.loss.correction import correction_weights
from gspo_megatron.loss.groups import sum_over_group
from gspo_megatron.loss.objectives import OBJECTIVES, Ratios, Terms

# exp(20) ~ 4.9e8: finite in fp32 with room to spare; a larger ratio carries no information.
LOG_RATIO_CLAMP = 20.0
_DEFAULT = PolicyLossConfig()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PolicyLossConfig = _DEFAULT,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    cp_group=None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy loss over a batch of B sequences, with the objective ``OBJECTIVES[cfg.variant]``
    and the settings of the ``loss:`` section (``cfg``: clips, SAPO temperatures, rollout
    correction, KL coefficient).

    logprobs, old_logprobs, response_mask (and ref_logprobs, rollout_logprobs): [B, T];
    advantages: [B]. ``rollout_logprobs`` are the engine's sampling log-probs, needed by a
    ``cfg.rollout_correction`` other than none; ``ref_logprobs`` the reference policy's, for
    ``cfg.kl_coef`` > 0. Returns (loss, metrics). ``metrics`` holds detached tensors: the means
    below, plus ``*_sum``, ``num_*``, ``*_denominator``, ``correction_units`` and ``rho_min`` /
    ``rho_max`` entries that add up (or min / max) correctly across micro-batches and ranks:
      clip_fraction   sequences clipped (gspo, gspo_token) or tokens clipped (token variants)
      abs_log_ratio   mean |log s_i| (sequence log-ratio, all variants)
      clamp_fraction  how often a log-ratio hit +-log_ratio_clamp
      approx_kl       mean over sequences of (1/|y|) sum_t 0.5 (logp - old)^2, KL(pi_old || pi)
      ref_kl          mean k3 KL to the reference policy (when ref_logprobs is given)
      correction_weight_mean, correction_masked_fraction   (with a rollout correction)
    """
    if cfg.variant not in OBJECTIVES:
        raise ValueError(f"variant '{cfg.variant}' is not one of {', '.join(OBJECTIVES)}")
    objective_kind = OBJECTIVES[cfg.variant]
    # Compute in the log-probs' dtype (fp32 in training; fp64 in the reference tests).
    mask = response_mask.to(logprobs.dtype)
    n_tok = sum_over_group(mask.sum(dim=1), cp_group)  # [B]
    valid = n_tok > 0
    denom = n_tok.clamp(min=1.0)

    def seq_sum(x_bt: torch.Tensor) -> torch.Tensor:
        """sum_t x_it over response tokens, across CP shards."""
        return sum_over_group((x_bt * mask).sum(dim=1), cp_group)

    def seq_mean(x_bt: torch.Tensor) -> torch.Tensor:
        """(1/|y_i|) sum_t x_it over response tokens, across CP shards."""
        return seq_sum(x_bt) / denom

    correction = None
    if cfg.rollout_correction != "none":
        if rollout_logprobs is None:
            raise ValueError(f"rollout_correction={cfg.rollout_correction} needs rollout_logprobs")
        correction = correction_weights(
            cfg,
            old_logprobs=old_logprobs,
            rollout_logprobs=rollout_logprobs.to(logprobs.dtype),
            mask=mask,
            valid=valid,
            seq_mean=seq_mean,
            token_terms=objective_kind.token_terms,
            log_ratio_clamp=log_ratio_clamp,
            cp_group=cp_group,
        )

    token_delta = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_s = seq_mean(token_delta)
    clamp_count = ((log_s.abs() > log_ratio_clamp) & valid).float().sum()
    log_s = log_s.clamp(-log_ratio_clamp, log_ratio_clamp)
    terms = objective_kind.fn(
        Ratios(
            logprobs=logprobs,
            token_delta=token_delta,
            mask=mask,
            adv=advantages.to(logprobs.dtype),
            n_tok=n_tok,
            valid=valid,
            log_s=log_s,
            seq_mean=seq_mean,
            seq_sum=seq_sum,
            cfg=cfg,
            log_ratio_clamp=log_ratio_clamp,
            cp_group=cp_group,
            token_weight=None if correction is None else correction.token_weight,
        )
    )
    objective = terms.objective
    if correction is not None and correction.seq_weight is not None:
        objective = objective * correction.seq_weight
    ref_kl = None
    if ref_logprobs is not None and cfg.kl_coef != 0.0:
        k3 = _k3(ref_logprobs, logprobs, mask, log_ratio_clamp)
        ref_kl = seq_mean(k3)
        # Per-token objectives weigh every token the same: the penalty is summed like J_i.
        objective = objective - cfg.kl_coef * (seq_sum(k3) if objective_kind.per_token else ref_kl)

    objective = torch.where(valid, objective, torch.zeros_like(objective))
    if objective_kind.per_token:
        normaliser = float(n_tok.sum().item()) if num_tokens is None else num_tokens
    else:
        normaliser = float(valid.sum().item()) if num_sequences is None else num_sequences
    loss = -objective.sum() / max(float(normaliser), 1.0)

    with torch.no_grad():
        metrics = _metrics(
            terms, n_tok, valid, log_s, token_delta.detach(), clamp_count, seq_mean, seq_sum
        )
        if ref_kl is not None:
            metrics["ref_kl_sum"] = (ref_kl.detach() * valid).sum()
        if correction is not None:
            metrics.update(correction.metrics)
        metrics.update(finalize_metrics(metrics))
    return loss, metrics


def _k3(ref_logprobs, logprobs, mask, log_ratio_clamp: float) -> torch.Tensor:
    """[B, T] the k3 estimate exp(d) - d - 1 of KL(pi || pi_ref), d = ref - logp (clamped), on
    response tokens."""
    d = (ref_logprobs - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    return torch.where(mask > 0, torch.exp(d) - d - 1.0, torch.zeros_like(d))


def _metrics(
    terms: Terms, n_tok, valid, log_s, token_delta, clamp_count, seq_mean, seq_sum
) -> Dict[str, torch.Tensor]:
    """The sums and counts behind the loss's metrics (``finalize_metrics`` makes the means)."""
    n_valid = valid.float().sum()
    if terms.clamped is not None:  # token-ratio objectives count their own clamped tokens
        clamp_count = terms.clamped
    return {
        "num_sequences": n_valid,
        "num_tokens": n_tok.sum(),
        "clipped_sum": terms.clipped.detach(),
        "clip_denominator": terms.clip_units.detach(),
        "clamp_sum": clamp_count.detach(),
        "clamp_denominator": (n_valid if terms.clamp_units is None else terms.clamp_units).detach(),
        "abs_log_ratio_sum": (log_s.detach().abs() * valid).sum(),
        "approx_kl_sum": (seq_mean(0.5 * token_delta**2) * valid).sum(),
        # Token log-ratios logp_t - old_t over response tokens: their spread is what swings
        # token-level ratios (GRPO) when MoE routes move.
        "token_log_ratio_sum": seq_sum(token_delta).sum(),
        "token_log_ratio_sq_sum": seq_sum(token_delta**2).sum(),
    }


def finalize_metrics(sums: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Means from (possibly all-reduced) sums and counts."""
    n = sums["num_sequences"].clamp(min=1.0)
    out = {
        "clip_fraction": sums["clipped_sum"] / sums["clip_denominator"].clamp(min=1.0),
        "clamp_fraction": sums["clamp_sum"] / sums["clamp_denominator"].clamp(min=1.0),
        "abs_log_ratio": sums["abs_log_ratio_sum"] / n,
        "approx_kl": sums["approx_kl_sum"] / n,
    }
    if "token_log_ratio_sq_sum" in sums:
        tokens = sums["num_tokens"].clamp(min=1.0)
        mean = sums["token_log_ratio_sum"] / tokens
        out["token_log_ratio_std"] = (
            (sums["token_log_ratio_sq_sum"] / tokens - mean**2).clamp(min=0.0).sqrt()
        )
    if "ref_kl_sum" in sums:
        out["ref_kl"] = sums["ref_kl_sum"] / n
    if "correction_units" in sums:
        units = sums["correction_units"].clamp(min=1.0)
        out["correction_weight_mean"] = sums["correction_weight_sum"] / units
        out["correction_masked_fraction"] = sums["correction_masked_sum"] / units
    return out
