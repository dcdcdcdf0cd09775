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
``step_N`` and rewrites ``latest`` through a temporary file and a rename. Only a directory named
exactly ``step_N`` is a checkpoint; a ``.partial`` left by a killed run is never loaded and is
removed by the next save. A resume continues from the newest complete checkpoint (``latest``
names it; a run killed between the rename and the pointer update leaves a newer one, which
wins), after checking its files against its metadata; a corrupt one is refused with the newest
intact older one named, for ``--resume-from``. Pruning keeps the ``keep`` newest checkpoints up
to the one just written and never that one.

The optimizer state uses megatron's ``dp_reshardable`` layout for the distributed optimizer
(fully parallel save and load, no gather on one rank). RNG states are per rank and restored
when the world size is unchanged.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from gspo_megatron.checkpoint.atomic import (
    TMP_MARK,
    atomic_write_text,
    check_free_space,
    tree_bytes,
)
from gspo_megatron.checkpoint.model import HF_SUBDIR, checkpoint_spec, model_sharded_state_dict
from gspo_megatron.errors import GspoError, TrainingStopped
from gspo_megatron.models.qwen3 import hf_mapping
from gspo_megatron.optim import unwrap

CHECKPOINTS = "checkpoints"
"""Subdirectory of train.output_dir holding the checkpoints."""
LATEST = "latest"
PARTIAL = ".partial"
ABANDONED = ".abandoned"
"""Suffix of checkpoints set aside by ``--resume-from`` an older one (kept, never loaded)."""
TRAINER_STATE = "trainer_state.json"
"""The step, for people; its presence marks a training (not a model) checkpoint."""
_STEP_DIR = re.compile(r"step_(\d+)")
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}

# megatron is imported inside the functions that save and load: the pre-flight finds the
# checkpoint to resume from through this module and must not load megatron.


