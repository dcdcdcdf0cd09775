"""Build a megatron-core GPTModel that computes what HF GLM-4.5 (``Glm4MoeForCausalLM``)
computes. The decoder shared with the other families is ``models/layers/gpt.py``; what GLM sets:

- Router: ``moe_router_score_function="sigmoid"`` with megatron's expert bias
  (``moe_router_enable_expert_bias``) holding ``e_score_correction_bias``: megatron adds it to
  the sigmoid scores to choose experts and weights them by the plain scores, renormalised
  (megatron always renormalises sigmoid top-k; the spec refuses ``norm_topk_prob=false``), times
  ``moe_router_topk_scaling_factor`` = ``routed_scaling_factor``. Grouped top-k:
  ``moe_router_num_groups`` / ``moe_router_group_topk`` (left unset for one group, where grouping
  chooses nothing).
- The correction bias stays frozen during RL, as in the released model: megatron updates it
  after every optimizer step by ``moe_router_bias_update_rate`` x sign(load imbalance), and that
  rate is 0 here, so the update adds exactly 0. It is a buffer, not a parameter: no gradient, no
  optimizer state; checkpoints and the weight sync carry it.
- Shared experts: ``moe_shared_expert_intermediate_size`` (one SwiGLU MLP of
  ``n_shared_experts x moe_intermediate_size``, no gate), added to the routed output as HF does.
- ``first_k_dense_replace`` becomes megatron's per-layer ``moe_layer_freq``.
- Attention: q/k/v biases (``add_qkv_bias``), per-head q/k RMSNorm when ``use_qk_norm``, RoPE on
  the first ``partial_rotary_factor`` of each head (``rotary_percent``, non-interleaved halves as
  HF's ``rotate_half`` on the rotated slice).
"""

from __future__ import annotations

import torch

from gspo_megatron.distributed.parallel import ParallelLayout
from gspo_megatron.models import have_transformer_engine
from gspo_megatron.models.glm4_moe.spec import Glm4MoeSpec
from gspo_megatron.models.layers import gpt


def transformer_config(
    spec: Glm4MoeSpec,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    moe_aux_loss_coeff: float = 0.0,
):
    """The megatron TransformerConfig for a GLM-4.5 spec under a parallel layout."""
    grouped = spec.num_groups > 1
    moe = gpt.moe_config(
        spec,
        layout,
        moe_aux_loss_coeff,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=spec.routed_scaling_factor,
        moe_router_num_groups=spec.num_groups if grouped else None,
        moe_router_group_topk=spec.group_topk if grouped else None,
        moe_shared_expert_intermediate_size=spec.shared_ffn_hidden_size,
        # HF computes the router in fp32 whatever the weights' dtype.
        moe_router_dtype="fp32",
    )
    return gpt.transformer_config(
        spec, layout, params_dtype, qk_layernorm=spec.qk_norm, add_qkv_bias=spec.qkv_bias, **moe
    )


def build_model(
    spec: Glm4MoeSpec,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    moe_aux_loss_coeff: float = 0.0,
):
    """Build this rank's part of the model. parallel_state must be initialised for ``layout``."""
    config = transformer_config(spec, layout, params_dtype, moe_aux_loss_coeff)
    return gpt.build_gpt(spec, config, have_transformer_engine(), spec.rotary_fraction)
