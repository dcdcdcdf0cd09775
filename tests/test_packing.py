"""Packing sequences into padding-free micro-batches (``gspo_megatron.learner.packing``): the bins, the
packed row's layout and mask, and unpacking back to one row per sequence, against the padded
micro-batch built for each sequence alone. (Values and gradients through the model, in every
layout: tests/test_distributed_loss.py.)"""

from __future__ import annotations

import random

import pytest
import torch

from gspo_megatron.errors import GspoError
from gspo_megatron.learner.batch import Sample, build_microbatch
from gspo_megatron.learner.packing import (
    build_packed_microbatch,
    pack_bins,
    packed_attention_mask,
    unpacked,
)


def test_bins_hold_every_sequence_once_within_the_budget():
    rng = random.Random(0)
    lengths = [int(8 * 64 ** rng.random()) for _ in range(200)]  # log-uniform 8..512
    bins = pack_bins(lengths, 600)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 600 for b in bins)
    # First-fit decreasing wastes little: within 5% of the lower bound on the bin count.
    assert len(bins) <= 1.05 * sum(lengths) / 600 + 1
    assert bins == pack_bins(lengths, 600)  # deterministic


def test_a_sequence_longer_than_the_budget_is_refused():
    with pytest.raises(GspoError, match="loss.max_tokens_per_microbatch=16"):
        pack_bins([10, 17], 16)


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for p, r in ((3, 5), (2, 1), (4, 6)):
        ids = torch.randint(1, 50, (p + r,), generator=g).tolist()
        out.append(
            Sample(ids[:p], ids[p:], float(p - r), [float(-i) for i in range(r)], routes=None)
        )
    return out


def test_packed_row_unpacks_to_each_sequence_alone():
    samples = _samples()
    mb = build_packed_microbatch(samples, 24)
    assert (
        mb.tokens.shape == (1, 24)
        and mb.segments[0].tolist() == [0] * 8 + [1] * 3 + [2] * 10 + [-1] * 3
    )
    assert mb.position_ids[0, :11].tolist() == list(range(8)) + list(range(3))
    logp = torch.arange(24, dtype=torch.float32)[None]
    view, logp_seq = unpacked(mb, logp)
    assert torch.equal(view.advantages, torch.tensor([-2.0, 1.0, -2.0]))
    for k, s in enumerate(samples):
        alone = build_microbatch([s], len(s.prompt_ids) + len(s.response_ids))
        n = alone.tokens.shape[1]
        assert torch.equal(view.loss_mask[k, :n], alone.loss_mask[0])
        assert not view.loss_mask[k, n:].any()
        assert torch.equal(view.old_logprobs[k, :n], alone.old_logprobs[0])
        start = sum(len(t.prompt_ids) + len(t.response_ids) for t in samples[:k])
        assert torch.equal(logp_seq[k, :n], logp[0, start : start + n])
        # Labels never cross into the next sequence where the loss looks.
        row = mb.labels[0, start : start + n]
        assert torch.equal(row[alone.loss_mask[0]], alone.labels[0][alone.loss_mask[0]])


def test_attention_stays_within_each_sequence():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = packed_attention_mask(seg)[0, 0]
    for q in range(6):
        for k in range(6):
            allowed = k <= q and seg[0, q] == seg[0, k]
            assert bool(mask[q, k]) == (not allowed), (q, k)


def test_an_empty_filler_has_one_empty_sequence():
    mb = build_packed_microbatch([], 8)
    view, _ = unpacked(mb, torch.zeros(1, 8))
    assert view.advantages.shape == (1,) and not view.loss_mask.any()
