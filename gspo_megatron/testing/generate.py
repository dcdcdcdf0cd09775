"""Greedy decoding with the trainer's own Megatron model: the reference a rollout engine's
greedy continuation must equal after a weight sync.

It re-runs the full prefix for every new token (no KV cache): a checking tool for small models,
not a sampler. Works under TP, PP, EP and DP (every data-parallel rank decodes all prompts);
context parallelism is not supported here (decoding is not a CP workload).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.errors import GspoError
from gspo_megatron.learner.batch import Sample, build_microbatch, pad_to_multiple, sequence_multiple
from gspo_megatron.learner.forward import device, model_forward, run_schedule
from gspo_megatron.learner.logprobs import tp_group, vocab_parallel_argmax


def _next_tokens(model, sequences: List[List[int]], vocab_size: int) -> List[int]:
    multiple = sequence_multiple(ps.get_tensor_model_parallel_world_size(), 1)
    seq_len = pad_to_multiple(max(len(s) for s in sequences), multiple)
    mbs = [build_microbatch([Sample(s, [])], seq_len) for s in sequences]

    # The loss function needs each row's length; the schedule consumes micro-batches in order.
    lengths = iter([len(s) for s in sequences])

    def step(data_iterator, model_chunk):
        mb = next(data_iterator)
        length = next(lengths)

        def loss_func(logits):
            ids = vocab_parallel_argmax(logits[:, length - 1], vocab_size, tp_group())
            return torch.zeros((), device=logits.device), {"next": ids.detach()}

        return model_forward(model_chunk, mb), loss_func

    with torch.no_grad():
        store = run_schedule(model, step, mbs, seq_len, forward_only=True)
    out = torch.full((len(sequences),), -1, dtype=torch.long)
    if ps.is_pipeline_last_stage():
        out = torch.cat([d["next"].reshape(-1).cpu() for d in store])
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dev_out = out.to(device())
        dist.broadcast(
            dev_out,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        out = dev_out.cpu()
    return out.tolist()


def greedy_continuation(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    vocab_size: int,
    eos_token_id: Optional[int] = None,
) -> List[List[int]]:
    """Per prompt, the greedy continuation (stopping after EOS). Collective over the world."""
    if ps.get_context_parallel_world_size() > 1:
        raise GspoError("greedy_continuation: context parallelism is not supported (use cp=1)")
    unwrapped = unwrap(model)
    was_training = unwrapped.training
    unwrapped.eval()
    seqs = [list(p) for p in prompts]
    outs: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        active = [i for i in range(len(seqs)) if not done[i]]
        if not active:
            break
        nxt = _next_tokens(model, [seqs[i] for i in active], vocab_size)
        for i, t in zip(active, nxt):
            seqs[i].append(t)
            outs[i].append(t)
            done[i] = eos_token_id is not None and t == eos_token_id
    if was_training:
        unwrapped.train()
    return outs
