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
    """``SequentialMLP`` computing each expert with ``F.linear`` when its linears are unsplit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.lean = _plain(self.config, tp_size)

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        if not self.lean:
            return super().forward(permuted_hidden, tokens_per_expert, permuted_probs)
        counts = tokens_per_expert.tolist()
        outputs = []
        for expert, tokens, probs in zip(
            self.local_experts,
            torch.split(permuted_hidden, counts),
            torch.split(permuted_probs, counts),
        ):
            gate, up = torch.chunk(F.linear(tokens, expert.linear_fc1.weight), 2, dim=-1)
            hidden = F.silu(gate) * up
            hidden = (hidden * probs.unsqueeze(-1)).to(hidden.dtype)
            outputs.append(F.linear(hidden, expert.linear_fc2.weight))
        return torch.cat(outputs, dim=0), None
