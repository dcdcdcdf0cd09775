"""The project's lean CPU modules compute what the megatron modules they stand in for compute:
the experts run from their own weights (``models/layers/experts.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP


def _build(ckpt):
    """The tiny model built for one process, and its first MoE layer's experts."""
    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.models import build_model
    from gspo_megatron.models.layers.experts import LeanSequentialMLP

    init_distributed(ParallelLayout())
    spec = checkpoint_spec(ckpt)
    model = build_model(spec, ParallelLayout())
    load_model_checkpoint(model, ckpt, spec)
    experts = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    assert experts and all(isinstance(m, LeanSequentialMLP) and m.lean for m in experts)
    return model, experts[0]


@pytest.fixture(scope="module")
def experts(tiny_moe):
    return _build(tiny_moe.ckpt)[1]


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


def _inputs(experts, counts, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(counts), experts.config.hidden_size, generator=g)
    return hidden, torch.rand(sum(counts), generator=g)


def _ddp_run(ddp, experts, counts, inputs):
    """One backward through ``experts`` inside megatron's DDP; the gradient buffers as after
    it (``main_grad``), the input gradients, and each weight's ``grad`` left behind."""
    hidden, probs = inputs
    x, pr = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
    out, _ = experts(x, torch.tensor(counts), pr)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    left = [p.grad for p in experts.parameters()]
    return [p.main_grad.clone() for p in experts.parameters()], [x.grad, pr.grad], left


def test_lean_experts_accumulate_into_ddp_gradient_buffers(tiny_moe):
    """Under megatron's DDP the weight gradients go straight into the fp32 gradient buffers
    (``main_grad``): after one micro-batch the buffers hold, bit for bit, what megatron's own
    experts put there through DDP's hook, and no weight is left holding a ``grad``; a second
    micro-batch adds to them."""
    from gspo_megatron.distributed.ddp import wrap_for_training

    model, experts = _build(tiny_moe.ckpt)  # its own: DDP's hooks stay on the parameters
    ddp = wrap_for_training(model, use_distributed_optimizer=False)
    n = experts.num_local_experts
    counts = [2 * (i + 1) for i in range(n)]
    counts[-1] = 0  # an expert that receives no token
    first, second = _inputs(experts, counts, 0), _inputs(experts, counts, 1)

    def run(lean: bool, micro_batches):
        experts.lean = lean
        try:
            ddp.zero_grad_buffer()
            return [_ddp_run(ddp, experts, counts, mb) for mb in micro_batches]
        finally:
            experts.lean = True

    ((lean_buf, lean_in, left),) = run(True, [first])
    ((ref_buf, ref_in, _),) = run(False, [first])
    assert all(g is None for g in left), "a weight kept a gradient beside its buffer"
    for i, (a, b) in enumerate(zip(lean_buf + lean_in, ref_buf + ref_in)):
        assert torch.equal(a, b), f"tensor {i} differs: max {float((a - b).abs().max())}"

    # Two micro-batches: the second is added to the buffer inside the matrix product, where
    # megatron adds it afterwards, so the sums may round differently: re-associating a sum of
    # n fp32 terms (here at most one expert's rows plus the buffer) moves it by at most
    # 2 n eps times the terms' magnitudes, ~4e-6 of the largest entry at n = 17; 1e-4 of it
    # leaves a 25x margin, and a lost or doubled micro-batch moves entries by tens of per cent.
    _, (two_buf, _, _) = run(True, [first, second])
    _, (ref_two, _, _) = run(False, [first, second])
    for i, (a, b, once) in enumerate(zip(two_buf, ref_two, ref_buf)):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= 1e-4 * scale, f"buffer {i} differs"
        assert float((b - once).abs().max()) > 0.1 * scale or not once.any()


def test_frozen_lean_experts_compute_no_weight_gradient(experts):
    """Weights that do not require a gradient (the KL reference policy) get none, and the
    input gradients are unchanged."""
    counts = [3] * experts.num_local_experts
    hidden, probs = _inputs(experts, counts, 2)
    reference = _run(experts, hidden, counts, probs)
    for p in experts.parameters():
        p.grad = None
        p.requires_grad_(False)
    try:
        x, pr = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
        out, _ = experts(x, torch.tensor(counts), pr)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        assert all(p.grad is None for p in experts.parameters())
        assert torch.equal(x.grad, reference[1]) and torch.equal(pr.grad, reference[2])
    finally:
        for p in experts.parameters():
            p.requires_grad_(True)


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
    from gspo_megatron.models.layers.experts import _plain

    config = experts.config
    assert _plain(config, tp_size=1)
    assert not _plain(config, tp_size=2)  # expert tensor parallelism: megatron's linears
    changed = copy.copy(config)
    for key, value in change.items():
        setattr(changed, key, value)
    assert not _plain(changed, tp_size=1)


class _RopeConfig:
    apply_rope_fusion = False
    rotary_interleaved = False
    multi_latent_attention = False


def _freqs(seq: int, dim: int, rotary_percent: float = 1.0):
    """megatron's own rotary frequencies [S, 1, 1, rot_dim]."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rotary = RotaryEmbedding(dim, rotary_percent, rotary_base=10000, use_cpu_initialization=True)
    return rotary(seq)


def _rope_run(apply, t0, freqs, **kwargs):
    t = t0.clone().requires_grad_()
    out = apply(t, freqs, _RopeConfig, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out, t.grad


def test_lean_rope_equals_megatrons_unfused_rope_bit_for_bit(experts):
    """Queries [S, B, heads, head_dim] through the one-node RoPE and megatron's unfused one:
    output and input gradient equal bit for bit; megatron's attention module calls ours."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    from gspo_megatron.models.layers import rope

    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb  # installed by the build
    t0 = torch.randn(11, 3, 4, 64, generator=torch.Generator().manual_seed(0))
    freqs = _freqs(11, 64)
    lean_out, lean_grad = _rope_run(rope.apply_rotary_pos_emb, t0, freqs)
    assert type(lean_out.grad_fn).__name__ == "_RopeBackward"
    ref_out, ref_grad = _rope_run(rope_utils.apply_rotary_pos_emb, t0, freqs)
    assert torch.equal(lean_out, ref_out)
    assert torch.equal(lean_grad, ref_grad)


@pytest.mark.parametrize("case", ["interleaved", "mscale", "partial", "packed"])
def test_rope_cases_the_lean_path_does_not_compute_go_to_megatron(experts, case):
    """(``experts``: megatron's parallel state, which its packed RoPE reads, initialised.)"""
    from megatron.core.models.common.embeddings import rope_utils

    from gspo_megatron.models.layers import rope

    class Config(_RopeConfig):
        rotary_interleaved = case == "interleaved"

    t0 = torch.randn(8, 1, 2, 64, generator=torch.Generator().manual_seed(0))
    freqs = _freqs(8, 64, rotary_percent=0.5 if case == "partial" else 1.0)
    kwargs = dict(mscale=1.5 if case == "mscale" else 1.0)
    if case == "packed":
        t0, kwargs["cu_seqlens"] = t0[:, 0], torch.tensor([0, 3, 8], dtype=torch.int32)
    assert not rope._lean(t0, freqs, Config, kwargs.get("cu_seqlens"), kwargs["mscale"])
    ours = rope.apply_rotary_pos_emb(t0, freqs, Config, **kwargs)
    assert torch.equal(ours, rope_utils.apply_rotary_pos_emb(t0, freqs, Config, **kwargs))
