"""RMSNorm that computes exactly what HF's Qwen3 and GLM-4.5 RMSNorms compute, with sequence
parallelism.

megatron-core's local fallback (WrappedTorchNorm) refuses ``sequence_parallel=True``, which
megatron requires for MoE with tensor parallelism. This norm is elementwise over the hidden
dimension, so it needs nothing from sequence parallelism except that its weight gradient, which
each rank computes from its own slice of the sequence, is all-reduced over the TP group: megatron
does that for every parameter carrying ``sequence_parallel = True``.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 as in HF, output in x's dtype."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron's finalize_model_grads sums grads of params marked `sequence_parallel` over
        # TP (each rank saw part of the sequence). q/k norms are summed there by name instead.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)
