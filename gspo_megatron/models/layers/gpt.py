"""A megatron-core GPTModel for a decoder-only family: the TransformerConfig every family shares,
the local layer spec made exact on CPU, and the build.

What differs between families (the router's score function, q/k norms, q/k/v biases, shared
experts, the rotary fraction) comes in as keyword arguments; everything here is what the
families have in common:
- Transformer Engine layer spec when TE imports; otherwise megatron's local spec with this
  project's RMSNorm (which, unlike megatron's torch fallback, supports sequence parallelism),
  its attention through SDPA per packed sequence (all-gather attention under context
  parallelism) and its experts on their own weights (``experts.py``).
- Token dispatcher: alltoall on GPU, allgather on CPU (alltoall creates CUDA streams).
- A pipeline split given per stage (``layout.pp_layers``) becomes megatron's
  ``pipeline_model_parallel_layout``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.experts import SequentialMLP

from gspo_megatron.models.layers import rope
from gspo_megatron.models.layers.cp_attention import AllGatherCPAttention
from gspo_megatron.models.layers.experts import LeanSequentialMLP
from gspo_megatron.models.layers.norm import RMSNorm
from gspo_megatron.models.layers.packed_attention import SegmentedDotProductAttention


def moe_config(spec, layout, moe_aux_loss_coeff: float, **router) -> dict:
    """The MoE part of a TransformerConfig (empty for a dense model): experts, top-k, per-layer
    MoE/dense pattern, dispatcher and expert parallelism, plus the family's ``router`` keys."""
    if not spec.is_moe:
        return {}
    moe_layers = [1 if m else 0 for m in spec.moe_layers]
    return dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_top_k,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_layer_freq=1 if all(moe_layers) else moe_layers,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        **router,
    )


def transformer_config(
    spec, layout, params_dtype: torch.dtype = torch.float32, **family
) -> TransformerConfig:
    """The TransformerConfig of a pre-norm SwiGLU decoder with RMSNorm and RoPE under ``layout``;
    ``family``: the family's own keys (``qk_layernorm``, ``add_qkv_bias``, the MoE keys of
    ``moe_config``)."""
    on_gpu = torch.cuda.is_available()
    pp_split = {}
    if layout.pp_layers is not None and layout.pp > 1:
        stages = []
        for i, n in enumerate(layout.pp_layers):
            stage = (["embedding"] if i == 0 else []) + ["decoder"] * n
            stages.append(stage + (["loss"] if i == layout.pp - 1 else []))
        pp_split = dict(pipeline_model_parallel_layout=stages)

    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        # megatron requires sequence parallelism for MoE with TP; it is also the memory-lean
        # choice for dense models, so it is on whenever TP > 1.
        sequence_parallel=layout.tp > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        # Weights come from a checkpoint, but megatron sets the tensor-parallel attributes of
        # its linear layers (which gradient-norm and clipping rely on) only while initialising.
        perform_initialization=True,
        attention_softmax_in_fp32=True,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Every micro-batch of one schedule call is padded to one length (the allgather
        # dispatcher used on CPU rejects variable lengths).
        variable_seq_lengths=False,
        **family,
        **pp_split,
    )


def _replace_norms(spec_obj, norm_cls) -> None:
    """Swap every norm submodule of a local layer spec for ``norm_cls`` (in place)."""
    subs = spec_obj.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        setattr(subs, name, norm_cls)
    attn = subs.self_attention.submodules
    attn.q_layernorm = norm_cls
    attn.k_layernorm = norm_cls


def layer_block_spec(config, use_te: bool, vp_stage: Optional[int] = None):
    """Decoder block spec: TE when available, else megatron local modules + RMSNorm, with the
    all-gather CP attention that megatron's local spec lacks under context parallelism, and
    otherwise its attention run per sequence on packed rows."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if use_te:
        return block
    # The dense and MoE layer specs are shared objects: copy before editing.
    block.layer_specs = [copy.deepcopy(s) for s in block.layer_specs]
    for layer_spec in block.layer_specs:
        _replace_norms(layer_spec, RMSNorm)
        experts = getattr(layer_spec.submodules.mlp.submodules, "experts", None)
        if experts is not None and experts.module is SequentialMLP:
            experts.module = LeanSequentialMLP
        attention = layer_spec.submodules.self_attention.submodules
        if config.context_parallel_size > 1:
            attention.core_attention = AllGatherCPAttention
        else:  # attends within each sequence of a packed row (unpacked rows: megatron's own)
            attention.core_attention = SegmentedDotProductAttention
    block.layer_norm = RMSNorm
    return block


def build_gpt(spec, config: TransformerConfig, use_te: bool, rotary_percent: float = 1.0):
    """This rank's GPTModel for ``config`` (parallel_state initialised for its layout)."""
    rope.install()  # megatron's unfused RoPE as one autograd node (bit for bit the same)
    theta = spec.rope_theta
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_block_spec(config, use_te),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rotary_percent=rotary_percent,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
