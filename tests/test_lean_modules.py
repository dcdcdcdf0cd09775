"""The project's lean CPU modules compute what the megatron modules they stand in for compute:
the experts run from their own weights (``models/qwen3/experts.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP


@pytest.fixture(scope="module")
def experts(tiny_moe):
    """The first MoE layer's experts of the tiny model, built for one process."""
    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.models.qwen3.experts import LeanSequentialMLP
    from gspo_megatron.models.qwen3.model import build_model
    from gspo_megatron.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    spec = checkpoint_spec(tiny_moe.ckpt)
    model = build_model(spec, ParallelLayout())
    load_model_checkpoint(model, tiny_moe.ckpt, spec)
    experts = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    assert experts and all(isinstance(m, LeanSequentialMLP) and m.lean for m in experts)
    return experts[0]


def _run(experts, hidden, counts, probs):
    """Output, input gradient, routing-weight gradient and every weight gradient."""
    for p in experts.parameters():
        p.grad = None
    x = hidden.clone().requires_grad_()
    pr = probs.clone().requires_grad_()
    out, bias = experts(x, torch.tensor(counts), pr)
    assert bias is None
    # A fixed random cotangent, so that every output element's gradient path is exercised.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = [p.grad.clone() for p in experts.parameters()]
    return [out.detach(), x.grad, pr.grad] + grads


def test_lean_experts_equal_megatrons_forward_and_backward_bit_for_bit(experts):
    """The same matrix products in the same order as megatron's MLP (fc1, silu(gate) * up,
    times the routing weight, fc2; the weight gradient as grad^T @ input): equal bit for bit,
    including an expert that receives no token."""
    n = experts.num_local_experts
    counts = [3 * (i + 1) for i in range(n)]
    counts[1] = 0
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(sum(counts), experts.config.hidden_size, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    lean = _run(experts, hidden, counts, probs)
    experts.lean = False  # megatron's own SequentialMLP.forward
    try:
        reference = _run(experts, hidden, counts, probs)
    finally:
        experts.lean = True
    for i, (a, b) in enumerate(zip(lean, reference)):
        assert torch.equal(a, b), f"tensor {i} differs: max {float((a - b).abs().max())}"


@pytest.mark.parametrize(
    "change",
    [
        dict(add_bias_linear=True),
        dict(activation_func_clamp_value=7.0),
        dict(glu_linear_offset=1.0),
        dict(moe_apply_probs_on_input=True),
        dict(gated_linear_unit=False),
        dict(activation_func=torch.nn.functional.gelu),
        dict(bias_activation_fusion=True),
        dict(fp8="e4m3"),
    ],
    ids=lambda c: next(iter(c)),
)
def test_anything_the_lean_path_does_not_compute_goes_to_megatron(experts, change):
    from gspo_megatron.models.qwen3.experts import _plain

    config = experts.config
    assert _plain(config, tp_size=1)
    assert not _plain(config, tp_size=2)  # expert tensor parallelism: megatron's linears
    changed = copy.copy(config)
    for key, value in change.items():
        setattr(changed, key, value)
    assert not _plain(changed, tp_size=1)
