"""Assemble full (unsharded) tensors from any parallel layout, keyed like the checkpoint.

Each rank describes its parameters through megatron's sharded state dict (global shape, offset
of its slice, whether it is the primary replica); the primary slices are gathered and placed.
Used to compare weights or gradients across layouts. It moves every tensor through rank 0 with
object collectives, so it is a checking tool for small models, not the rollout weight sync.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from gspo_megatron.rollout.engines.weight_sync import local_shards


@contextlib.contextmanager
def grads_as_data(model) -> Iterator[None]:
    """Temporarily swap each parameter's data with its accumulated gradient (main_grad)."""
    saved = []
    with torch.no_grad():
        for p in model.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
            saved.append((p, p.data))
            p.data = g.view_as(p).to(p.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.data = data


def gather_full_tensors(model) -> Optional[Dict[str, torch.Tensor]]:
    """Full tensors of ``model`` (a GPTModel or a DDP wrapper) on global rank 0, else None."""
    pieces = [
        (key, shape, offset, data.detach().float().cpu().clone())
        for key, (shape, offset, data, primary) in local_shards(model).items()
        if primary
    ]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    if dist.get_rank() != 0:
        return None
    full: Dict[str, torch.Tensor] = {}
    for part in gathered:
        for key, shape, offset, data in part:
            t = full.setdefault(key, torch.zeros(shape))
            t[tuple(slice(o, o + s) for o, s in zip(offset, data.shape))] = data
    return full
