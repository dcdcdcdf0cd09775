"""Log-probabilities of given tokens from vocabulary-parallel logits.

The output layer leaves each tensor-parallel rank with a slice of the vocabulary
(``logits_bsv`` is [B, S, V/TP]). The log-softmax is computed across those slices with three
TP all-reduces (max, sum of exp, the target's logit), never by gathering full-vocabulary logits.
Rows added to pad the vocabulary (for divisibility) are excluded from the softmax, so the result
equals HF's log_softmax over the real vocabulary.
"""

from __future__ import annotations

import torch


def mask_padded_vocab(logits_bsv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padding ids (>= vocab_size) on this TP rank's slice to -inf."""
    from megatron.core import parallel_state

    part = logits_bsv.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * part
    first_pad = vocab_size - start
    if first_pad >= part:
        return logits_bsv
    keep = torch.arange(part, device=logits_bsv.device) < first_pad
    return logits_bsv.masked_fill(~keep, float("-inf"))


def vocab_parallel_logprobs(logits_bsv: torch.Tensor, targets_bs: torch.Tensor,
                            vocab_size: int) -> torch.Tensor:
    """log p(target) per position, [B, S] fp32; differentiable w.r.t. ``logits_bsv``.

    ``logits_bsv`` is sharded over the TP group along the (padded) vocabulary; ``targets_bs``
    holds global token ids < ``vocab_size`` and is identical on every TP rank.
    """
    from megatron.core import tensor_parallel

    logits = mask_padded_vocab(logits_bsv.float(), vocab_size).contiguous()
    # megatron's vocab-parallel cross entropy is -log_softmax(logits)[target], computed in fp32
    # with the max / sum-exp / target-logit all-reduces over the TP group.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets_bs)
