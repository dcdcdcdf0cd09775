"""The HF <-> megatron tensor-mapping vocabulary the families share.

Megatron side: the keys of a megatron-core distributed checkpoint written with
``singleton_local_shards`` (``SHARDED_METADATA``): one key per layer and per expert, each a full
(unsharded) tensor, and SwiGLU's fused ``linear_fc1`` stored as its two halves ``_w`` (gate) and
``_v`` (up). Tensor parallelism only slices these tensors, so both the checkpoint converters and
the live weight sync to vLLM (which gathers the slices back) go through a family's
``tensor_mappings``.

HF side: the released on-disk names (``model.layers.N.mlp.experts.E.gate_proj.weight``, ...),
which transformers and vLLM both load.

Layout changes:
- q/k/v (weights and biases) -> ``linear_qkv``: megatron interleaves per query group: for each
  of the G groups, its (heads/G) query heads, then its key head, then its value head.
- embedding / output rows are padded with zeros to ``spec.padded_vocab_size``.
Everything else is a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

# Passed to model.sharded_state_dict(): one checkpoint key per layer / expert (no stacked layer
# or expert axis), so each key corresponds to whole HF tensors and converts in a stream.
SHARDED_METADATA = {"singleton_local_shards": True}

COPY, QKV, VOCAB = "copy", "qkv", "vocab"


@dataclass(frozen=True)
class TensorMapping:
    """One megatron checkpoint tensor and the HF tensors it is made of."""

    mcore_key: str
    hf_names: Tuple[str, ...]
    mcore_shape: Tuple[int, ...]
    hf_shapes: Tuple[Tuple[int, ...], ...]
    kind: str = COPY


def copy(mcore_key: str, hf_name: str, shape: Tuple[int, ...]) -> TensorMapping:
    """A tensor stored the same on both sides."""
    return TensorMapping(mcore_key, (hf_name,), shape, (shape,))


def attention(spec, m: str, h: str, qk_norm: bool, qkv_bias: bool) -> Iterator[TensorMapping]:
    """Layer prefix ``m`` / ``h``: the input norm, q/k/v (and their biases), the per-head q/k
    norms, the output projection."""
    H, D = spec.hidden_size, spec.head_dim
    nq, ng = spec.num_attention_heads, spec.num_query_groups
    yield copy(
        m + "self_attention.linear_qkv.layer_norm_weight", h + "input_layernorm.weight", (H,)
    )
    proj = tuple(f"{h}self_attn.{x}_proj" for x in "qkv")
    yield TensorMapping(
        m + "self_attention.linear_qkv.weight",
        tuple(p + ".weight" for p in proj),
        ((nq + 2 * ng) * D, H),
        ((nq * D, H), (ng * D, H), (ng * D, H)),
        QKV,
    )
    if qkv_bias:
        yield TensorMapping(
            m + "self_attention.linear_qkv.bias",
            tuple(p + ".bias" for p in proj),
            ((nq + 2 * ng) * D,),
            ((nq * D,), (ng * D,), (ng * D,)),
            QKV,
        )
    if qk_norm:
        yield copy(m + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight", (D,))
        yield copy(m + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight", (D,))
    yield copy(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight", (H, nq * D))
    yield copy(m + "mlp.linear_fc1.layer_norm_weight", h + "post_attention_layernorm.weight", (H,))


def swiglu(m: str, h: str, F: int, H: int) -> Iterator[TensorMapping]:
    """A SwiGLU MLP: megatron's ``linear_fc1`` halves and ``linear_fc2``, HF's gate/up/down."""
    yield copy(m + "linear_fc1.weight_w", h + "gate_proj.weight", (F, H))
    yield copy(m + "linear_fc1.weight_v", h + "up_proj.weight", (F, H))
    yield copy(m + "linear_fc2.weight", h + "down_proj.weight", (H, F))


def routed_experts(spec, m: str, h: str) -> Iterator[TensorMapping]:
    """The router weight and every routed expert of one MoE layer (HF: ``mlp.gate``,
    ``mlp.experts.E``)."""
    E, F, H = spec.num_experts, spec.moe_ffn_hidden_size, spec.hidden_size
    yield copy(m + "mlp.router.weight", h + "mlp.gate.weight", (E, H))
    for e in range(E):
        yield from swiglu(f"{m}mlp.experts.experts.{e}.", f"{h}mlp.experts.{e}.", F, H)


def model_mappings(spec, layer_mappings) -> List[TensorMapping]:
    """Every tensor of the model, in HF order: embedding, ``layer_mappings(layer, m, h)`` for
    each layer, final norm, lm_head (unless tied)."""
    Vp, V, H = spec.padded_vocab_size, spec.vocab_size, spec.hidden_size
    out = [
        TensorMapping(
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            (Vp, H),
            ((V, H),),
            VOCAB,
        )
    ]
    for layer in range(spec.num_layers):
        out.extend(layer_mappings(layer, f"decoder.layers.{layer}.", f"model.layers.{layer}."))
    out.append(copy("decoder.final_layernorm.weight", "model.norm.weight", (H,)))
    if not spec.tie_word_embeddings:
        out.append(
            TensorMapping("output_layer.weight", ("lm_head.weight",), (Vp, H), ((V, H),), VOCAB)
        )
    return out


def to_mcore(spec, mapping: TensorMapping, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    """HF tensors (in ``mapping.hf_names`` order) -> the megatron checkpoint tensor."""
    if mapping.kind == COPY:
        return hf[0]
    if mapping.kind == VOCAB:
        (w,) = hf
        pad = spec.padded_vocab_size - w.shape[0]
        return w if pad == 0 else torch.cat([w, w.new_zeros(pad, w.shape[1])], dim=0)
    if mapping.kind == QKV:
        q, k, v = hf
        ng, D = spec.num_query_groups, spec.head_dim
        rest = tuple(q.shape[1:])  # (H,) for the weight, () for the bias
        per_group = spec.num_attention_heads // ng
        return torch.cat(
            [
                q.reshape(ng, per_group * D, *rest),
                k.reshape(ng, D, *rest),
                v.reshape(ng, D, *rest),
            ],
            dim=1,
        ).reshape(-1, *rest)
    raise ValueError(f"unknown mapping kind {mapping.kind}")


def to_hf(spec, mapping: TensorMapping, t: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """The megatron checkpoint tensor -> (HF name, tensor) pairs."""
    if mapping.kind == COPY:
        return [(mapping.hf_names[0], t)]
    if mapping.kind == VOCAB:
        return [(mapping.hf_names[0], t[: spec.vocab_size])]
    if mapping.kind == QKV:
        ng, D = spec.num_query_groups, spec.head_dim
        rest = tuple(t.shape[1:])
        per_group = spec.num_attention_heads // ng
        parts = t.reshape(ng, (per_group + 2) * D, *rest).split([per_group * D, D, D], dim=1)
        return [(n, x.reshape(-1, *rest)) for n, x in zip(mapping.hf_names, parts)]
    raise ValueError(f"unknown mapping kind {mapping.kind}")


def canonical_key(key: str) -> str:
    """Checkpoint key spelled as by megatron's local layer spec.

    The local spec stores the MoE layers' pre-MLP norm under the name TE's fused
    LayerNormLinear uses (``mlp.linear_fc1.layer_norm_weight``); TE's own MoE layers keep
    ``pre_mlp_layernorm.weight``. One spelling keeps checkpoints interchangeable.
    """
    return key.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")


def untrained(spec, hf_name: str) -> bool:
    """No HF tensor is carried untrained unless the family says so."""
    return False
