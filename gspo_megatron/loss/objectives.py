"""The policy objectives: one function per ``loss.variant``, its formula in its docstring.

Each objective turns the shared ``Ratios`` of a batch into per-sequence terms J_i
(``policy_loss`` negates, normalises and adds the KL penalty). ``OBJECTIVES`` maps the name to
the function and the two facts the rest of the loss needs about it: whether J_i is built from
per-token terms (token-level rollout corrections then weight each term) and whether the loss
divides by response tokens instead of sequences. A new variant is one function here, one entry
in ``OBJECTIVES`` and one reference case in ``tests/test_loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch

from gspo_megatron.loss.groups import sum_over_group

if TYPE_CHECKING:  # config.py imports this module for the registry
    from gspo_megatron.loss.config import PolicyLossConfig


@dataclass(frozen=True)
class Ratios:
    """What every objective starts from, for B sequences of T positions (response tokens only
    where ``mask`` is set; CP shards already summed where a sequence is concerned). Built by
    keyword in ``policy_loss``."""

    logprobs: torch.Tensor
    """[B, T] logp_t under pi_theta (carries the gradient)."""
    token_delta: torch.Tensor
    """[B, T] logp_t - old_t on response tokens, 0 elsewhere."""
    mask: torch.Tensor
    """[B, T] response tokens, in the log-probs' dtype."""
    adv: torch.Tensor
    """[B] A_i, in the log-probs' dtype."""
    n_tok: torch.Tensor
    """[B] |y_i|."""
    valid: torch.Tensor
    """[B] |y_i| > 0."""
    log_s: torch.Tensor
    """[B] log s_i, clamped."""
    seq_mean: Callable[[torch.Tensor], torch.Tensor]
    """[B, T] -> [B]: (1/|y_i|) sum_t x_it, over CP shards."""
    seq_sum: Callable[[torch.Tensor], torch.Tensor]
    """[B, T] -> [B]: sum_t x_it, over CP shards."""
    cfg: "PolicyLossConfig"
    """The loss settings (clips, SAPO temperatures)."""
    log_ratio_clamp: float
    cp_group: object
    token_weight: Optional[torch.Tensor] = None
    """[B, T] detached rollout-correction weight of each token term (None: 1)."""

    def weighted(self, term_bt: torch.Tensor) -> torch.Tensor:
        return term_bt if self.token_weight is None else term_bt * self.token_weight


@dataclass
class Terms:
    """An objective's J_i and the counts its metrics need."""

    objective: torch.Tensor  # [B] J_i
    clipped: torch.Tensor  # clipped units: sequences, or tokens for token-ratio variants
    clip_units: torch.Tensor  # what clipped is a count of
    clamped: Optional[torch.Tensor] = None  # token-ratio variants count their own clamped tokens
    clamp_units: Optional[torch.Tensor] = None


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float):
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    # The clip binds (removes the gradient) where the clipped term is the smaller one.
    binds = clipped < unclipped
    return torch.minimum(unclipped, clipped), binds


def _token_ratios(r: Ratios):
    """w_t = exp(logp_t - old_t), the log clamped like the sequence one; and the number of
    response tokens whose log-ratio hit the clamp (summed over CP ranks)."""
    tok_lr = r.token_delta.clamp(-r.log_ratio_clamp, r.log_ratio_clamp)
    hit = (r.token_delta.abs() > r.log_ratio_clamp).float() * r.mask
    return torch.exp(tok_lr), sum_over_group(hit.sum(), r.cp_group)


def _token_count(r: Ratios, flags_bt: torch.Tensor) -> torch.Tensor:
    """How many response tokens have ``flags_bt`` set, over CP ranks."""
    return sum_over_group((flags_bt.float() * r.mask).sum(), r.cp_group)


def gspo(r: Ratios) -> Terms:
    """GSPO, one ratio per sequence, clipped per sequence:
    J_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),  s_i = exp(log s_i)."""
    s = torch.exp(r.log_s)
    objective, binds = _clipped_objective(s, r.adv, r.cfg.clip_low, r.cfg.clip_high)
    return Terms(objective, (binds & r.valid).float().sum(), r.valid.float().sum())


