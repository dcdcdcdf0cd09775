"""Training checkpoints: model, optimizer, LR schedule, RNG, data position and step, written so a
crash at any moment leaves either the previous complete checkpoint or the new one, never a
half-written directory that looks valid (the directory's layout, which checkpoint is complete
and which one a run resumes from: ``checkpoint.run_dir``).

A save writes into ``step_N.partial`` (every rank its shards), then rank 0 adds the HF config
and tokenizer, the step record and the run's config, fsyncs, renames it to ``step_N`` and
rewrites ``latest`` through a temporary file and a rename, then prunes. With
``train.async_save`` the file writes run in a forked process and that completion is a later
collective step (``checkpoint.async_save``).

The optimizer state is saved in the format ``checkpoint.optimizer_state`` describes (by default
one that any parallel layout can load). RNG states are per rank and restored when the world size
is unchanged.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from gspo_megatron.checkpoint.atomic import atomic_write_text, check_free_space, tree_bytes
from gspo_megatron.checkpoint.model import HF_SUBDIR, model_sharded_state_dict
from gspo_megatron.checkpoint.optimizer_state import (
    DP_RESHARDABLE,
    RESHARDABLE,
    fit_to_layout,
    keeping_adam_steps,
    materialise_optimizer_state,
    optim_metadata,
    restore_adam_steps,
)
from gspo_megatron.checkpoint.run_dir import (
    CONFIG_FILE,
    LATEST,
    PARTIAL,
    TRAINER_STATE,
    TrainState,
    complete_checkpoints,
    last_complete_note,
    prune,
    read_trainer_state,
    remove_leftovers,
    step_dir_name,
)
from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.errors import GspoError, TrainingStopped

# megatron is imported inside the functions that save and load: gspo-train imports this module
# before its pre-flight, which must answer without megatron's import time.


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


def _sharded_state(
    model, optimizer, scheduler, state: TrainState, is_loading: bool, optimizer_format: str
) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    unwrapped = unwrap(model)
    model_sd = model_sharded_state_dict(unwrapped)
    world = _world()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=optim_metadata(optimizer_format)
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
    optimizer_format: str = RESHARDABLE,
    config_text: Optional[str] = None,
    extra_files: Optional[dict] = None,
) -> Path:
    """Write ``root/step_N`` atomically (collective) and point ``latest`` at it; keep it and the
    ``keep - 1`` newest complete checkpoints before it. Returns the checkpoint directory.

    ``needed_bytes``: the space a checkpoint takes (the previous one's size when there is one):
    checked before anything is written. A save that cannot be completed (no space, a write
    error) stops the run with one line, the partial directory removed and the last complete
    checkpoint untouched. ``saver`` (an ``async_save.AsyncSaver``): the files are written in the
    background and the checkpoint completes at a later ``saver.poll()`` or ``saver.finish()``
    (a save still in flight is finished first). ``optimizer_format``: ``optimizer_state``'s
    RESHARDABLE (any layout can resume) or DP_RESHARDABLE. ``config_text``: the run's resolved
    config, kept in the checkpoint (``config.yaml``): what a resume compares its own with.
    ``extra_files``: name -> bytes written by rank 0 into the checkpoint before it completes
    (the rollout batches sampled ahead, ``rollout.source``)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    if saver is not None:
        saver.finish()
    final = root / step_dir_name(state.step)
    partial = root / (final.name + PARTIAL)
    _start(root, final, partial, needed_bytes)
    record = {"step": state.step, "world_size": _world(), "optimizer_format": optimizer_format}
    files = {TRAINER_STATE: json.dumps(record) + "\n"}
    if config_text is not None:
        files[CONFIG_FILE] = config_text
    files.update(extra_files or {})
    try:
        _forked_results_queue()
        writers_die_with_trainer()
        # Before the first optimizer step (nothing to train on yet) there is no Adam state.
        materialise_optimizer_state(optimizer)
        request = dist_checkpointing.save(
            _sharded_state(model, optimizer, scheduler, state, False, optimizer_format),
            str(partial),
            async_sharded_save=saver is not None,
        )
    except BaseException as err:
        _failed(err, root, final, partial)
    if saver is None:
        _complete(root, final, partial, hf_source, files, keep)
    else:
        saver.schedule(
            request,
            lambda: _complete(root, final, partial, hf_source, files, keep),
            lambda err: _failed(err, root, final, partial),
        )
    return final


def _start(root: Path, final: Path, partial: Path, needed_bytes: int) -> None:
    """Rank 0 clears killed writers' leftovers, checks the space and makes the partial
    directory; every rank learns whether the save can go ahead."""
    problem = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
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
    root: Path, final: Path, partial: Path, hf_source: Path, files: dict, keep: int
) -> None:
    """Once every rank's files are written: the HF config and tokenizer, ``files`` (the step
    record, the config), fsync, then the rename that makes the checkpoint complete, ``latest``,
    pruning (collective)."""
    try:
        _barrier()
        if _rank() == 0:
            (partial / HF_SUBDIR).mkdir(exist_ok=True)
            for f in Path(hf_source).iterdir():
                if f.is_file():
                    shutil.copy2(f, partial / HF_SUBDIR / f.name)
            for name, content in files.items():
                if isinstance(content, bytes):
                    (partial / name).write_bytes(content)
                else:
                    (partial / name).write_text(content)
            _fsync_tree(partial)
    except BaseException as err:
        _failed(err, root, final, partial)
    if _rank() == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep, final)
    _barrier()


