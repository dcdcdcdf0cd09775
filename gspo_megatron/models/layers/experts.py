"""The experts of megatron's local MoE spec, run on their own weights without the parallel
linear layers around them when nothing is split.

megatron's ``SequentialMLP`` runs each expert as an ``MLP``: a ``ColumnParallelLinear``, the
gated activation, the routing weight, a ``RowParallelLinear``. With the expert tensor-parallel
size 1 those linear layers communicate nothing, but each still runs megatron's own autograd
function (reshapes, a saved-tensor wrapper, its own weight-gradient matmul) and module calls; on
CPU, at a few hundred tokens per expert, that costs 10-20% per expert over ``F.linear`` on the
same weights. This subclass keeps megatron's modules and parameters (names, tensor-parallel
attributes, checkpoints, the HF mapping: all unchanged) and computes, when it can, the same
function directly from the experts' weights: ``fc2(silu(gate) * up * prob)``, in megatron's order.
Anything it does not cover (expert tensor parallelism, biases, fp8/fp4, a clamp or offset on the
gated unit, probabilities applied on the input) goes to megatron's own forward.

All experts run as one autograd function (:class:`_Experts`): each expert's two matrix products
write into slices of one buffer, the gated activation and the routing weight run once over every
row, and the backward is written out the same way, so a layer costs one autograd node instead of
a dozen per expert, and no per-expert split, chunk or concatenation. Where megatron's DDP has
given a weight its fp32 gradient buffer (``main_grad``, same dtype as the weight), the weight
gradient is accumulated straight into it (``addmm_``, what megatron's CUDA-only
``gradient_accumulation_fusion`` does), instead of a fresh gradient tensor that DDP's hook then
adds to the buffer: one pass over every expert weight's gradient less per backward. Measured on
2 cores at hidden 768, 16 experts, 3712 routed rows: forward + backward of one layer 186 -> 158
ms. Every product, activation and gradient is the same operation on the same operands as the
per-expert autograd graph, so the results are equal bit for bit (tests/test_lean_modules.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def _plain(config, tp_size: int) -> bool:
    """Whether ``config`` asks for nothing but what :meth:`LeanSequentialMLP.forward` computes."""
    return (
        tp_size == 1
        and config.gated_linear_unit
        and config.activation_func is F.silu
        and not config.add_bias_linear
        and not config.bias_activation_fusion
        and not config.use_te_activation_func
        and not config.moe_apply_probs_on_input
        and getattr(config, "activation_func_clamp_value", None) is None
        and getattr(config, "glu_linear_offset", 0.0) == 0.0
        and not config.fp8
        and not config.fp4
    )


class LeanSequentialMLP(SequentialMLP):
    """``SequentialMLP`` computing all its experts from their weights in one autograd function
    when their linears are unsplit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.lean = _plain(self.config, tp_size)

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        if not self.lean:
            return super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
        counts = tokens_per_expert.tolist()
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        if permuted_probs.dtype == permuted_hidden.dtype == fc1[0].dtype:
            return _Experts.apply(permuted_hidden, permuted_probs, counts, *fc1, *fc2), None
        # Mixed dtypes (bf16 weights, fp32 routing weights): megatron's promotion, per expert.
        outputs = []
        for w1, w2, tokens, probs in zip(
            fc1, fc2, torch.split(permuted_hidden, counts), torch.split(permuted_probs, counts)
        ):
            gate, up = torch.chunk(F.linear(tokens, w1), 2, dim=-1)
            hidden = F.silu(gate) * up
            hidden = (hidden * probs.unsqueeze(-1)).to(hidden.dtype)
            outputs.append(F.linear(hidden, w2))
        return torch.cat(outputs, dim=0), None


def _rows(counts):
    """Each expert's (start, end) rows in the permuted tokens."""
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def _weight_grad(weight, needed: bool, grad_out, inputs):
    """The gradient of ``F.linear(inputs, weight)`` as autograd returns it, or, where megatron's
    DDP keeps the weight's gradient in ``main_grad`` of the same dtype, added into that buffer
    and an uninitialised placeholder returned (as megatron's fused linear layers do: DDP's hook
    sees ``grad_added_to_main_grad`` and drops it; a placeholder of the weight's own layout is
    stored by autograd without a copy)."""
    if not needed:
        return None
    main = getattr(weight, "main_grad", None)
    if (
        main is None
        or main.dtype != grad_out.dtype
        or not hasattr(weight, "grad_added_to_main_grad")
    ):
        return grad_out.t().mm(inputs)
    main.addmm_(grad_out.t(), inputs)
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


class _Experts(torch.autograd.Function):
    """``out[rows of e] = fc2_e(silu(gate) * up * prob)``, ``gate, up = fc1_e(x)``, for every
    local expert ``e`` at once. ``hidden`` [N, H] and ``probs`` [N] are the permuted tokens and
    routing weights, ``counts`` the rows per expert, then the experts' fc1 [2F, H] and fc2 [H, F]
    weights. All tensors of one dtype."""

    @staticmethod
    def forward(ctx, hidden, probs, counts, *weights):
        n = len(weights) // 2
        fc1, fc2 = weights[:n], weights[n:]
        bounds = _rows(counts)
        pre = hidden.new_empty(hidden.shape[0], fc1[0].shape[0])  # [N, 2F]: gate | up
        for (s, e), w1 in zip(bounds, fc1):
            torch.mm(hidden[s:e], w1.t(), out=pre[s:e])
        ffn = pre.shape[1] // 2
        gate, up = pre[:, :ffn], pre[:, ffn:]
        silu = F.silu(gate)
        act = silu * up
        scaled = act * probs.unsqueeze(-1)
        out = hidden.new_empty(hidden.shape[0], fc2[0].shape[0])
        for (s, e), w2 in zip(bounds, fc2):
            torch.mm(scaled[s:e], w2.t(), out=out[s:e])
        ctx.bounds = bounds
        ctx.save_for_backward(hidden, probs, pre, silu, act, scaled, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, probs, pre, silu, act, scaled, *weights = ctx.saved_tensors
        n = len(weights) // 2
        fc1, fc2 = weights[:n], weights[n:]
        needs = ctx.needs_input_grad[3:]
        grad_out = grad_out.contiguous()
        ffn = pre.shape[1] // 2
        grad_scaled = grad_out.new_empty(scaled.shape)
        grads2 = []
        for (s, e), w2, need in zip(ctx.bounds, fc2, needs[n:]):
            torch.mm(grad_out[s:e], w2, out=grad_scaled[s:e])
            grads2.append(_weight_grad(w2, need, grad_out[s:e], scaled[s:e]))
        grad_act = grad_scaled * probs.unsqueeze(-1)
        grad_probs = (grad_scaled * act).sum(-1) if ctx.needs_input_grad[1] else None
        grad_pre = grad_out.new_empty(pre.shape)
        torch.ops.aten.silu_backward(
            grad_act * pre[:, ffn:], pre[:, :ffn], grad_input=grad_pre[:, :ffn]
        )
        torch.mul(grad_act, silu, out=grad_pre[:, ffn:])
        grad_hidden = grad_out.new_empty(hidden.shape) if ctx.needs_input_grad[0] else None
        grads1 = []
        for (s, e), w1, need in zip(ctx.bounds, fc1, needs[:n]):
            if grad_hidden is not None:
                torch.mm(grad_pre[s:e], w1, out=grad_hidden[s:e])
            grads1.append(_weight_grad(w1, need, grad_pre[s:e], hidden[s:e]))
        return (grad_hidden, grad_probs, None, *grads1, *grads2)
