"""Sequences -> micro-batches aligned for next-token log-probs, split for context parallelism.

Position t of a micro-batch holds input ``tokens[t]`` and the token it predicts,
``labels[t] = tokens[t+1]``. Everything the loss needs (``loss_mask``, ``old_logprobs``,
``ref_logprobs``) is indexed like ``labels``, so splitting the sequence dimension over context
parallel ranks keeps each label next to the logits that predict it: the shift happens before the
split. The CP split is megatron's load-balanced "zigzag": the sequence is cut into 2*CP chunks and
rank r keeps chunks r and 2*CP-1-r, so every rank gets the same share of causal-attention work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence

import torch

from gspo_megatron.distributed.context_parallel import zigzag_indices


@dataclass
class Sample:
    """One sampled response and what the loss needs about it."""

    prompt_ids: List[int]
    response_ids: List[int]
    advantage: float = 0.0
    old_logprobs: Optional[List[float]] = None
    """Per response token, from the rollout engine (optional; else the trainer computes them)."""
    ref_logprobs: Optional[List[float]] = None
    routes: Optional[Any] = None
    """The engine's expert ids for every token it fed through the model (the prompt, then the
    response but its last token): [len(prompt) + len(response) - 1, MoE layers, top-k]."""
    response_mask: Optional[List[int]] = None
    """Per response token, 1 where the model sampled it and 0 where the environment wrote it
    (multi-turn episodes: tool results, user turns, template separators). Only tokens with 1
    are trained on and counted in |y_i|; None = every response token is the model's."""