def gspo_token(r: Ratios) -> Terms:
    """GSPO-token: J_i = (1/|y_i|) sum_t min(s_it A_i, clip(s_it) A_i),
    s_it = sg[s_i] exp(logp_t - sg[logp_t]). Equal to GSPO in value, clipping and gradient
    with one advantage per sequence; it exists for per-token advantages."""
    s = torch.exp(r.log_s)
    # Value s_i on every token; gradient of token t flows through its own logp_t.
    s_tok = s.detach()[:, None] * torch.exp(r.logprobs - r.logprobs.detach())
    term, binds = _clipped_objective(s_tok, r.adv[:, None], r.cfg.clip_low, r.cfg.clip_high)
    # All tokens of a sequence share s_i, so the clip decision is per sequence.
    clipped = (binds[:, 0] & r.valid).float().sum() if binds.shape[1] else torch.zeros(())
    return Terms(r.seq_mean(r.weighted(term)), clipped, r.valid.float().sum())


def grpo(r: Ratios) -> Terms:
    """GRPO, token-level ratios (the baseline GSPO replaces; pass GRPO's 0.2 / 0.27 clips):
    J_i = (1/|y_i|) sum_t min(w_it A_i, clip(w_it) A_i),  w_it = exp(logp_t - old_t)."""
    w, clamped = _token_ratios(r)
    term, binds = _clipped_objective(w, r.adv[:, None], r.cfg.clip_low, r.cfg.clip_high)
    n = r.n_tok.sum()
    return Terms(r.seq_mean(r.weighted(term)), _token_count(r, binds), n, clamped, n)


def sapo(r: Ratios) -> Terms:
    """SAPO (arXiv 2511.20347), a smooth gate instead of a hard clip:
    J_i = (1/|y_i|) sum_t f(w_it) A_i,  f(w) = sigmoid(tau (w - 1)) 4 / tau,
    tau = sapo_tau_pos where A_i > 0, sapo_tau_neg where A_i < 0. f'(1) = 1, so on-policy SAPO
    has GRPO's gradient; away from w = 1 the gradient fades smoothly (faster for negative
    advantages, tau_neg > tau_pos) where GRPO's clip cuts it off. Nothing is clipped
    (clip_fraction 0)."""
    w, clamped = _token_ratios(r)
    # The temperatures in the ratios' dtype: Python floats in torch.where become float32
    # tensors, and an fp64 loss would then run on 1.05 rounded to float32.
    tau_neg = torch.tensor(r.cfg.sapo_tau_neg, dtype=w.dtype, device=w.device)
    tau_pos = torch.tensor(r.cfg.sapo_tau_pos, dtype=w.dtype, device=w.device)
    tau = torch.where(r.adv < 0, tau_neg, tau_pos)[:, None]
    gate = torch.sigmoid(tau * (w - 1.0)) * (4.0 / tau)
    n = r.n_tok.sum()
    objective = r.seq_mean(r.weighted(gate * r.adv[:, None]))
    return Terms(objective, torch.zeros((), dtype=w.dtype), n, clamped, n)


def cispo(r: Ratios) -> Terms:
    """CISPO (MiniMax-M1): J_i = sum_t sg[min(w_it, 1 + eps_high)] A_i logp_t, divided by the
    response tokens of the whole batch (not per sequence). The truncated weight carries no
    gradient, so every token keeps a gradient (no token is clipped away); clip_fraction counts
    the tokens whose weight was truncated."""
    w, clamped = _token_ratios(r)
    cap = 1.0 + r.cfg.clip_high
    weight = w.clamp(max=cap).detach()
    n = r.n_tok.sum()
    objective = r.seq_sum(r.weighted(weight * r.adv[:, None] * r.logprobs))
    return Terms(objective, _token_count(r, w > cap), n, clamped, n)


@dataclass(frozen=True)
class Objective:
    fn: Callable[[Ratios], Terms]
    token_terms: bool
    """J_i is built from per-token terms: tis / icepop weight each of them."""
    per_token: bool = False
    """The loss divides by the batch's response tokens, not its sequences."""


OBJECTIVES: Dict[str, Objective] = {
    "gspo": Objective(gspo, token_terms=False),
    "gspo_token": Objective(gspo_token, token_terms=True),
    "grpo": Objective(grpo, token_terms=True),
    "sapo": Objective(sapo, token_terms=True),
    "cispo": Objective(cispo, token_terms=True, per_token=True),
}
