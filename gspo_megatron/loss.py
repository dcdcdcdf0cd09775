"""Policy objectives, group-normalised advantages, and the ``loss:`` config section.

The formulas are those of ``docs/gspo.md`` (Zheng et al. 2025). Every objective is one function
in ``OBJECTIVES`` (name -> function) with its formula in its docstring; ``policy_loss`` does
what they share: the per-sequence log-ratio (clamped), the normalisation, an optional KL term
and the metrics. A new variant is one function here and one test against its formula.

    log s_i = (1/|y_i|) sum_t (logp_t - old_t)                     (clamped to +-log_ratio_clamp)
    loss    = -(1/num_sequences) sum_i J_i   (+ kl_coef * k3 KL to a reference policy, off by default)

One term J_i per sequence, every sequence weighing the same whatever its length.

Distribution: ``num_sequences`` is the global count of non-empty sequences (all micro-batches and
data-parallel ranks), so per-micro-batch losses add up to the single-process full-batch loss.
Under context parallelism pass ``cp_group``: the per-sequence sums of log-ratios, token terms and
token counts are all-reduced over it before anything non-linear (the exp, the clip) is applied.
A row with no response tokens contributes nothing (and never a NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from gspo_megatron.errors import GspoError

# exp(20) ~ 4.9e8: finite in fp32 with room to spare; a larger ratio carries no information.
LOG_RATIO_CLAMP = 20.0


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; backward passes the gradient through (every rank computes the same
    downstream objective, and each rank's own terms receive it)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps); groups are consecutive runs of
    ``group_size``. std is the sample standard deviation (0 for a group of one). A group whose
    rewards are all equal gets 0 for every member. ``scale_by_std=False`` keeps r_i - mean."""
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).to(torch.float64)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(rewards.shape).to(torch.float32)


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float):
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    # The clip binds (removes the gradient) where the clipped term is the smaller one.
    binds = clipped < unclipped
    return torch.minimum(unclipped, clipped), binds


@dataclass
class Ratios:
    """What every objective starts from, for B sequences of T positions (response tokens only
    where ``mask`` is set; CP shards already summed where a sequence is concerned)."""

    logprobs: torch.Tensor  # [B, T] logp_t under pi_theta (carries the gradient)
    token_delta: torch.Tensor  # [B, T] logp_t - old_t on response tokens, 0 elsewhere
    mask: torch.Tensor  # [B, T] response tokens, in the log-probs' dtype
    adv: torch.Tensor  # [B] A_i
    n_tok: torch.Tensor  # [B] |y_i|
    valid: torch.Tensor  # [B] |y_i| > 0
    log_s: torch.Tensor  # [B] log s_i, clamped
    seq_mean: Callable[[torch.Tensor], torch.Tensor]  # [B, T] -> [B]: (1/|y_i|) sum_t x_it
    clip_low: float
    clip_high: float
    log_ratio_clamp: float
    cp_group: object


@dataclass
class Terms:
    """An objective's J_i and the counts its metrics need."""

    objective: torch.Tensor  # [B] J_i
    clipped: torch.Tensor  # clipped units: sequences, or tokens for token-ratio variants
    clip_units: torch.Tensor  # what clipped is a count of
    clamped: Optional[torch.Tensor] = None  # token-ratio variants count their own clamped tokens
    clamp_units: Optional[torch.Tensor] = None


def gspo(r: Ratios) -> Terms:
    """GSPO, one ratio per sequence, clipped per sequence:
    J_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),  s_i = exp(log s_i)."""
    s = torch.exp(r.log_s)
    objective, binds = _clipped_objective(s, r.adv, r.clip_low, r.clip_high)
    return Terms(objective, (binds & r.valid).float().sum(), r.valid.float().sum())


