"""The shape of a Qwen3 / Qwen3-MoE model, read from a HuggingFace ``config.json``.

``Qwen3Spec`` is the single description of a model that the Megatron builder, the checkpoint
converters, the name mapping and the live weight sync all read. It accepts both spellings found
in released configs and in transformers 5 (``num_experts`` / ``num_local_experts``,
``rope_theta`` / ``rope_parameters``) and rejects, by name, what the Megatron model cannot
reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gspo_megatron.errors import GspoError
from gspo_megatron.models import family_named
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

_MODEL_TYPES = family_named("qwen3").model_types
SUPPORTED_ARCHITECTURES = tuple(_MODEL_TYPES.values())


@dataclass(frozen=True)
class Qwen3Spec(DecoderSpec):
    """Architecture hyper-parameters of a Qwen3 (dense) or Qwen3-MoE model."""

    architecture: str
    """HF architecture name, one of SUPPORTED_ARCHITECTURES."""
    vocab_size: int
    """Rows of the HF embedding (before padding)."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA groups)."""
    head_dim: int
    ffn_hidden_size: int
    """Intermediate size of dense MLP layers."""
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_experts: int = 0
    """Routed experts per MoE layer; 0 for a dense model."""
    moe_ffn_hidden_size: int = 0
    moe_top_k: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k router probabilities to sum to one."""
    moe_layers: tuple = ()
    """Per layer: True where the MLP is a routed MoE, False where it is dense."""
    torch_dtype: str = "float32"
    """The dtype the HF weights are stored in."""
    vocab_pad_multiple: int = DEFAULT_VOCAB_PAD_MULTIPLE
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def shape_summary(self) -> dict:
        """The fields that decide tensor shapes: two checkpoints are interchangeable iff equal."""
        return self.decoder_shape()


_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "decoder_sparse_step",
    "vocab_size",
    "max_position_embeddings",
)
_FLOATS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_sliding_window")


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> Qwen3Spec:
    """Validate a HF config dict and turn it into a Qwen3Spec. Raises GspoError naming the key."""
    arch = architecture(cfg, _MODEL_TYPES, where)
    check_types(cfg, where, _INTS, _FLOATS, _BOOLS, int_lists=("mlp_only_layers",))
    check_silu(cfg, where)
    if cfg.get("attention_bias", False):
        raise GspoError(f"{where}: attention_bias=true is not supported (Qwen3 uses false)")
    if cfg.get("use_sliding_window", False):
        raise GspoError(f"{where}: use_sliding_window=true is not supported (supported: false)")

    hidden = int(require(cfg, "hidden_size", where))
    heads = int(require(cfg, "num_attention_heads", where))
    num_layers = int(require(cfg, "num_hidden_layers", where))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    dtype = torch_dtype(cfg, where)
    theta, _ = rope(cfg, where)

    moe_kwargs: dict = {}
    if arch == "Qwen3MoeForCausalLM":
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if num_experts is None:
            raise GspoError(f"{where}: missing 'num_experts' (or 'num_local_experts')")
        num_experts = int(num_experts)
        mlp_only = set(int(i) for i in cfg.get("mlp_only_layers") or [])
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        # Same rule as transformers' Qwen3MoeDecoderLayer.
        moe_layers = tuple(
            (i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0
            for i in range(num_layers)
        )
        moe_kwargs = dict(
            num_experts=num_experts,
            moe_ffn_hidden_size=int(require(cfg, "moe_intermediate_size", where)),
            moe_top_k=int(require(cfg, "num_experts_per_tok", where)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
        )
        if num_experts and moe_kwargs["moe_top_k"] > num_experts:
            raise GspoError(
                f"{where}: num_experts_per_tok={moe_kwargs['moe_top_k']} exceeds "
                f"num_experts={num_experts}"
            )
    else:
        moe_kwargs = dict(moe_layers=tuple(False for _ in range(num_layers)))

    return Qwen3Spec(
        architecture=arch,
        vocab_size=int(require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(require(cfg, "intermediate_size", where)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        torch_dtype=dtype,
        **moe_kwargs,
    )
