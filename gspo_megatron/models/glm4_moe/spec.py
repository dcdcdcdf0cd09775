"""The shape of a GLM-4.5-style MoE model (``glm4_moe``), read from a HuggingFace ``config.json``.

What GLM-4.5 / 4.6 / 4.7 (and -Air) bring beyond Qwen3-MoE, and how each is read:
- a sigmoid router whose expert choice adds ``e_score_correction_bias`` (a tensor, not a config
  key) to the scores, while the routing weights are the plain sigmoid scores, renormalised and
  multiplied by ``routed_scaling_factor``;
- grouped top-k: experts in ``n_group`` groups, a token's top-k drawn from its ``topk_group``
  best groups (a group scores the sum of its two best experts);
- ``n_shared_experts`` always-on experts of ``moe_intermediate_size`` each, fused into one MLP;
- ``first_k_dense_replace`` dense layers (``intermediate_size``) before the MoE layers;
- RoPE on the first ``partial_rotary_factor`` of each head (0.5 unless the config says
  otherwise, as in transformers), q/k/v biases (``attention_bias``), optional per-head q/k
  RMSNorm (``use_qk_norm``);
- ``num_nextn_predict_layers`` multi-token-prediction layers stored after the decoder layers,
  which the RL trainer does not train (they travel through conversion and export untouched).

What megatron-core's router cannot reproduce exactly is refused by name: ``norm_topk_prob``
false with several experts per token (megatron always renormalises sigmoid top-k weights), and a
grouped top-k whose ``num_experts_per_tok / topk_group`` is not 2 (megatron scores a group by its
best ``num_experts_per_tok / topk_group`` experts, transformers and vLLM by their best two).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gspo_megatron.errors import GspoError
from gspo_megatron.models import family_named
from gspo_megatron.models.layers import sizes
from gspo_megatron.models.layers.hf_config import (
    DEFAULT_VOCAB_PAD_MULTIPLE,
    architecture,
    check_silu,
    check_types,
    require,
    rope,
    torch_dtype,
)
from gspo_megatron.models.layers.spec_base import DecoderSpec

_MODEL_TYPES = family_named("glm4_moe").model_types


@dataclass(frozen=True)
class Glm4MoeSpec(DecoderSpec):
    """Architecture hyper-parameters of a GLM-4.5-style MoE model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    """Decoder layers (the MTP layers after them are not counted)."""
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    """Intermediate size of the first_k_dense_replace dense layers."""
    rms_norm_eps: float
    rope_theta: float
    rotary_fraction: float
    """Fraction of each head's dimensions RoPE rotates (partial_rotary_factor)."""
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_experts: int
    moe_ffn_hidden_size: int
    moe_top_k: int
    shared_ffn_hidden_size: int
    """moe_intermediate_size x n_shared_experts: the shared experts as one MLP."""
    routed_scaling_factor: float
    num_groups: int
    group_topk: int
    moe_layers: tuple
    num_mtp_layers: int = 0
    """Multi-token-prediction layers stored as model.layers.{num_layers + i} (not trained)."""
    torch_dtype: str = "float32"
    vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return True

    def shape_summary(self) -> dict:
        """The fields that decide tensor shapes: two checkpoints are interchangeable iff equal."""
        return {
            **self.decoder_shape(),
            "shared_ffn_hidden_size": self.shared_ffn_hidden_size,
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
        }

    # -- what the shape implies (the family's own rules; models/layers/sizes.py) --------------

    def layout_divisions(self, layout) -> list:
        """The sizes ``layout`` must divide: (what, size, parallel size, dimension)."""
        shared = ("shared expert size", self.shared_ffn_hidden_size, layout.tp, "TP")
        out = sizes.tensor_parallel_divisions(self, layout) + [shared]
        return out + sizes.expert_divisions(self, layout)

    def moe_mlp_flops(self) -> int:
        """Per token: the router, top-k experts and the shared experts."""
        shared = sizes.swiglu_flops(self.hidden_size, self.shared_ffn_hidden_size)
        return sizes.routed_flops(self) + shared


_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "num_nextn_predict_layers",
    "vocab_size",
    "max_position_embeddings",
)
_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor")
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_qk_norm")


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> Glm4MoeSpec:
    """Validate a HF config dict into a Glm4MoeSpec. Raises GspoError naming the key."""
    arch = architecture(cfg, _MODEL_TYPES, where)
    check_types(cfg, where, _INTS, _FLOATS, _BOOLS)
    check_silu(cfg, where)

    def positive(key: str, default=None) -> int:
        value = cfg.get(key, default) if default is not None else require(cfg, key, where)
        if value is None or int(value) < 1:
            raise GspoError(f"{where}: {key}={value} must be at least 1")
        return int(value)

    hidden = positive("hidden_size")
    heads = positive("num_attention_heads")
    num_layers = positive("num_hidden_layers")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    experts = positive("n_routed_experts")
    top_k = positive("num_experts_per_tok")
    shared = positive("n_shared_experts", 1)
    groups = positive("n_group", 1)
    group_topk = positive("topk_group", 1)
    dense = int(cfg.get("first_k_dense_replace", 1))
    theta, fraction = rope(cfg, where, default_partial=0.5)

    if top_k > experts:
        raise GspoError(f"{where}: num_experts_per_tok={top_k} exceeds n_routed_experts={experts}")
    if top_k > 1 and not cfg.get("norm_topk_prob", True):
        raise GspoError(
            f"{where}: norm_topk_prob=false is not supported with num_experts_per_tok={top_k} "
            f"(megatron-core always renormalises sigmoid top-k weights; supported: true)"
        )
    if experts % groups:
        raise GspoError(f"{where}: n_routed_experts={experts} is not divisible by n_group={groups}")
    if group_topk > groups:
        raise GspoError(f"{where}: topk_group={group_topk} exceeds n_group={groups}")
    if group_topk < groups and top_k // group_topk != 2:
        raise GspoError(
            f"{where}: grouped top-k with num_experts_per_tok={top_k}, topk_group={group_topk} "
            f"is not supported (megatron-core scores a group by its best num_experts_per_tok / "
            f"topk_group experts, transformers by its best 2: supported when that is 2)"
        )
    if groups > 1 and experts // groups < 2:
        raise GspoError(
            f"{where}: n_group={groups} leaves fewer than 2 experts per group "
            f"(transformers scores a group by its best 2)"
        )
    if dense >= num_layers:
        raise GspoError(
            f"{where}: first_k_dense_replace={dense} leaves no MoE layer of the "
            f"num_hidden_layers={num_layers}"
        )
    if not 0.0 < fraction <= 1.0 or int(head_dim * fraction) % 2:
        raise GspoError(
            f"{where}: partial_rotary_factor={fraction} must be in (0, 1] and rotate an even "
            f"number of the head_dim={head_dim} dimensions"
        )
    if cfg.get("use_sliding_window", False):
        raise GspoError(f"{where}: use_sliding_window=true is not supported (supported: false)")

    moe_size = positive("moe_intermediate_size")
    return Glm4MoeSpec(
        architecture=arch,
        vocab_size=positive("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=positive("intermediate_size"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rotary_fraction=fraction,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=bool(cfg.get("use_qk_norm", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        num_experts=experts,
        moe_ffn_hidden_size=moe_size,
        moe_top_k=top_k,
        shared_ffn_hidden_size=moe_size * shared,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_groups=groups,
        group_topk=group_topk,
        # Same rule as transformers' Glm4MoeDecoderLayer.
        moe_layers=tuple(i >= dense for i in range(num_layers)),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers", 0) or 0),
        torch_dtype=torch_dtype(cfg, where),
    )
