"""Policy objectives, rollout correction, group-normalised advantages, and the ``loss:`` config
section. The formulas are those of ``docs/gspo.md``.

- ``objectives``: one function per ``loss.variant`` (gspo, gspo_token, grpo, sapo, cispo).
- ``correction``: ``loss.rollout_correction`` (tis, mis, icepop), engine vs trainer pi_old.
- ``policy``: ``policy_loss``, what they share (ratios, normalisation, KL, metrics).
- ``advantages``: ``group_advantages``. ``config``: ``PolicyLossConfig``.
"""

from gspo_megatron.loss.advantages import group_advantages
from gspo_megatron.loss.config import ROUTING_REPLAY, PolicyLossConfig
from gspo_megatron.loss.correction import CORRECTIONS
from gspo_megatron.loss.objectives import OBJECTIVES
from gspo_megatron.loss.policy import LOG_RATIO_CLAMP, finalize_metrics, policy_loss

__all__ = [
    "CORRECTIONS",
    "LOG_RATIO_CLAMP",
    "OBJECTIVES",
    "ROUTING_REPLAY",
    "PolicyLossConfig",
    "finalize_metrics",
    "group_advantages",
    "policy_loss",
]