def gspo_token(r: Ratios) -> Terms:
    """GSPO-token: J_i = (1/|y_i|) sum_t min(s_it A_i, clip(s_it) A_i),
    s_it = sg[s_i] exp(logp_t - sg[logp_t]). Equal to GSPO in value, clipping and gradient
    with one advantage per sequence; it exists for per-token advantages."""
    s = torch.exp(r.log_s)
    # Value s_i on every token; gradient of token t flows through its own logp_t.
    s_tok = s.detach()[:, None] * torch.exp(r.logprobs - r.logprobs.detach())
    term, binds = _clipped_objective(s_tok, r.adv[:, None], r.clip_low, r.clip_high)
    # All tokens of a sequence share s_i, so the clip decision is per sequence.
    clipped = (binds[:, 0] & r.valid).float().sum() if binds.shape[1] else torch.zeros(())
    return Terms(r.seq_mean(term), clipped, r.valid.float().sum())


def grpo(r: Ratios) -> Terms:
    """GRPO, token-level ratios (the baseline GSPO replaces; pass GRPO's 0.2 / 0.27 clips):
    J_i = (1/|y_i|) sum_t min(w_it A_i, clip(w_it) A_i),  w_it = exp(logp_t - old_t)."""
    tok_lr = r.token_delta.clamp(-r.log_ratio_clamp, r.log_ratio_clamp)
    tok_clamped = (r.token_delta.abs() > r.log_ratio_clamp).float() * r.mask
    w = torch.exp(tok_lr)
    term, binds = _clipped_objective(w, r.adv[:, None], r.clip_low, r.clip_high)
    return Terms(
        r.seq_mean(term),
        _sum_over_group((binds.float() * r.mask).sum(), r.cp_group),
        r.n_tok.sum(),
        clamped=_sum_over_group(tok_clamped.sum(), r.cp_group),
        clamp_units=r.n_tok.sum(),
    )


OBJECTIVES: Dict[str, Callable[[Ratios], Terms]] = {
    "gspo": gspo,
    "gspo_token": gspo_token,
    "grpo": grpo,
}


