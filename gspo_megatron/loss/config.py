"""The ``loss:`` config section: the objective, its rollout correction, how a batch is consumed."""

from __future__ import annotations

from dataclasses import dataclass

from gspo_megatron.errors import GspoError
from gspo_megatron.loss.correction import CORRECTIONS
from gspo_megatron.loss.objectives import OBJECTIVES

ROUTING_REPLAY = ("none", "r2", "r3")
"""``loss.routing_replay``: how the updates route MoE tokens (``gspo_megatron.learner.routing_replay``)."""


@dataclass(frozen=True)
class PolicyLossConfig:
    """The objective and how a rollout batch is consumed."""

    variant: str = "gspo"
    """gspo (sequence ratio), gspo_token (sequence ratio, per-token advantages), grpo (token
    ratios), sapo (token ratios through a smooth gate), cispo (truncated token weights, tokens
    normalised over the batch)."""
    clip_low: float = 3e-4
    """eps_low: the ratio is clipped below at 1 - clip_low (paper: 3e-4; GRPO: 0.2)."""
    clip_high: float = 4e-4
    """eps_high: the ratio is clipped above at 1 + clip_high (paper: 4e-4; GRPO: 0.27; cispo
    truncates its token weights at 1 + clip_high)."""
    sapo_tau_pos: float = 1.0
    """sapo: the gate's temperature for positive advantages."""
    sapo_tau_neg: float = 1.05
    """sapo: the gate's temperature for negative advantages."""
    rollout_correction: str = "none"
    """Correct for the engine sampling from a policy other than the trainer's pi_old: none, tis
    (token terms, or gspo's sequence term, times min(rho, correction_cap)), mis (drop sequences
    whose rho_i is outside [correction_low, correction_high]), icepop (drop token terms whose
    rho_t is outside that range; not gspo). rho = exp(pi_old - engine log-prob)."""
    correction_cap: float = 2.0
    """tis: the cap C of the importance weight min(rho, C)."""
    correction_low: float = 0.5
    """mis / icepop: the lowest rho kept."""
    correction_high: float = 2.0
    """mis / icepop: the highest rho kept."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference policy, the initial model.ckpt kept frozen
    beside the policy (one more copy of the parameters; paper: 0, off)."""
    num_minibatches: int = 4
    """Optimizer steps per rollout batch (paper: 4)."""
    old_logprobs: str = "trainer"
    """Where pi_old's log-probs come from: trainer (a forward pass before the first step) or
    rollout (the engine's sampling log-probs)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank (padded micro-batches)."""
    logprob_micro_batch_size: int = 0
    """Rows per forward pass in pi_old's scoring (no gradients, so no activations are kept):
    consecutive micro-batches of every minibatch are stacked up to this many rows, fewer and
    larger calls; 0 = micro_batch_size (one forward per micro-batch). Used with padded
    micro-batches without routing replay; ignored with replay (it records and replays routes
    per micro-batch) and with max_tokens_per_microbatch (packed rows are sized by it). pi_old
    then differs from the first update's own forward in the last bits (~1e-8: a matrix
    product's summation order depends on the batch), so the first ratio is 1 to float
    precision rather than exactly."""
    max_tokens_per_microbatch: int = 0
    """Padding-free micro-batches: pack whole sequences end to end into rows of at most this
    many tokens (attention kept within each sequence) instead of micro_batch_size rows padded
    to the longest; 0 = off. At least rollout.max_prompt_tokens + rollout.max_new_tokens."""
    routing_replay: str = "none"
    """MoE routing replay: none (GSPO needs none), r2 (every update of a rollout batch routes each
    token to the experts the pi_old forward chose; the paper's GRPO baseline), r3 (pi_old's forward
    and the updates route as the rollout engine did while sampling; needs rollout.capture_routes)."""

    @property
    def per_token(self) -> bool:
        """The loss divides by response tokens (cispo), not sequences."""
        return OBJECTIVES[self.variant].per_token

    def validate(self) -> None:
        if self.variant not in OBJECTIVES:
            raise GspoError(f"loss.variant='{self.variant}' (allowed: {', '.join(OBJECTIVES)})")
        if self.old_logprobs not in ("trainer", "rollout"):
            raise GspoError(f"loss.old_logprobs='{self.old_logprobs}' (allowed: trainer, rollout)")
        if not 0 <= self.clip_low < 1:
            raise GspoError(f"loss.clip_low={self.clip_low} must be in [0, 1)")
        if not self.clip_high >= 0:
            raise GspoError(f"loss.clip_high={self.clip_high} must be >= 0")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            if not getattr(self, name) > 0:
                raise GspoError(f"loss.{name}={getattr(self, name)} must be > 0")
        if self.max_tokens_per_microbatch < 0:
            raise GspoError(
                f"loss.max_tokens_per_microbatch={self.max_tokens_per_microbatch} must be >= 0 "
                f"(0 = padded micro-batches)"
            )
        if self.logprob_micro_batch_size < 0:
            raise GspoError(
                f"loss.logprob_micro_batch_size={self.logprob_micro_batch_size} must be >= 0 "
                f"(0 = loss.micro_batch_size)"
            )
        if self.num_minibatches < 1 or self.micro_batch_size < 1:
            raise GspoError("loss.num_minibatches and loss.micro_batch_size must be >= 1")
        if self.kl_coef < 0:
            raise GspoError(f"loss.kl_coef={self.kl_coef} must be >= 0")
        if self.routing_replay not in ROUTING_REPLAY:
            raise GspoError(
                f"loss.routing_replay='{self.routing_replay}' (allowed: {', '.join(ROUTING_REPLAY)})"
            )
        self._validate_correction()

    def _validate_correction(self) -> None:
        kind = self.rollout_correction
        if kind not in CORRECTIONS:
            raise GspoError(f"loss.rollout_correction='{kind}' (allowed: {', '.join(CORRECTIONS)})")
        if not self.correction_cap > 0:
            raise GspoError(
                f"loss.correction_cap={self.correction_cap} must be > 0 (tis weights are "
                f"min(rho, cap); default 2.0)"
            )
        if not 0 <= self.correction_low <= self.correction_high:
            raise GspoError(
                f"loss.correction_low={self.correction_low} and loss.correction_high="
                f"{self.correction_high}: need 0 <= low <= high (defaults 0.5, 2.0)"
            )
        if kind == "none":
            return
        if kind == "icepop" and not OBJECTIVES[self.variant].token_terms:
            token_variants = [n for n, o in OBJECTIVES.items() if o.token_terms]
            raise GspoError(
                f"loss.rollout_correction=icepop masks token terms, but loss.variant="
                f"{self.variant} has one ratio per sequence; use mis or tis with it, or a "
                f"token variant ({', '.join(token_variants)})"
            )
        if self.old_logprobs == "rollout":
            raise GspoError(
                f"loss.rollout_correction={kind} weighs the trainer's pi_old against the "
                f"engine's log-probs, but loss.old_logprobs=rollout makes them the same "
                f"(rho = 1); use loss.old_logprobs=trainer or loss.rollout_correction=none"
            )
