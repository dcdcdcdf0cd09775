"""Model families behind one face.

Everything outside ``models/`` reaches a model through this module: which family a checkpoint's
``config.json`` names (``model_type``, else ``architectures``), its typed spec, the megatron
model for a layout, and the HF <-> megatron tensor mapping that the converters, the live weight
sync and the transfer to rollout ranks share. No module outside ``models/`` imports a family
package; a family package imports nothing of another.

A family is a package ``models/<name>/`` with (at least):

- ``spec.py``: ``spec_from_hf_config(cfg, where)``, the frozen spec dataclass (the fields of
  ``ModelSpec`` below, ``shape_summary()``), one-line errors naming the config key;
- ``model.py``: ``build_model(spec, layout, params_dtype, moe_aux_loss_coeff)``;
- ``tiny.py``: ``tiny_config(model_type, **fields)``, ``complete_checkpoint(out, config,
  dtype)``: tiny random models for tests and demos;
- ``hf_mapping.py``: ``tensor_mappings(spec)``; optionally ``untrained(spec, hf_name)`` (HF
  tensors carried through conversion and export untouched) or its own ``to_mcore`` / ``to_hf``
  / ``canonical_key`` where the shared ones of ``models/layers/tensor_map.py`` do not fit;

and one ``Family`` entry in ``FAMILIES`` (docs/design.md, "Adding a model family").
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Dict, Protocol, Tuple

from gspo_megatron.errors import GspoError


class ModelSpec(Protocol):
    """What code outside ``models/`` may read of any family's spec: its shape, and what the
    shape implies: the sizes a parallel layout must divide, FLOPs, KV-cache bytes (each family
    computes these from its own layers)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    moe_ffn_hidden_size: int
    moe_top_k: int
    moe_layers: tuple
    torch_dtype: str

    @property
    def is_moe(self) -> bool: ...

    @property
    def padded_vocab_size(self) -> int: ...

    def shape_summary(self) -> dict: ...

    def layout_divisions(self, layout) -> list: ...

    def matmul_flops_per_token(self) -> int: ...

    def attention_flops(self, n: int) -> int: ...

    def kv_bytes_per_token(self, dtype_bytes: int, engine_tp: int) -> int: ...


@dataclass(frozen=True)
class Family:
    """One model family: its name, the config.json model types it reads (each with the HF
    architecture it means), and its package under ``models/`` (imported when first used)."""

    name: str
    package: str
    model_types: Dict[str, str]

    @property
    def architectures(self) -> Tuple[str, ...]:
        return tuple(self.model_types.values())

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{name}")

    def spec_from_hf_config(self, cfg: dict, where: str) -> ModelSpec:
        return self.module("spec").spec_from_hf_config(cfg, where)

    def build_model(self, spec: ModelSpec, layout, params_dtype=None, moe_aux_loss_coeff=0.0):
        import torch

        build = self.module("model").build_model
        return build(spec, layout, params_dtype or torch.float32, moe_aux_loss_coeff)

    @property
    def mapping(self) -> SimpleNamespace:
        """The family's HF <-> megatron mapping: its ``hf_mapping`` module's ``tensor_mappings``
        (and whatever else it defines) over the shared vocabulary of ``layers.tensor_map``. One
        object per family, so that every caller sees the same functions."""
        found = _MAPPINGS.get(self.name)
        if found is None:
            from gspo_megatron.models.layers import tensor_map

            own = self.module("hf_mapping")
            found = SimpleNamespace(
                **{
                    name: getattr(own if hasattr(own, name) else tensor_map, name)
                    for name in _MAPPING
                }
            )
            _MAPPINGS[self.name] = found
        return found

    @property
    def tiny(self) -> ModuleType:
        """Tiny random models for tests and demos: ``tiny_config(model_type, **fields)`` (a
        transformers config), ``complete_checkpoint(out, config, dtype)`` (what save_pretrained
        leaves out)."""
        return self.module("tiny")


