"""Model FLOPs of a forward pass, and GPU peaks to put them against (MFU).

Counted by each model family (``models/layers/sizes.py`` has the terms): the matrix multiplies,
2 FLOPs per multiply-add, as PyTorch's FlopCounterMode counts them in HF transformers' eager
implementation (tests/test_flops.py holds the two to equality): per token and layer the q/k/v/o
projections, the dense MLP or the router plus ``top_k`` experts' SwiGLU (three matrices each,
plus GLM's shared expert); per sequence of n tokens and layer 4 n^2 (heads x head_dim) for the
attention scores and their weighted sum, the full square as a plain attention computes it (a
causal kernel skips half: MFU figures from this count are comparable with those that count the
same way, the convention of megatron's own throughput formula); the LM head.
Norms, rotary embeddings, softmax and activations are not counted (a few per cent at most).
A training step is 3x the forward (backward: the gradients of inputs and of weights).
"""

from __future__ import annotations

from typing import Optional, Sequence

from gspo_megatron.models import ModelSpec

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name() in order: the first name contained in it wins.
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM, "NVIDIA H100 80GB HBM3"
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def forward_flops(spec: ModelSpec, lengths: Sequence[int]) -> int:
    """Matrix-multiply FLOPs of one forward pass over sequences of these lengths (the family's
    count per token, and of its attention per sequence)."""
    per_token = spec.matmul_flops_per_token()
    return sum(lengths) * per_token + sum(spec.attention_flops(n) for n in lengths)


def train_flops(spec: ModelSpec, lengths: Sequence[int]) -> int:
    """Forward and backward: three forwards' worth."""
    return 3 * forward_flops(spec, lengths)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak, or None for a card not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None
