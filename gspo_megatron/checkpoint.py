"""Load a model from a megatron-core distributed checkpoint, whatever layout wrote it.

A checkpoint directory (written by ``gspo-convert hf-to-mcore`` or by the trainer) holds the
torch_dist tensors plus ``hf/config.json``, which says which model it is. Loading checks that
the model being built has the same shapes before megatron touches any data, so a checkpoint of
another model fails with one line instead of a shape error deep in DCP.
"""

from __future__ import annotations

from pathlib import Path

from gspo_megatron.errors import GspoError
from gspo_megatron.models.qwen3 import hf_mapping
from gspo_megatron.models.qwen3.spec import Qwen3Spec, check_same_shapes, spec_from_hf_dir

HF_SUBDIR = "hf"


def checkpoint_spec(ckpt_dir: Path) -> Qwen3Spec:
    """The model spec recorded in a checkpoint (its hf/config.json)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise GspoError(f"{ckpt_dir}: no such checkpoint directory")
    if not (ckpt_dir / "metadata.json").is_file():
        raise GspoError(f"{ckpt_dir}: not a megatron distributed checkpoint (metadata.json missing)")
    if not (ckpt_dir / HF_SUBDIR / "config.json").is_file():
        raise GspoError(f"{ckpt_dir / HF_SUBDIR / 'config.json'}: missing; the checkpoint does not "
                        f"say which model it holds")
    return spec_from_hf_dir(ckpt_dir / HF_SUBDIR)


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict in the checkpoint's key space (no TE extra state)."""
    sharded = model.sharded_state_dict(metadata=hf_mapping.SHARDED_METADATA)
    out = {}
    for name, value in sharded.items():
        if name.endswith("_extra_state"):
            continue  # TE fp8 metadata / None for local modules: not model weights
        if hasattr(value, "key"):
            value.key = hf_mapping.canonical_key(value.key)
        out[name] = value
    return out


def load_model_checkpoint(model, ckpt_dir: Path, expected: Qwen3Spec) -> None:
    """Fill ``model`` (this rank's part) from ``ckpt_dir``; every rank must call this."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    check_same_shapes(expected, checkpoint_spec(ckpt_dir), str(ckpt_dir))
    sharded = model_sharded_state_dict(model)
    _check_tensor_shapes(ckpt_dir, sharded)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise GspoError(f"{ckpt_dir}: checkpoint does not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _check_tensor_shapes(ckpt_dir: Path, sharded: dict) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    except Exception as err:
        raise GspoError(f"{ckpt_dir / '.metadata'}: unreadable checkpoint metadata ({err})") from None
    for value in sharded.values():
        keys = []
        if isinstance(value, ShardedTensor):
            keys = [(value.key, value.global_shape)]
        elif isinstance(value, ShardedTensorFactory):
            keys = [(value.key + "_w", None), (value.key + "_v", None)]
        for key, shape in keys:
            if key not in metadata:
                raise GspoError(f"{ckpt_dir}: tensor '{key}' not in checkpoint (another model shape?)")
            if shape is not None and tuple(metadata[key].size) != tuple(shape):
                raise GspoError(f"{ckpt_dir}: tensor '{key}' has shape {list(metadata[key].size)}, "
                                f"the model expects {list(shape)} (another model shape)")
