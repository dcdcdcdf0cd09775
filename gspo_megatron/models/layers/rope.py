"""Rotary position embedding as one autograd function, where megatron would run its unfused one.

Without Transformer Engine's fused kernel (``apply_rope_fusion``), megatron's attention applies
RoPE to the queries and to the keys of every layer with its unfused ``_apply_rotary_pos_emb_bshd``:
cos and sin of the frequencies, a split, a negation and two concatenations (the rotated half and
an empty pass-through part), two products and a sum: a dozen ops forward and as many autograd
nodes backward, for a few kilobytes of work each at small shapes. On CPU that per-op cost is most
of what RoPE costs (4% of the demo's step in the forward alone, measured with py-spy).

:func:`install` puts :func:`apply_rotary_pos_emb` in its place in megatron's attention module.
Where it can (half-split rotation over the whole head dimension, no ``mscale``, no packed
``cu_seqlens``, frequencies that need no gradient) it computes ``t * cos + rotate_half(t) * sin``
with the same operations on the same operands, in one node whose backward is written out:
``g * cos`` plus the rotated-back ``g * sin``, the sum autograd would form, so forward and
backward are equal bit for bit (tests/test_lean_modules.py). Anything else goes to megatron's own.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_megatron_apply = rope_utils.apply_rotary_pos_emb


class _Rope(torch.autograd.Function):
    """``t * cos + cat(-t2, t1) * sin`` over the last dimension (``t1, t2`` its halves)."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        half = t.shape[-1] // 2
        rotated = torch.empty_like(t)
        torch.neg(t[..., half:], out=rotated[..., :half])
        rotated[..., half:] = t[..., :half]
        out = t * cos
        out += rotated * sin
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_t = grad * cos
        via_sin = grad * sin  # the gradient of cat(-t2, t1), rotated back onto t
        grad_t[..., :half] += via_sin[..., half:]
        grad_t[..., half:] -= via_sin[..., :half]
        return grad_t, None, None


def _lean(t, freqs, config, cu_seqlens, mscale) -> bool:
    return (
        not config.apply_rope_fusion
        and cu_seqlens is None
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and mscale == 1.0
        and freqs.shape[-1] == t.shape[-1]
        and t.shape[-1] % 2 == 0
        and not freqs.requires_grad
    )


def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
    """megatron's ``apply_rotary_pos_emb``, computed by :class:`_Rope` where it can be."""
    if not _lean(t, freqs, config, cu_seqlens, mscale):
        return _megatron_apply(t, freqs, config, cu_seqlens, mscale=mscale, cp_group=cp_group)
    return _Rope.apply(t, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))


def install() -> None:
    """Use :func:`apply_rotary_pos_emb` in megatron's attention (idempotent)."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
