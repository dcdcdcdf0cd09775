"""Reading a HuggingFace ``config.json`` strictly: the helpers every family's spec parser uses.

Each error is one line naming the file and the key, raised before any model is built.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Tuple

import torch

from gspo_megatron.errors import GspoError

# Vocabulary rows are padded to a multiple of this, independent of the parallel layout, so a
# checkpoint never depends on the tensor-parallel size it was written for (Qwen3's 151,936 and
# GLM-4.5's 151,552 are already multiples of 128).
DEFAULT_VOCAB_PAD_MULTIPLE = 128

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded(vocab_size: int, multiple: int) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


def require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise GspoError(f"{where}: missing required key '{key}'")
    return cfg[key]


def check_types(
    cfg: dict,
    where: str,
    ints: Iterable[str] = (),
    floats: Iterable[str] = (),
    bools: Iterable[str] = (),
    int_lists: Iterable[str] = (),
) -> None:
    """Every field the model is built from has its JSON type, else one line naming it.

    int() and float() would read "128" or true as numbers: a config that a careless edit left
    with a string converts, and then fails much later in another tool (transformers' tokenizer
    loading) with a message that names neither the file nor the field.
    """

    def bad(key: str, want: str) -> GspoError:
        return GspoError(f"{where}: {key}={json.dumps(cfg[key])} must be {want}")

    for key in ints:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(key, "an integer")
        if isinstance(value, int) and value < 0:
            raise bad(key, "a non-negative integer")
    for key in floats:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(key, "a number")
    for key in bools:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    for key in int_lists:
        layers = cfg.get(key)
        if layers is not None and (
            not isinstance(layers, list)
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
        ):
            raise bad(key, "a list of layer indices")


def rope(cfg: dict, where: str, default_partial: float = 1.0) -> Tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a default-type RoPE, from ``rope_parameters``
    (transformers 5) or the top-level keys (released configs); other RoPE types are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", scaling.get("rope_type", "default")))
    if rope_type not in ("default", None):
        raise GspoError(f"{where}: rope type '{rope_type}' is not supported (supported: default)")

    def number(key: str, default: float) -> float:
        for source, name in ((params, f"rope_parameters.{key}"), (cfg, key)):
            if key in source:
                value = source[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise GspoError(f"{where}: {name}={json.dumps(value)} must be a number")
                return float(value)
        return default

    return number("rope_theta", 10000.0), number("partial_rotary_factor", default_partial)


def torch_dtype(cfg: dict, where: str) -> str:
    """The dtype the HF weights are stored in (``torch_dtype``, or ``dtype`` in transformers 5)."""
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    if dtype not in DTYPES:
        raise GspoError(
            f"{where}: dtype '{dtype}' is not supported (supported: {', '.join(DTYPES)})"
        )
    return dtype


def architecture(cfg: dict, model_types: dict, where: str) -> str:
    """The HF architecture a config names (its first ``architectures`` entry, else the one its
    ``model_type`` stands for), one of ``model_types``' values, else one line."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else model_types.get(cfg.get("model_type", ""))
    supported = tuple(model_types.values())
    if arch not in supported:
        found = arch or cfg.get("model_type") or "none"
        raise GspoError(
            f"{where}: unsupported architecture '{found}' (supported: {', '.join(supported)})"
        )
    return arch


def check_silu(cfg: dict, where: str) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise GspoError(
            f"{where}: hidden_act '{cfg['hidden_act']}' is not supported (supported: silu)"
        )