@dataclass
class MicroBatch:
    """[b, S] tensors (S = this CP rank's share of the padded length) and [b] advantages."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    engine_routes: Optional[torch.Tensor] = None
    """[b, S, MoE layers, top-k] the engine's expert ids per position, -1 where it routed none
    (padding, each response's last token)."""
    route_rows: Optional[torch.Tensor] = None
    """[b, S] positions holding a response token the engine routed (route agreement counts these)."""
    segments: Optional[torch.Tensor] = None
    """Packed micro-batches (``gspo_megatron.learner.packing``): [1, S] which sequence each position
    belongs to, -1 for padding; ``advantages`` then holds one value per sequence."""
    attention_segments: Optional[torch.Tensor] = None
    """``segments`` of the whole row, before the CP split (the attention mask needs them all)."""
    rollout_logprobs: Optional[torch.Tensor] = None
    """The engine's sampling log-probs (what ``old_logprobs`` starts as; the trainer's pi_old
    forward replaces ``old_logprobs`` and these stay, for the rollout correction)."""
    routes: Optional[dict] = None
    """Routing replay: local MoE layer index -> [router rows, top-k] expert indices
    (``gspo_megatron.learner.routing_replay``)."""


def pad_to_multiple(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_multiple(tp: int, cp: int) -> int:
    """Padded lengths must split into TP (sequence parallel) x 2*CP (zigzag) equal parts."""
    return tp * (2 * cp if cp > 1 else 1)


def build_microbatch(samples: Sequence[Optional[Sample]], seq_len: int) -> MicroBatch:
    """Pack samples (None = an empty filler row) into one un-split micro-batch of length seq_len."""
    # Rows are laid out as Python lists and each field made in one tensor call: filling the
    # tensors row by row cost ~40 us a sample in small tensor ops (5 ms a step of 128 samples).
    b = len(samples)
    have_old = any(s is not None and s.old_logprobs is not None for s in samples)
    have_ref = any(s is not None and s.ref_logprobs is not None for s in samples)
    tokens, labels, mask, old, ref, owns = [], [], [], [], [], []
    zeros_i, zeros_f = [0] * seq_len, [0.0] * seq_len
    for s in samples:
        if s is None:  # a filler row: nothing to predict, nothing to train on
            for field in (tokens, labels, mask):
                field.append(zeros_i)
            for field, have in ((old, have_old), (ref, have_ref)):
                if have:
                    field.append(zeros_f)
            owns.append(None)
            continue
        ids = list(s.prompt_ids) + list(s.response_ids)
        n, p, r = len(ids), len(s.prompt_ids), len(s.response_ids)
        if n > seq_len:
            raise ValueError(f"sample of {n} tokens does not fit seq_len={seq_len}")
        if not p:
            raise ValueError("sample has no prompt token: its first response token is unpredicted")
        tokens.append(ids + [0] * (seq_len - n))
        labels.append(ids[1:] + [0] * (seq_len - n + 1))
        owns.append(_model_mask(s))
        mask.append(_at_predictions(owns[-1], p, seq_len, 0))
        for field, values, have, name in (
            (old, s.old_logprobs, have_old, "old_logprobs"),
            (ref, s.ref_logprobs, have_ref, "ref_logprobs"),
        ):
            if have and values is None:
                field.append(zeros_f)
            elif have:
                if len(values) != r:
                    raise ValueError(f"{name} has {len(values)} entries for {r} tokens")
                field.append(_at_predictions(values, p, seq_len, 0.0))
    adv = torch.tensor([0.0 if s is None else s.advantage for s in samples], dtype=torch.float32)
    old_t = torch.tensor(old, dtype=torch.float32) if have_old else None
    ref_t = torch.tensor(ref, dtype=torch.float32) if have_ref else None
    routes, rows = _routes(samples, owns, seq_len)
    pos = torch.arange(seq_len).unsqueeze(0).expand(b, seq_len).contiguous()
    return MicroBatch(
        torch.tensor(tokens, dtype=torch.long).reshape(b, seq_len),
        torch.tensor(labels, dtype=torch.long).reshape(b, seq_len),
        torch.tensor(mask, dtype=torch.bool).reshape(b, seq_len),
        pos,
        adv,
        old_t,
        ref_t,
        routes,
        rows,
        rollout_logprobs=old_t,
    )


def _at_predictions(values, prompt_len: int, seq_len: int, fill) -> list:
    """A row of ``seq_len`` holding one value per response token at the position that predicts
    it (response token j sits at prompt_len + j and is predicted at prompt_len + j - 1)."""
    return (
        [fill] * (prompt_len - 1) + list(values) + [fill] * (seq_len - prompt_len + 1 - len(values))
    )


def _routes(samples: Sequence[Optional[Sample]], owns: Sequence[Optional[List[int]]], seq_len: int):
    """[b, S, layers, k] expert ids the engine used (-1 where none) and [b, S] which positions
    fed a model-sampled token (``owns``: each sample's ``_model_mask``), or (None, None) when no
    sample carries routes."""
    with_routes = [s for s in samples if s is not None and s.routes is not None]
    if not with_routes:
        return None, None
    shape = tuple(with_routes[0].routes.shape[1:])
    routes = torch.full((len(samples), seq_len) + shape, -1, dtype=torch.long)
    rows = torch.zeros(len(samples), seq_len, dtype=torch.bool)
    for i, (s, own) in enumerate(zip(samples, owns)):
        if s is None or s.routes is None:
            continue
        n, p, r = len(s.prompt_ids) + len(s.response_ids), len(s.prompt_ids), len(s.response_ids)
        fed = torch.as_tensor(s.routes, dtype=torch.long)
        if fed.shape != (n - 1,) + shape:
            raise ValueError(
                f"sample routes {tuple(fed.shape)} do not cover its {n - 1} fed tokens"
            )
        routes[i, : n - 1] = fed
        # A token the engine fed while sampling: the model's own (response token j at p + j).
        rows[i, p : n - 1] = torch.as_tensor(own[: r - 1], dtype=torch.bool)
    return routes, rows


def _model_mask(s: Sample) -> List[int]:
    """Per response token, 1 where the model sampled it."""
    r = len(s.response_ids)
    if s.response_mask is None:
        return [1] * r
    if len(s.response_mask) != r:
        raise ValueError(f"response_mask has {len(s.response_mask)} entries for {r} tokens")
    return [int(bool(x)) for x in s.response_mask]


def cp_shard(mb: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This CP rank's positions of every [b, S] field."""
    if cp_size == 1:
        return mb
    idx = zigzag_indices(mb.tokens.shape[1], cp_size, cp_rank)

    def take(t):
        return None if t is None else t[:, idx].contiguous()

    return replace(
        mb,
        tokens=take(mb.tokens),
        labels=take(mb.labels),
        loss_mask=take(mb.loss_mask),
        position_ids=take(mb.position_ids),
        old_logprobs=take(mb.old_logprobs),
        ref_logprobs=take(mb.ref_logprobs),
        engine_routes=take(mb.engine_routes),
        route_rows=take(mb.route_rows),
        rollout_logprobs=take(mb.rollout_logprobs),
        segments=take(mb.segments),  # attention_segments stay whole: the mask needs them all
    )
