"""Build a megatron-core GPTModel that computes what HF Qwen3 / Qwen3-MoE computes.

How each Qwen3 feature maps onto megatron-core (the rest is ``models/layers/gpt.py``):
- GQA, per-head q/k RMSNorm, RoPE (non-interleaved, ``rotary_base = rope_theta``), SwiGLU:
  ``num_query_groups``, ``qk_layernorm``, ``position_embedding_type="rope"``, ``gated_linear_unit``.
- Router: HF takes softmax over all experts, then top-k, then (``norm_topk_prob``) renormalises.
  Renormalised top-k of a softmax equals a softmax over the top-k logits, which is megatron's
  default order; without renormalisation megatron must take the softmax first
  (``moe_router_pre_softmax``).
- ``mlp_only_layers`` / ``decoder_sparse_step`` become megatron's per-layer ``moe_layer_freq``.
"""

from __future__ import annotations

import torch

from gspo_megatron.distributed.parallel import ParallelLayout
from gspo_megatron.models import have_transformer_engine
from gspo_megatron.models.layers import gpt
from gspo_megatron.models.qwen3.spec import Qwen3Spec


def transformer_config(
    spec: Qwen3Spec,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    moe_aux_loss_coeff: float = 0.0,
):
    """The megatron TransformerConfig for a Qwen3 spec under a parallel layout."""
    moe = gpt.moe_config(
        spec, layout, moe_aux_loss_coeff, moe_router_pre_softmax=not spec.norm_topk_prob
    )
    return gpt.transformer_config(
        spec, layout, params_dtype, qk_layernorm=True, add_qkv_bias=False, **moe
    )


def build_model(
    spec: Qwen3Spec,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    moe_aux_loss_coeff: float = 0.0,
):
    """Build this rank's part of the model. parallel_state must be initialised for ``layout``."""
    config = transformer_config(spec, layout, params_dtype, moe_aux_loss_coeff)
    return gpt.build_gpt(spec, config, have_transformer_engine())
