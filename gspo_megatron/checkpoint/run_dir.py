"""A run's checkpoint directory: which checkpoints it holds, which one a run resumes from,
what pruning may delete. Reads directories and metadata only (no megatron, no model): the
pre-flight finds the checkpoint to resume from through this module.

Layout under ``<output_dir>/checkpoints``::

    step_000040/          megatron-core distributed checkpoint (torch_dist) + hf/ (config,
                          tokenizer: the directory is also a model checkpoint for
                          gspo-convert mcore-to-hf or another run's model.ckpt)
    step_000040/trainer_state.json   the step and data position, for people
    latest                the name of the newest complete checkpoint

Only a directory named exactly ``step_N`` (with its ``metadata.json``) is a checkpoint; a
``.partial`` left by a killed save is never loaded and is removed by the next save. A resume
continues from the newest complete checkpoint (``latest`` names it; a run killed between the
rename and the pointer update leaves a newer one, which wins), after checking its files against
its metadata; a corrupt one is refused with the newest intact older one named, for
``--resume-from``. Pruning keeps the ``keep`` newest checkpoints up to the one just written and
never that one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from gspo_megatron.checkpoint.atomic import TMP_MARK, atomic_write_text, tree_bytes
from gspo_megatron.checkpoint.model import checkpoint_spec
from gspo_megatron.errors import GspoError
from gspo_megatron.models import hf_mapping

CHECKPOINTS = "checkpoints"
"""Subdirectory of train.output_dir holding the checkpoints."""
LATEST = "latest"
PARTIAL = ".partial"
ABANDONED = ".abandoned"
"""Suffix of checkpoints set aside by ``--resume-from`` an older one (kept, never loaded)."""
TRAINER_STATE = "trainer_state.json"
"""The step, world size and optimizer format, for people and the pre-flight; its presence marks a
training (not a model) checkpoint."""
CONFIG_FILE = "config.yaml"
"""The resolved config of the run that wrote a checkpoint (inside it), or that started a run
(in train.output_dir, written once, never overwritten)."""
_STEP_DIR = re.compile(r"step_(\d+)")
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    step: int = 0
    """RL steps completed; the data position is a function of it (``data.PromptSet.batch``)."""


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json ({} when it has none or it cannot be read)."""
    try:
        record = json.loads((Path(ckpt) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def training_checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` (complete on disk) cannot be resumed from, None if it can: a training
    checkpoint has its trainer_state.json and the optimizer's state among its tensors. A model
    checkpoint has neither (``gspo-convert --overwrite`` into a run's ``step_N`` once made one
    that the resume then failed on, deep in megatron)."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = Path(ckpt)
    if not (ckpt / TRAINER_STATE).is_file():
        return (
            f"{ckpt}: not a training checkpoint (no {TRAINER_STATE}; a model checkpoint goes in "
            f"model.ckpt)"
        )
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if not any(k.startswith("optimizer.") for k in keys):
        return (
            f"{ckpt}: holds no optimizer state, so it is not a whole training checkpoint (a "
            f"model-only checkpoint was written over it, e.g. by gspo-convert --overwrite)"
        )
    return None


def check_not_in_a_run(out: Path, option: str = "--out") -> None:
    """Refuse a conversion's output that is, or would sit among, a run's training checkpoints:
    it would replace a run's trained weights and optimizer state (``--overwrite``), or be taken
    for the run's newest checkpoint by ``--resume``."""
    out = Path(out)
    if (out / TRAINER_STATE).is_file():
        raise GspoError(
            f"{option} {out}: a training checkpoint of a run ({TRAINER_STATE}); writing there "
            f"would replace its trained weights and optimizer state: choose another output"
        )
    parent = out.parent
    if parent.is_dir() and (
        (parent / LATEST).is_file()
        or any((p / TRAINER_STATE).is_file() for p in complete_checkpoints(parent))
    ):
        raise GspoError(
            f"{option} {out}: inside a run's checkpoint directory {parent}, where --resume would "
            f"take it for the run's own: choose another output"
        )


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
        problem = training_checkpoint_problem(resume_from)
        if problem is not None:
            raise GspoError(f"--resume-from {problem}")
        return resume_from
    target = latest_checkpoint(root)
    if target is None:
        return None
    try:
        checkpoint_spec(target)
        problem = training_checkpoint_problem(target)
        if problem is not None:
            raise GspoError(problem)
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
    except GspoError:
        return False
    return training_checkpoint_problem(path) is None


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
    numel = sum(math.prod(m.mcore_shape) for m in hf_mapping(spec).tensor_mappings(spec))
    param_bytes = 2 if dtype == "bf16" else 4  # "auto" is bf16 on GPU: 4 is the safe side
    return numel * (param_bytes + 12) + tree_bytes(hf_dir) + (1 << 20)


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


def remove_leftovers(root: Path) -> None:
    """A killed run's ``.partial`` directories and half-written pointer files: never loaded,
    only taking space."""
    for path in root.iterdir():
        if path.name.endswith(PARTIAL) and path.is_dir():
            print(f"checkpoints: removing {path} (left by an interrupted save)", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
        elif TMP_MARK in path.name and path.is_file():
            path.unlink(missing_ok=True)


def prune(root: Path, keep: int, current: Path) -> None:
    """Keep ``current`` (just written) and the ``keep - 1`` newest checkpoints before it. Only
    older checkpoints are ever removed, whatever the directory holds."""
    older = [p for p in complete_checkpoints(root) if checkpoint_step(p) < checkpoint_step(current)]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