_MAPPING = (
    "tensor_mappings",
    "to_mcore",
    "to_hf",
    "canonical_key",
    "untrained",
    "SHARDED_METADATA",
    "TensorMapping",
    "COPY",
    "QKV",
    "VOCAB",
)
"""What a family's mapping offers (``tensor_mappings`` is the family's own; the rest default to
``layers.tensor_map``'s)."""
_MAPPINGS: Dict[str, SimpleNamespace] = {}

FAMILIES: Tuple[Family, ...] = (
    Family(
        "qwen3",
        "gspo_megatron.models.qwen3",
        {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM"},
    ),
    Family("glm4_moe", "gspo_megatron.models.glm4_moe", {"glm4_moe": "Glm4MoeForCausalLM"}),
)
"""Every supported family (adding one: a package under models/ and an entry here)."""


def family_named(name: str) -> Family:
    """The family registered as ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.architectures)


def family_of_config(cfg: dict, where: str = "config.json") -> Family:
    """The family a config.json names: its first architecture, else its model_type."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    for family in FAMILIES:
        if (archs and archs[0] in family.architectures) or (
            not archs and model_type in family.model_types
        ):
            return family
    found = (archs[0] if archs else model_type) or "none"
    raise GspoError(
        f"{where}: unsupported architecture '{found}' "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def family_of_model_type(model_type: str) -> Family:
    """The family that reads config.json's ``model_type``."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise GspoError(f"unsupported model_type '{model_type}' (supported: {known})")


def family_of(spec: ModelSpec) -> Family:
    """The family a spec belongs to (by its HF architecture)."""
    for family in FAMILIES:
        if spec.architecture in family.architectures:
            return family
    raise GspoError(f"no model family has the architecture '{spec.architecture}'")


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> ModelSpec:
    """Validate a HF config dict into its family's spec; one-line errors naming the key."""
    return family_of_config(cfg, where).spec_from_hf_config(cfg, where)


def load_hf_config(path: Path) -> dict:
    """Read a config.json, with a one-line error for a missing or unreadable file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise GspoError(f"{path}: no such file (a HF model directory must contain config.json)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GspoError(f"{path}: not valid JSON ({err})") from None


def spec_from_hf_dir(path: Path) -> ModelSpec:
    """The spec of a HF model directory (or of a config.json's path)."""
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    return spec_from_hf_config(load_hf_config(cfg_path), where=str(cfg_path))


def check_same_shapes(expected: ModelSpec, found: ModelSpec, where: str) -> None:
    """Raise a one-line error naming the first field where two model shapes differ."""
    a, b = expected.shape_summary(), found.shape_summary()
    for key in a:
        if a[key] != b.get(key):
            raise GspoError(
                f"{where}: checkpoint is of another model shape: {key}={b.get(key)} "
                f"but the model expects {key}={a[key]}"
            )


def build_model(spec: ModelSpec, layout, params_dtype=None, moe_aux_loss_coeff: float = 0.0):
    """This rank's part of the model for ``layout`` (parallel_state initialised for it). The
    model keeps its spec (``spec_of_model``): its checkpoint keys are its family's."""
    model = family_of(spec).build_model(spec, layout, params_dtype, moe_aux_loss_coeff)
    model.gspo_model_spec = spec
    return model


def spec_of_model(model) -> ModelSpec:
    """The spec an (unwrapped) model was built from by ``build_model``."""
    spec = getattr(model, "gspo_model_spec", None)
    if spec is None:
        raise TypeError(f"{type(model).__name__} was not built by gspo_megatron.models.build_model")
    return spec


def hf_mapping(spec: ModelSpec) -> SimpleNamespace:
    """The family's HF <-> megatron tensor mapping (``tensor_mappings(spec)``, ``to_mcore``,
    ``to_hf``, ``canonical_key``, ``untrained``, ``SHARDED_METADATA``)."""
    return family_of(spec).mapping


def untrained(spec: ModelSpec, hf_name: str) -> bool:
    """Whether a tensor of the family's HF checkpoints is carried through conversion and export
    without being part of the megatron model (GLM-4.5's multi-token-prediction layers)."""
    return family_of(spec).mapping.untrained(spec, hf_name)


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports (GPU builds); the models then use its layers."""
    import torch

    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return torch.cuda.is_available()
