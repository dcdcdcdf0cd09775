"""Padding-free micro-batches: sequences packed end to end by a token budget.

With ``loss.max_tokens_per_microbatch`` > 0 a micro-batch is one row holding several whole
sequences one after the other, instead of ``micro_batch_size`` rows each padded to the longest
sequence of the batch (bins from ``pack_bins``: as many as first-fit decreasing needs, loads
balanced). Every position-indexed
field of the ``MicroBatch`` (tokens, labels, masks, log-probs, engine routes) keeps its meaning
per position, so the pi_old pass, the KL reference, routing replay and the route meters work on
packed rows unchanged. What changes:

- ``segments`` [1, S]: which sequence of the micro-batch each position belongs to (-1: padding).
  Attention is confined to each sequence by a block-diagonal causal mask
  (``packed_attention_mask``); without context parallelism the attention runs on each
  sequence's block alone (``models/layers/packed_attention.py``), sum_i n_i^2 work, not S^2.
  Rotary embeddings see the positions of the packed row; RoPE scores depend only on the distance between two positions of the same sequence, so the values
  equal the unpacked ones (up to fp32 rounding of the angles).
- ``advantages`` [n_seq]: one per sequence, not per row. The loss unpacks the row into
  [n_seq, L] (``unpack``) before ``policy_loss``, which then sees one row per sequence as
  always: the sequence normalisation, context-parallel sums and token counts stay exact.

All ranks run micro-batches of one length (pipeline p2p and MoE dispatch need equal shapes):
the fullest bin of any rank, rounded up for TP x CP; and every data-parallel rank runs the same
number of micro-batches per minibatch, with empty ones where it has fewer bins.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gspo_megatron.errors import GspoError
from gspo_megatron.learner.batch import MicroBatch, Sample, build_microbatch, pad_to_multiple


def length_of(sample: Sample) -> int:
    return len(sample.prompt_ids) + len(sample.response_ids)


def pack_bins(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Indices into ``lengths`` per bin, every bin's total <= ``budget``, as few bins as
    first-fit decreasing needs and their loads balanced (the longest sequence first into the
    emptiest bin): all rows are padded to the fullest, so an even spread is what removes the
    padding. Deterministic (ties broken by index)."""
    for n in lengths:
        if n > budget:
            raise GspoError(
                f"a sample of {n} tokens (prompt + response) does not fit "
                f"loss.max_tokens_per_microbatch={budget}; raise it to at least "
                f"rollout.max_prompt_tokens + rollout.max_new_tokens"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit = _first_fit(order, lengths, budget)
    for count in (len(first_fit), len(first_fit) + 1):
        bins: List[List[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in order:
            k = min(range(count), key=lambda j: (loads[j], j))
            bins[k].append(i)
            loads[k] += lengths[i]
        if max(loads, default=0) <= budget:
            return [b for b in bins if b]
    return first_fit


def _first_fit(order: Sequence[int], lengths: Sequence[int], budget: int) -> List[List[int]]:
    bins: List[List[int]] = []
    loads: List[int] = []
    for i in order:
        for k, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[k].append(i)
                loads[k] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def build_packed_microbatch(samples: Sequence[Sample], seq_len: int) -> MicroBatch:
    """``samples`` end to end in one row of ``seq_len`` positions (un-split; ``batch.cp_shard``
    splits it like any row). No samples: an empty filler micro-batch of one empty sequence."""
    parts = [build_microbatch([s], length_of(s)) for s in samples]
    used = sum(length_of(s) for s in samples)
    if used > seq_len:
        raise ValueError(f"{used} packed tokens do not fit seq_len={seq_len}")
    pad = seq_len - used

    def cat(field: str, fill) -> Optional[torch.Tensor]:
        values = [getattr(p, field) for p in parts]
        if not values or all(v is None for v in values):
            return None
        shape = next(v for v in values if v is not None).shape[2:]
        dtype = next(v for v in values if v is not None).dtype
        rows = [
            v if v is not None else torch.full((1, p.tokens.shape[1]) + shape, fill, dtype=dtype)
            for v, p in zip(values, parts)
        ]
        rows.append(torch.full((1, pad) + tuple(shape), fill, dtype=dtype))
        return torch.cat(rows, dim=1)

    tokens = cat("tokens", 0)
    if tokens is None:  # a filler: nothing but padding
        zeros = torch.zeros(1, seq_len, dtype=torch.long)
        return MicroBatch(
            zeros,
            zeros.clone(),
            torch.zeros(1, seq_len, dtype=torch.bool),
            torch.arange(seq_len)[None],
            torch.zeros(1),
            segments=torch.full((1, seq_len), -1, dtype=torch.long),
            attention_segments=torch.full((1, seq_len), -1, dtype=torch.long),
        )
    segments = torch.cat(
        [torch.full((1, length_of(s)), k, dtype=torch.long) for k, s in enumerate(samples)]
        + [torch.full((1, pad), -1, dtype=torch.long)],
        dim=1,
    )
    positions = torch.cat([torch.arange(length_of(s)) for s in samples] + [torch.arange(pad)])[None]
    return MicroBatch(
        tokens,
        cat("labels", 0),
        cat("loss_mask", False),
        positions,
        torch.cat([p.advantages for p in parts]),
        old_logprobs=cat("old_logprobs", 0.0),
        ref_logprobs=cat("ref_logprobs", 0.0),
        engine_routes=cat("engine_routes", -1),
        route_rows=cat("route_rows", False),
        rollout_logprobs=cat("rollout_logprobs", 0.0),
        segments=segments,
        attention_segments=segments,
    )


def packed_minibatches(
    minibatches: Sequence[Sequence[Sample]], budget: int, multiple: int
) -> Tuple[List[List[MicroBatch]], int]:
    """This rank's samples of each minibatch -> packed, un-split micro-batches, and the row
    length every rank uses. Collective over all ranks (one all-reduce)."""
    packed, seq_len, _ = packed_with_bins(minibatches, budget, multiple)
    return packed, seq_len


def packed_with_bins(
    minibatches: Sequence[Sequence[Sample]], budget: int, multiple: int
) -> Tuple[List[List[MicroBatch]], int, List[List[List[int]]]]:
    """``packed_minibatches``, and per minibatch its bins: the indices of the samples in each
    packed micro-batch, in the order they lie in its row (the fillers after them have none)."""
    bins = [pack_bins([length_of(s) for s in mb], budget) for mb in minibatches]
    fullest = max(
        (sum(length_of(mb[i]) for i in b) for mb, bs in zip(minibatches, bins) for b in bs),
        default=1,
    )
    sizes = torch.tensor([len(b) for b in bins] + [fullest], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    seq_len = pad_to_multiple(int(sizes[-1]), multiple)
    out = []
    for mb, bs, n in zip(minibatches, bins, sizes[:-1].tolist()):
        packed = [build_packed_microbatch([mb[i] for i in b], seq_len) for b in bs]
        packed += [build_packed_microbatch([], seq_len) for _ in range(max(n, 1) - len(bs))]
        out.append(packed)
    return out, seq_len, bins


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, S] segment ids -> [b, 1, S, S] attention mask, True = masked: causal, and no
    position attends across sequences (padding attends only to padding)."""
    s = segments.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=segments.device), 1)
    other = segments[:, :, None] != segments[:, None, :]
    return (causal[None] | other)[:, None]


def unpack_index(segments: torch.Tensor, num_sequences: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[1, S] segment ids (this CP rank's positions) -> (index [n, L] into the row, valid [n, L]):
    row k lists, in order, the positions of sequence k held here."""
    seg = segments[0]
    rows = [torch.nonzero(seg == k).flatten() for k in range(num_sequences)]
    width = max([len(r) for r in rows] + [1])
    index = torch.zeros(num_sequences, width, dtype=torch.long, device=seg.device)
    valid = torch.zeros(num_sequences, width, dtype=torch.bool, device=seg.device)
    for k, r in enumerate(rows):
        index[k, : len(r)] = r
        valid[k, : len(r)] = True
    return index, valid


def unpack(x: Optional[torch.Tensor], index: torch.Tensor, valid: torch.Tensor):
    """[1, S] per-position values -> [n, L] per sequence (0 / False where ``valid`` is not)."""
    if x is None:
        return None
    rows = x[0][index.to(x.device)]
    return torch.where(valid.to(x.device), rows, torch.zeros_like(rows))


def unpacked(mb: MicroBatch, logp: torch.Tensor) -> Tuple[MicroBatch, torch.Tensor]:
    """The loss's view of a packed micro-batch: every per-position field and ``logp`` (which
    carries the gradient) as [n_seq, L]. Unpacked micro-batches come back as they are."""
    if mb.segments is None:
        return mb, logp
    index, valid = unpack_index(mb.segments, mb.advantages.numel())
    view = replace(
        mb,
        loss_mask=unpack(mb.loss_mask, index, valid),
        old_logprobs=unpack(mb.old_logprobs, index, valid),
        ref_logprobs=unpack(mb.ref_logprobs, index, valid),
        rollout_logprobs=unpack(mb.rollout_logprobs, index, valid),
    )
    return view, unpack(logp, index, valid)