@dataclass
class TrainState:
    step: int = 0
    """RL steps completed; the data position is a function of it (``data.PromptSet.batch``)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """N for a directory named ``step_N`` (a complete checkpoint's name), else None."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if checkpoint_step(p) is not None and p.is_dir() and (p / "metadata.json").is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    done = complete_checkpoints(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return done[-1] if done else None  # killed before the first pointer was written
    name = pointer.read_text().strip()
    path = root / name
    if checkpoint_step(path) is None or path not in done:
        hint = (
            f" (complete checkpoints here: {', '.join(p.name for p in done)}; pass "
            f"--resume-from DIR to choose one)"
            if done
            else ""
        )
        raise GspoError(
            f"{pointer} names '{name}', which is not a complete checkpoint under {root}{hint}"
        )
    # A run killed between renaming step_N into place and rewriting the pointer.
    return done[-1] if checkpoint_step(done[-1]) > checkpoint_step(path) else path


def resume_point(
    root: Path, resume: bool, resume_from: Optional[Path], output_dir: str
) -> Optional[Path]:
    """The checkpoint a run continues from, checked on disk (pre-flight: reads metadata only).

    Without ``resume`` an output directory that holds any checkpoint is refused: a fresh run
    there would prune the old run's checkpoints. ``resume_from`` chooses a checkpoint
    explicitly: one under ``root``, or any checkpoint when ``root`` holds none (a new run
    continuing another's state)."""
    root = Path(root)
    done = complete_checkpoints(root)
    if not resume:
        if done or (root / LATEST).exists():
            names = ", ".join(p.name for p in done) or (root / LATEST).name
            raise GspoError(
                f"train.output_dir={output_dir} already holds a run ({names}): pass "
                f"--resume to continue it (or --resume-from DIR for a chosen "
                f"checkpoint), or choose another train.output_dir"
            )
        return None
    if resume_from is not None:
        resume_from = Path(resume_from)
        inside = resume_from.resolve().parent == root.resolve()
        if done and not inside:
            raise GspoError(
                f"--resume-from {resume_from}: train.output_dir={output_dir} holds "
                f"another run's checkpoints ({done[-1].name}); choose one of them or "
                f"another train.output_dir"
            )
        if inside and checkpoint_step(resume_from) is None:
            raise GspoError(
                f"--resume-from {resume_from}: not one of the run's checkpoints "
                f"(step_N directories; a .partial or .abandoned one is not loaded)"
            )
        checkpoint_spec(resume_from)  # a complete checkpoint: every file its metadata names
        if not (resume_from / TRAINER_STATE).is_file():
            raise GspoError(
                f"--resume-from {resume_from}: not a training checkpoint (no "
                f"{TRAINER_STATE}; a model checkpoint goes in model.ckpt)"
            )
        return resume_from
    target = latest_checkpoint(root)
    if target is None:
        return None
    try:
        checkpoint_spec(target)
    except GspoError as err:
        older = next(
            (
                p
                for p in reversed(done)
                if checkpoint_step(p) < checkpoint_step(target) and _intact(p)
            ),
            None,
        )
        hint = (
            f"; the newest intact older checkpoint is {older}: pass --resume-from {older} "
            f"to continue from it"
            if older
            else "; no older complete checkpoint exists"
        )
        raise GspoError(f"cannot resume from {target.name}: {err}{hint}") from None
    return target


def _intact(path: Path) -> bool:
    try:
        checkpoint_spec(path)
        return True
    except GspoError:
        return False


def set_aside_newer(root: Path, resumed: Path) -> List[Path]:
    """After ``--resume-from`` an older checkpoint of this run: rename the newer ones to
    ``step_N.abandoned`` (kept for the user, never loaded or pruned) and point ``latest`` at
    the one resumed, so that a later ``--resume`` continues this run's line. Rank 0 only."""
    root = Path(root)
    if Path(resumed).resolve().parent != root.resolve():
        return []
    step = checkpoint_step(resumed)
    moved = []
    for path in complete_checkpoints(root):
        if checkpoint_step(path) > step:
            dest = path.with_name(path.name + ABANDONED)
            n = 1
            while dest.exists():
                dest, n = path.with_name(f"{path.name}{ABANDONED}{n}"), n + 1
            os.replace(path, dest)
            moved.append(dest)
    atomic_write_text(root / LATEST, Path(resumed).name + "\n")
    return moved


def estimate_checkpoint_bytes(spec, dtype: str, hf_dir: Path) -> int:
    """Bytes of one training checkpoint: the weights in the parameter dtype plus the optimizer's
    fp32 master weights and two Adam moments (12 bytes per parameter), the copy of ``hf_dir``
    (config, tokenizer) and 1 MiB of metadata. (The tiny demo model: 10.8 MB written, 11.6 MB
    estimated.)"""
    numel = sum(math.prod(m.mcore_shape) for m in hf_mapping.tensor_mappings(spec))
    param_bytes = 2 if dtype == "bf16" else 4  # "auto" is bf16 on GPU: 4 is the safe side
    return numel * (param_bytes + 12) + tree_bytes(hf_dir) + (1 << 20)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
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
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIM_METADATA
        ),
        "scheduler": scheduler.state_dict(),
        "train_state": {"step": state.step, "world_size": world},
        # One object per rank (shape = world): each rank restores its own generators.
        "rng": ShardedObject(
            f"rng_state_world{world}", _rng_state(), (world,), (_rank(),), replica_id=0
        ),
    }


