"""Batched forward passes through megatron-core's pipeline schedule, returning token log-probs.

Sequences (prompt + response token ids) are right-padded to one length per schedule call (a
multiple of TP, which sequence parallelism splits). The log-prob of token t comes from the
logits at position t-1, on the last pipeline stage, through ``vocab_parallel_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence

import torch

from gspo_megatron.logprobs import vocab_parallel_logprobs


@dataclass
class MicroBatch:
    """One micro-batch, identical on every rank of a model-parallel group."""

    tokens: torch.Tensor  # [b, S] int64, right-padded with 0
    lengths: torch.Tensor  # [b] int64, real tokens per row


def pad_to_multiple(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_microbatches(seqs: Sequence[Sequence[int]], micro_batch_size: int,
                      seq_len: int) -> List[MicroBatch]:
    """Split ``seqs`` into micro-batches padded to ``seq_len``; the last is padded with empty
    rows (length 0) so every micro-batch has ``micro_batch_size`` rows."""
    out = []
    for start in range(0, len(seqs), micro_batch_size):
        chunk = list(seqs[start:start + micro_batch_size])
        chunk += [[]] * (micro_batch_size - len(chunk))
        tokens = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
        for i, s in enumerate(chunk):
            tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        out.append(MicroBatch(tokens, torch.tensor([len(s) for s in chunk], dtype=torch.long)))
    return out


def causal_mask(seq_len: int, device) -> torch.Tensor:
    # Passed explicitly: megatron's default mask is allocated on "cuda". True = masked.
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_forward(model, mb: MicroBatch) -> torch.Tensor:
    """Run this stage of the model on one micro-batch (pipeline input comes via set_input_tensor)."""
    dev = _device()
    tokens = mb.tokens.to(dev)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, causal_mask(s, dev))


def token_logprobs(logits_bsv: torch.Tensor, mb: MicroBatch, vocab_size: int) -> torch.Tensor:
    """[b, S-1] log p(tokens[:, 1:]) from logits at positions 0..S-2."""
    targets = mb.tokens[:, 1:].to(logits_bsv.device)
    return vocab_parallel_logprobs(logits_bsv[:, :-1], targets, vocab_size)


def forward_logprobs(model, microbatches: List[MicroBatch],
                     vocab_size: int) -> Optional[List[torch.Tensor]]:
    """Forward-only pass over all micro-batches. On the last pipeline stage returns, per
    micro-batch, [b, S-1] fp32 log-probs of tokens[:, 1:]; other stages return None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        output = model_forward(model_chunk, mb)

        def loss_func(mb_, logits):
            lp = token_logprobs(logits, mb_, vocab_size).detach()
            return torch.zeros((), device=lp.device), {"logprobs": lp}

        return output, partial(loss_func, mb)

    seq_len = microbatches[0].tokens.shape[1]
    mbs = microbatches[0].tokens.shape[0]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=seq_len,
            micro_batch_size=mbs,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [d["logprobs"].cpu() for d in store]