def _failed(err: BaseException, root: Path, final: Path, partial: Path) -> None:
    """A save that broke: the partial directory goes; write errors become one line, naming the
    OS error (errno, text, file) where there is one."""
    written = (
        isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "CheckpointException"
    )
    cause = _os_error(err, partial) if written else None
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if written:
        raise TrainingStopped(
            f"writing checkpoint {final} failed ({cause or _first_line(err)}); "
            f"{last_complete_note(root)}"
        ) from None
    raise err


def _os_error(err: BaseException, partial: Path) -> Optional[str]:
    """The OS error behind a failed write: found in the exception (DCP wraps each rank's), or,
    where torch.save's C++ writer swallowed it ('unexpected pos', seen for a full disk and for
    the file-size limit, ulimit -f), asked of the OS again by extending the largest file this
    rank wrote. None if neither names one."""
    from gspo_megatron.checkpoint.dcp_io import root_cause

    seen, todo = set(), [err, root_cause(err)]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return str(e)
        todo += [e.__cause__, e.__context__]
    files = [f for f in partial.rglob("*") if f.is_file()] if partial.is_dir() else []
    if not files:
        return None
    largest = max(files, key=lambda f: f.stat().st_size)
    try:
        with open(largest, "ab") as f:
            f.write(b"\0" * (64 << 10))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return f"[Errno {probe.errno}] {probe.strerror}: '{largest}'"
    return None


def _forked_results_queue() -> None:
    """megatron's file writer collects its results through a multiprocessing Manager queue that
    it starts, once per process, with the spawn method: a fresh interpreter that re-imports the
    trainer's main module (torch and all, 3.6 s measured on the first checkpoint of the demo).
    A forked manager starts in milliseconds; megatron forks its writer processes anyway. Set
    only while megatron has none yet (its module global; left alone if a version lacks it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        from multiprocessing.managers import SyncManager

        from gspo_megatron.procutil import die_with_parent

        # It dies with the trainer: a SIGKILLed trainer (the OOM killer, a lost node) would
        # otherwise leave it behind, orphaned, for good (seen in the two-node fault tests).
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def writers_die_with_trainer() -> None:
    """megatron forks a process per write bucket (and, for an async save, the process that
    forks them); a trainer SIGKILLed mid-save left them writing into the checkpoint's partial
    directory, orphaned (seen in a clean-clone run of the fault tests). Each now asks for
    SIGKILL when the process that forked it dies, first thing in the child. Installed once per
    process; left alone if a megatron version lacks the two functions."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync as writer,
    )

    from gspo_megatron.procutil import die_with_parent

    trainer = os.getpid()
    for name in ("write_preloaded_data", "write_preloaded_data_multiproc"):
        fn = writer.__dict__.get(name)
        if not isinstance(fn, staticmethod) or getattr(fn.__func__, "_dies_with_parent", False):
            continue

        def guarded(*args, _fn=fn.__func__, **kwargs):
            if os.getpid() != trainer:  # a forked child (a sync save runs the second here)
                die_with_parent(os.getppid())
            return _fn(*args, **kwargs)

        guarded._dies_with_parent = True
        setattr(writer, name, staticmethod(guarded))


def _agree(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, on every rank (a save is collective: all go ahead or none)."""
    if not dist.is_initialized():
        return problem
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _fsync_tree(path: Path) -> None:
    """Data on disk before the rename that makes it visible (a power loss must not leave a
    complete-looking directory of empty files)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and (same world size) RNG from ``path`` (collective),
    in whatever layout the model was built (the optimizer's RESHARDABLE format; a checkpoint
    without a recorded format is DP_RESHARDABLE, as every one was before the format was). The
    optimizer's hyper-parameters (peak and minimum LR, betas, eps) are the ones it was built
    with, not the checkpoint's: a resume applies the config's (``resume_changes``)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    world = _world()
    optimizer_format = read_trainer_state(path).get("optimizer_format", DP_RESHARDABLE)
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_world = int(common.get("train_state", {}).get("world_size", -1))
    materialise_optimizer_state(optimizer)
    sharded = _sharded_state(model, optimizer, scheduler, TrainState(), True, optimizer_format)
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
    # fp32 params: the main params are views of the (leaf) model params.
    with torch.no_grad(), keeping_adam_steps(optimizer):
        optimizer.load_state_dict(fit_to_layout(optimizer, loaded["optimizer"]))
    restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        _set_rng_state(loaded["rng"])
    return TrainState(step=int(loaded["train_state"]["step"]))
