"""Load a model from a megatron-core distributed checkpoint, whatever layout wrote it.

A checkpoint directory (written by ``gspo-convert hf-to-mcore`` or by the trainer) holds the
torch_dist tensors plus ``hf/config.json``, which says which model it is. Loading checks that
the model being built has the same shapes before megatron touches any data, so a checkpoint of
another model fails with one line instead of a shape error deep in DCP.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from gspo_megatron.errors import GspoError
from gspo_megatron.models import (
    ModelSpec,
    check_same_shapes,
    hf_mapping,
    spec_from_hf_dir,
    spec_of_model,
)

HF_SUBDIR = "hf"
# In HF_SUBDIR: the HF tensors the megatron model does not hold (models.untrained: GLM's
# multi-token-prediction layers), as they came, for every HF export. Not named *.safetensors, so
# that nothing loading HF_SUBDIR as a model directory takes it for a weight shard.
UNTRAINED_FILE = "untrained.safetensors.carried"

# megatron is imported inside the functions that load tensors: the pre-flight checks
# checkpoints through this module and must not load megatron (seconds of imports).


def checkpoint_spec(ckpt_dir: Path) -> ModelSpec:
    """The model spec recorded in a checkpoint (its hf/config.json)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise GspoError(f"{ckpt_dir}: no such checkpoint directory")
    if not (ckpt_dir / "metadata.json").is_file():
        if (ckpt_dir / "config.json").is_file():
            raise GspoError(
                f"{ckpt_dir}: an HF model directory, not a megatron checkpoint: "
                f"convert it first (gspo-convert hf-to-mcore --hf-dir {ckpt_dir} "
                f"--out DIR)"
            )
        raise GspoError(
            f"{ckpt_dir}: not a megatron distributed checkpoint (metadata.json missing)"
        )
    if not (ckpt_dir / HF_SUBDIR / "config.json").is_file():
        raise GspoError(
            f"{ckpt_dir / HF_SUBDIR / 'config.json'}: missing; the checkpoint does not "
            f"say which model it holds"
        )
    check_checkpoint_files(ckpt_dir)
    return spec_from_hf_dir(ckpt_dir / HF_SUBDIR)


def check_checkpoint_files(ckpt_dir: Path) -> None:
    """Every file the checkpoint's metadata points into is there and long enough, metadata.json
    parses and common.pt is a whole zip: checked from sizes and file ends before any model is
    built, so a copy cut short names its file instead of failing mid-load inside DCP."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise GspoError(f"{ckpt_dir / '.metadata'}: missing; not a complete torch_dist checkpoint")
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as err:
        raise GspoError(
            f"{ckpt_dir / '.metadata'}: unreadable checkpoint metadata ({err})"
        ) from None
    needed: dict = {}  # data file -> bytes the metadata says it holds
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise GspoError(f"{path}: data file missing (the checkpoint's metadata refers to it)")
        size = path.stat().st_size
        if size < end:
            raise GspoError(
                f"{path}: truncated: {size} bytes, the checkpoint's metadata needs {end}"
            )
    try:
        json.loads((ckpt_dir / "metadata.json").read_text())
    except (OSError, ValueError) as err:
        raise GspoError(f"{ckpt_dir / 'metadata.json'}: not valid JSON ({err})") from None
    if not zipfile.is_zipfile(ckpt_dir / "common.pt"):
        raise GspoError(f"{ckpt_dir / 'common.pt'}: missing, truncated or not a torch.save file")


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict in the checkpoint's key space (no TE extra state)."""
    # A copy: megatron stores the current data-parallel group into the dict it is given, and a
    # shared one would carry a stale group into a later layout of the same process.
    mapping = hf_mapping(spec_of_model(model))
    sharded = model.sharded_state_dict(metadata=dict(mapping.SHARDED_METADATA))
    out = {}
    for name, value in sharded.items():
        if name.endswith("_extra_state"):
            continue  # TE fp8 metadata / None for local modules: not model weights
        if hasattr(value, "key"):
            value.key = mapping.canonical_key(value.key)
        out[name] = value
    return out


def load_model_checkpoint(model, ckpt_dir: Path, expected: ModelSpec) -> None:
    """Fill ``model`` (this rank's part) from ``ckpt_dir``; every rank must call this."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    check_same_shapes(expected, checkpoint_spec(ckpt_dir), str(ckpt_dir))
    sharded = model_sharded_state_dict(model)
    _check_tensor_shapes(ckpt_dir, sharded)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    # megatron merges the checkpoint's common (non-sharded) state into what it returns: in a
    # training checkpoint that is the optimizer's, the scheduler's and the step, none of which
    # a model has. Only the model's own keys are model state.
    state = {k: v for k, v in state.items() if k in sharded}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise GspoError(
            f"{ckpt_dir}: checkpoint does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _check_tensor_shapes(ckpt_dir: Path, sharded: dict) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    except Exception as err:
        raise GspoError(
            f"{ckpt_dir / '.metadata'}: unreadable checkpoint metadata ({err})"
        ) from None
    for value in sharded.values():
        keys = []
        if isinstance(value, ShardedTensor):
            keys = [(value.key, value.global_shape)]
        elif isinstance(value, ShardedTensorFactory):
            keys = [(value.key + "_w", None), (value.key + "_v", None)]
        for key, shape in keys:
            if key not in metadata:
                raise GspoError(
                    f"{ckpt_dir}: tensor '{key}' not in checkpoint (another model shape?)"
                )
            if shape is not None and tuple(metadata[key].size) != tuple(shape):
                raise GspoError(
                    f"{ckpt_dir}: tensor '{key}' has shape {list(metadata[key].size)}, "
                    f"the model expects {list(shape)} (another model shape)"
                )
