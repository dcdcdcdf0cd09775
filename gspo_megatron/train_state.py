"""Training checkpoints: model, optimizer, LR schedule, RNG, data position and step, written so a
crash at any moment leaves either the previous complete checkpoint or the new one, never a
half-written directory that looks valid.

Layout under ``<output_dir>/checkpoints``::

    step_000040/          megatron-core distributed checkpoint (torch_dist) + hf/ (config,
                          tokenizer: the directory is also a model checkpoint for
                          gspo-convert mcore-to-hf or another run's model.ckpt)
    step_000040/trainer_state.json   the step and data position, for people
    latest                the name of the newest complete checkpoint

A save writes into ``step_N.partial`` (every rank its shards), then rank 0 renames it to
``step_N`` and rewrites ``latest`` through a temporary file and a rename. A resume reads
``latest`` and only ever names complete directories; a ``.partial`` left by a killed run is
ignored and removed by the next save.

The optimizer state uses megatron's ``dp_reshardable`` layout for the distributed optimizer
(fully parallel save and load, no gather on one rank). RNG states are per rank and restored
when the world size is unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from gspo_megatron.checkpoint import HF_SUBDIR, model_sharded_state_dict
from gspo_megatron.errors import GspoError
from gspo_megatron.fsutil import atomic_write_text
from gspo_megatron.optim import unwrap

LATEST = "latest"
PARTIAL = ".partial"
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    step: int = 0
    """RL steps completed; the data position is a function of it (``data.PromptSet.batch``)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith("step_") or PARTIAL in name or not (path / "metadata.json").is_file():
        raise GspoError(f"{pointer} names '{name}', which is not a complete checkpoint under {root}")
    return path


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, scheduler, state: TrainState, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    unwrapped = unwrap(model)
    model_sd = model_sharded_state_dict(unwrapped)
    world = _world()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                  metadata=OPTIM_METADATA),
        "scheduler": scheduler.state_dict(),
        "train_state": {"step": state.step, "world_size": world},
        # One object per rank (shape = world): each rank restores its own generators.
        "rng": ShardedObject(f"rng_state_world{world}", _rng_state(), (world,), (_rank(),),
                             replica_id=0),
    }


def save_checkpoint(root: Path, model, optimizer, scheduler, state: TrainState, hf_source: Path,
                    keep: int) -> Path:
    """Write ``root/step_N`` atomically (collective) and point ``latest`` at it; keep the newest
    ``keep`` complete checkpoints. Returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / step_dir_name(state.step)
    partial = root / (final.name + PARTIAL)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
        partial.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, state, is_loading=False),
                            str(partial))
    _barrier()
    if _rank() == 0:
        (partial / HF_SUBDIR).mkdir(exist_ok=True)
        for f in Path(hf_source).iterdir():
            if f.is_file():
                shutil.copy2(f, partial / HF_SUBDIR / f.name)
        (partial / "trainer_state.json").write_text(json.dumps({"step": state.step}) + "\n")
        _fsync_tree(partial)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _fsync_tree(path: Path) -> None:
    """Data on disk before the rename that makes it visible (a power loss must not leave a
    complete-looking directory of empty files)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and PARTIAL not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer over torch's Adam (no apex / TE, as on CPU) has no state,
    and its state_dict() then fails on the missing Adam 'step'. Create the state the way
    megatron does for FSDP loads (one zero-gradient step); the load overwrites all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.is_stub_optimizer \
                and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """torch's Adam keeps its step count per parameter; megatron's distributed optimizer saves it
    once per param group and restores it, but the dp_reshardable parameter state then copies the
    step of the placeholder state over it (1, from ``_materialise_optimizer_state``): Adam's bias
    correction would restart and the resumed run would drift from the uninterrupted one. Set the
    per-parameter steps from the (correctly loaded) group value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and (same world size) RNG from ``path`` (collective)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    world = _world()
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_world = int(common.get("train_state", {}).get("world_size", -1))
    _materialise_optimizer_state(optimizer)
    sharded = _sharded_state(model, optimizer, scheduler, TrainState(), is_loading=True)
    if saved_world != world:
        sharded.pop("rng")  # per-rank generators only mean something for the same ranks
    loaded = dist_checkpointing.load(sharded, str(path))
    unwrapped = unwrap(model)
    missing, unexpected = unwrapped.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise GspoError(f"{path}: checkpoint does not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():  # fp32 params: the main params are views of the (leaf) model params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return TrainState(step=int(loaded["train_state"]["step"]))
