"""The frozen reference policy of the KL penalty (``loss.kl_coef > 0``).

The reference is the policy the run started from: ``model.ckpt``, built in the trainer's own
layout (so its log-probs come out on the same ranks, CP-sharded and vocab-parallel like the
policy's) and never updated. A resumed run rebuilds it from the same checkpoint, so resuming
changes nothing. It costs one more copy of the parameters (no gradients, no optimizer state)
and one forward pass per minibatch; with ``kl_coef = 0`` (the paper's setting and the
default) it is never built.

    KL_i = (1/|y_i|) sum_t k3(ref_t - logp_t),  k3(d) = exp(d) - d - 1   (>= 0, unbiased for
                                                                          KL(pi_theta || pi_ref))

is subtracted from each sequence's objective with weight ``kl_coef`` in ``loss.policy_loss``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from gspo_megatron.checkpoint.model import load_model_checkpoint
from gspo_megatron.distributed.parallel import ParallelLayout
from gspo_megatron.learner.batch import MicroBatch
from gspo_megatron.learner.forward import forward_logprobs
from gspo_megatron.models import ModelSpec, build_model


def build_reference(
    spec: ModelSpec, layout: ParallelLayout, dtype: torch.dtype, ckpt: Path
) -> torch.nn.Module:
    """This rank's part of the reference policy, loaded from ``ckpt``, frozen, in eval mode.
    Collective (every rank must call it, after the process groups exist)."""
    model = build_model(spec, layout, dtype)
    load_model_checkpoint(model, ckpt, spec)
    model.requires_grad_(False)
    return model.eval()


def fill_ref_logprobs(
    reference: torch.nn.Module, microbatches: List[MicroBatch], vocab_size: int, seq_len: int
) -> None:
    """Set ``mb.ref_logprobs`` ([b, S], this CP rank's positions) on the last pipeline stage,
    where the loss reads them; other stages have no log-probs and need none. Collective."""
    lps = forward_logprobs(reference, microbatches, vocab_size, seq_len)
    if lps is None:
        return
    for mb, lp in zip(microbatches, lps):
        mb.ref_logprobs = lp