ROUTING_REPLAY = ("none", "r2", "r3")
"""``loss.routing_replay``: how the updates route MoE tokens (``gspo_megatron.routing_replay``)."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """The objective and how a rollout batch is consumed."""

    variant: str = "gspo"
    """gspo (sequence ratio), gspo_token (sequence ratio, per-token advantages), grpo (token ratios)."""
    clip_low: float = 3e-4
    """eps_low: the ratio is clipped below at 1 - clip_low (paper: 3e-4; GRPO: 0.2)."""
    clip_high: float = 4e-4
    """eps_high: the ratio is clipped above at 1 + clip_high (paper: 4e-4; GRPO: 0.27)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference policy, the initial model.ckpt kept frozen
    beside the policy (one more copy of the parameters; paper: 0, off)."""
    num_minibatches: int = 4
    """Optimizer steps per rollout batch (paper: 4)."""
    old_logprobs: str = "trainer"
    """Where pi_old's log-probs come from: trainer (a forward pass before the first step) or
    rollout (the engine's sampling log-probs)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    routing_replay: str = "none"
    """MoE routing replay: none (GSPO needs none), r2 (every update of a rollout batch routes each
    token to the experts the pi_old forward chose; the paper's GRPO baseline), r3 (pi_old's forward
    and the updates route as the rollout engine did while sampling; needs rollout.capture_routes)."""

    def validate(self) -> None:
        if self.variant not in OBJECTIVES:
            raise GspoError(f"loss.variant='{self.variant}' (allowed: {', '.join(OBJECTIVES)})")
        if self.old_logprobs not in ("trainer", "rollout"):
            raise GspoError(f"loss.old_logprobs='{self.old_logprobs}' (allowed: trainer, rollout)")
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise GspoError(f"loss.{name}={v} must be in [0, 1)")
        if self.num_minibatches < 1 or self.micro_batch_size < 1:
            raise GspoError("loss.num_minibatches and loss.micro_batch_size must be >= 1")
        if self.kl_coef < 0:
            raise GspoError(f"loss.kl_coef={self.kl_coef} must be >= 0")
        if self.routing_replay not in ROUTING_REPLAY:
            raise GspoError(
                f"loss.routing_replay='{self.routing_replay}' (allowed: {', '.join(ROUTING_REPLAY)})"
            )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    variant: str = "gspo",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    num_sequences: Optional[float] = None,
    cp_group=None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy loss over a batch of B sequences, with the objective ``OBJECTIVES[variant]``.

    logprobs, old_logprobs, response_mask (and ref_logprobs): [B, T]; advantages: [B].
    Returns (loss, metrics). ``metrics`` holds detached tensors: the means below, plus ``*_sum``
    and ``num_*`` entries that add up correctly across micro-batches and ranks:
      clip_fraction   sequences clipped (gspo, gspo_token) or tokens clipped (grpo)
      abs_log_ratio   mean |log s_i| (sequence log-ratio, all variants)
      clamp_fraction  how often a log-ratio hit +-log_ratio_clamp
      approx_kl       mean over sequences of (1/|y|) sum_t 0.5 (logp - old)^2, KL(pi_old || pi)
      ref_kl          mean k3 KL to the reference policy (when ref_logprobs is given)
    """
    if variant not in OBJECTIVES:
        raise ValueError(f"variant '{variant}' is not one of {', '.join(OBJECTIVES)}")
    # Compute in the log-probs' dtype (fp32 in training; fp64 in the reference tests).
    mask = response_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    n_tok = _sum_over_group(mask.sum(dim=1), cp_group)  # [B]
    valid = n_tok > 0
    denom = n_tok.clamp(min=1.0)
    if num_sequences is None:
        num_sequences = float(valid.sum().item())

    def seq_mean(x_bt: torch.Tensor) -> torch.Tensor:
        """(1/|y_i|) sum_t x_it over response tokens, across CP shards."""
        return _sum_over_group((x_bt * mask).sum(dim=1), cp_group) / denom

    token_delta = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_s = seq_mean(token_delta)
    clamp_count = ((log_s.abs() > log_ratio_clamp) & valid).float().sum()
    log_s = log_s.clamp(-log_ratio_clamp, log_ratio_clamp)
    terms = OBJECTIVES[variant](
        Ratios(
            logprobs,
            token_delta,
            mask,
            adv,
            n_tok,
            valid,
            log_s,
            seq_mean,
            clip_low,
            clip_high,
            log_ratio_clamp,
            cp_group,
        )
    )
    objective = terms.objective

    if ref_logprobs is not None and kl_coef != 0.0:
        d = (ref_logprobs - logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
        k3 = torch.where(mask > 0, torch.exp(d) - d - 1.0, torch.zeros_like(d))
        ref_kl = seq_mean(k3)
        objective = objective - kl_coef * ref_kl
    else:
        ref_kl = None

    objective = torch.where(valid, objective, torch.zeros_like(objective))
    loss = -objective.sum() / max(float(num_sequences), 1.0)

    with torch.no_grad():
        n_valid = valid.float().sum()
        approx_kl = seq_mean(0.5 * token_delta.detach() ** 2)
        if terms.clamped is not None:
            clamp_count = terms.clamped
        clamp_den = n_valid if terms.clamp_units is None else terms.clamp_units
        metrics = {
            "num_sequences": n_valid,
            "num_tokens": n_tok.sum(),
            "clipped_sum": terms.clipped.detach(),
            "clip_denominator": terms.clip_units.detach(),
            "clamp_sum": clamp_count.detach(),
            "clamp_denominator": clamp_den.detach(),
            "abs_log_ratio_sum": (log_s.detach().abs() * valid).sum(),
            "approx_kl_sum": (approx_kl * valid).sum(),
            # Token log-ratios logp_t - old_t over response tokens: their spread is what swings
            # token-level ratios (GRPO) when MoE routes move.
            "token_log_ratio_sum": _sum_over_group(
                (token_delta.detach() * mask).sum(1), cp_group
            ).sum(),
            "token_log_ratio_sq_sum": _sum_over_group(
                (token_delta.detach() ** 2 * mask).sum(1), cp_group
            ).sum(),
        }
        if ref_kl is not None:
            metrics["ref_kl_sum"] = (ref_kl.detach() * valid).sum()
        metrics.update(finalize_metrics(metrics))
    return loss, metrics


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
    return out
