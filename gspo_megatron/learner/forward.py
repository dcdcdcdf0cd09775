"""Forward passes through megatron-core's pipeline schedule that return token log-probs.

Micro-batches come from ``gspo_megatron.learner.batch`` (labels already shifted, already split for this
CP rank). Log-probs of ``labels`` are computed on the last pipeline stage from the
vocabulary-parallel logits (``gspo_megatron.learner.logprobs``).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from gspo_megatron.learner import routing_replay
from gspo_megatron.learner.batch import MicroBatch
from gspo_megatron.learner.logprobs import tp_group, vocab_parallel_logprobs
from gspo_megatron.learner.packing import packed_attention_mask


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def causal_mask(seq_len: int, dev) -> torch.Tensor:
    # Passed explicitly: megatron's default mask is allocated on "cuda". True = masked.
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev), 1)[None, None]


def model_forward(model, mb: MicroBatch) -> torch.Tensor:
    """This pipeline stage of the model on one micro-batch: logits [b, S, V/TP] on the last
    stage, hidden states elsewhere (pipeline input arrives through set_input_tensor)."""
    dev = device()
    cp = parallel_state.get_context_parallel_world_size()
    if mb.attention_segments is not None:
        # Packed sequences: causal within each sequence, over the whole (un-split) row; under
        # CP the attention picks its zigzag rows and columns out of it.
        mask = packed_attention_mask(mb.attention_segments.to(dev))
    else:
        # Under CP the attention builds its own zigzag causal mask.
        mask = causal_mask(mb.tokens.shape[1], dev) if cp == 1 else None
    replay = routing_replay.of(model)
    with replay.micro_batch(mb) if replay is not None else contextlib.nullcontext():
        return model(mb.tokens.to(dev), mb.position_ids.to(dev), mask)


def label_logprobs(
    logits: torch.Tensor, mb: MicroBatch, vocab_size: int, inplace_backward: bool = False
):
    """log p(labels) and entropy, [b, S] fp32 each."""
    return vocab_parallel_logprobs(
        logits,
        mb.labels.to(logits.device),
        vocab_size,
        group=tp_group(),
        inplace_backward=inplace_backward,
    )


def run_schedule(
    model, forward_step, microbatches: List[MicroBatch], seq_len: int, forward_only: bool
) -> list:
    """megatron's pipeline schedule over ``microbatches`` (all of length ``seq_len``); returns
    what each micro-batch's loss function reported (last pipeline stage; empty elsewhere)."""
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=microbatches[0].tokens.shape[0],
        forward_only=forward_only,
    )


def forward_logprobs(
    model, microbatches: List[MicroBatch], vocab_size: int, seq_len: int
) -> Optional[List[torch.Tensor]]:
    """Forward-only pass over all micro-batches (all of length ``seq_len``). On the last
    pipeline stage returns, per micro-batch, [b, S] fp32 log-probs of its labels (CPU);
    other stages return None."""

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        output = model_forward(model_chunk, mb)

        def loss_func(mb_, logits):
            logp, _ = label_logprobs(logits, mb_, vocab_size)
            return torch.zeros((), device=logp.device), {"logprobs": logp.detach()}

        return output, partial(loss_func, mb)

    with torch.no_grad():
        store = run_schedule(model, forward_step, microbatches, seq_len, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [d["logprobs"].cpu() for d in store]