def save_checkpoint(
    root: Path,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    hf_source: Path,
    keep: int,
    needed_bytes: int = 0,
    saver=None,
) -> Path:
    """Write ``root/step_N`` atomically (collective) and point ``latest`` at it; keep it and the
    ``keep - 1`` newest complete checkpoints before it. Returns the checkpoint directory.

    ``needed_bytes``: the space a checkpoint takes (the previous one's size when there is one):
    checked before anything is written. A save that cannot be completed (no space, a write
    error) stops the run with one line, the partial directory removed and the last complete
    checkpoint untouched. ``saver`` (an ``async_save.AsyncSaver``): the files are written in the
    background and the checkpoint completes at a later ``saver.poll()`` or ``saver.finish()``
    (a save still in flight is finished first)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    if saver is not None:
        saver.finish()
    final = root / step_dir_name(state.step)
    partial = root / (final.name + PARTIAL)
    _start(root, final, partial, needed_bytes)
    try:
        _forked_results_queue()
        request = dist_checkpointing.save(
            _sharded_state(model, optimizer, scheduler, state, is_loading=False),
            str(partial),
            async_sharded_save=saver is not None,
        )
    except BaseException as err:
        _failed(err, root, final, partial)
    if saver is None:
        _complete(root, final, partial, hf_source, state.step, keep)
    else:
        saver.schedule(
            request,
            lambda: _complete(root, final, partial, hf_source, state.step, keep),
            lambda err: _failed(err, root, final, partial),
        )
    return final


def _start(root: Path, final: Path, partial: Path, needed_bytes: int) -> None:
    """Rank 0 clears killed writers' leftovers, checks the space and makes the partial
    directory; every rank learns whether the save can go ahead."""
    problem = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        done = complete_checkpoints(root)
        try:
            check_free_space(
                root,
                max(needed_bytes, tree_bytes(done[-1]) if done else 0),
                f"checkpoint {final.name}",
            )
            partial.mkdir()
        except (GspoError, OSError) as err:
            problem = str(err)
    problem = _agree(problem)
    if problem is not None:
        raise TrainingStopped(f"{problem}; {last_complete_note(root)}")


def _complete(
    root: Path, final: Path, partial: Path, hf_source: Path, step: int, keep: int
) -> None:
    """Once every rank's files are written: the HF config and tokenizer, the step, fsync, then
    the rename that makes the checkpoint complete, ``latest``, pruning (collective)."""
    try:
        _barrier()
        if _rank() == 0:
            (partial / HF_SUBDIR).mkdir(exist_ok=True)
            for f in Path(hf_source).iterdir():
                if f.is_file():
                    shutil.copy2(f, partial / HF_SUBDIR / f.name)
            (partial / TRAINER_STATE).write_text(json.dumps({"step": step}) + "\n")
            _fsync_tree(partial)
    except BaseException as err:
        _failed(err, root, final, partial)
    if _rank() == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep, final)
    _barrier()


def _failed(err: BaseException, root: Path, final: Path, partial: Path) -> None:
    """A save that broke: the partial directory goes; write errors become one line."""
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "CheckpointException":
        raise TrainingStopped(
            f"writing checkpoint {final} failed ({_first_line(err)}); {last_complete_note(root)}"
        ) from None
    raise err


def _forked_results_queue() -> None:
    """megatron's file writer collects its results through a multiprocessing Manager queue that
    it starts, once per process, with the spawn method: a fresh interpreter that re-imports the
    trainer's main module (torch and all, 3.6 s measured on the first checkpoint of the demo).
    A forked manager starts in milliseconds; megatron forks its writer processes anyway. Set
    only while megatron has none yet (its module global; left alone if a version lacks it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        manager = multiprocessing.get_context("fork").Manager()
        filesystem_async._results_queue = manager.Queue()


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, on every rank (a save is collective: all go ahead or none)."""
    if not dist.is_initialized():
        return problem
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def last_complete_note(root: Path) -> str:
    """'the last complete checkpoint is ...', for messages of a run that has to stop."""
    try:
        last = latest_checkpoint(root)
    except GspoError:
        last = None
    return (
        f"the last complete checkpoint is {last}"
        if last is not None
        else "no complete checkpoint was written yet"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _remove_leftovers(root: Path) -> None:
    """A killed run's ``.partial`` directories and half-written pointer files: never loaded,
    only taking space."""
    for path in root.iterdir():
        if path.name.endswith(PARTIAL) and path.is_dir():
            print(f"checkpoints: removing {path} (left by an interrupted save)", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
        elif TMP_MARK in path.name and path.is_file():
            path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """Data on disk before the rename that makes it visible (a power loss must not leave a
    complete-looking directory of empty files)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep ``current`` (just written) and the ``keep - 1`` newest checkpoints before it. Only
    older checkpoints are ever removed, whatever the directory holds."""
    older = [p for p in complete_checkpoints(root) if checkpoint_step(p) < checkpoint_step(current)]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer over torch's Adam (no apex / TE, as on CPU) has no state,
    and its state_dict() then fails on the missing Adam 'step'. Create the state the way
    megatron does for FSDP loads (one zero-gradient step); the load overwrites all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if (
            isinstance(opt, DistributedOptimizer)
            and not opt.is_stub_optimizer
            and len(opt.optimizer.state) == 0
        ):
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
        raise GspoError(
            f"{path}: checkpoint does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():  # fp32 params: the main params are views of the (leaf) model params
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return TrainState(step=int(loaded["train_state"]["step"]))
