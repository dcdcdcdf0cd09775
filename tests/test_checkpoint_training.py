"""Which checkpoint a run resumes from, and what pruning may delete: checked on directories laid
out as the trainer writes them (``step_N`` with ``metadata.json``), without a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from gspo_megatron.checkpoint.run_dir import (
    ABANDONED,
    LATEST,
    complete_checkpoints,
    latest_checkpoint,
    prune,
    set_aside_newer,
)
from gspo_megatron.errors import GspoError


def _ckpt(root: Path, step: int) -> Path:
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def _names(root: Path) -> list:
    return sorted(p.name for p in root.iterdir())


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """keep_checkpoints=1 with a stray newer checkpoint in the directory (a killed run's, an
    older line of this run): the one just written stays, and so does `latest`'s target."""
    for step in (1, 2, 9):
        _ckpt(tmp_path, step)
    current = _ckpt(tmp_path, 3)
    (tmp_path / LATEST).write_text(current.name + "\n")
    prune(tmp_path, keep=1, current=current)
    assert _names(tmp_path) == [LATEST, "step_000003", "step_000009"]
    prune(tmp_path, keep=1, current=current)  # idempotent
    assert (tmp_path / LATEST).read_text().strip() == "step_000003" and current.is_dir()


def test_pruning_keeps_the_newest_before_the_current_one(tmp_path):
    for step in (1, 2, 3, 4):
        _ckpt(tmp_path, step)
    (tmp_path / "step_000002.partial").mkdir()  # not a checkpoint: not pruning's business
    prune(tmp_path, keep=2, current=tmp_path / "step_000004")
    assert _names(tmp_path) == ["step_000002.partial", "step_000003", "step_000004"]


def test_steps_compare_as_numbers_not_names(tmp_path):
    """step_1000000 is newer than step_999999 although it sorts before it as a string."""
    _ckpt(tmp_path, 999999)
    big = tmp_path / "step_1000000"
    big.mkdir()
    (big / "metadata.json").write_text("{}")
    assert complete_checkpoints(tmp_path)[-1] == big
    prune(tmp_path, keep=1, current=big)
    assert _names(tmp_path) == ["step_1000000"]


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _ckpt(tmp_path, 1)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000001"  # no pointer written yet
    (tmp_path / LATEST).write_text("step_000001\n")
    _ckpt(tmp_path, 2)  # renamed into place, killed before the pointer was rewritten
    (tmp_path / "step_000003.partial").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    (tmp_path / LATEST).write_text("step_000007\n")
    with pytest.raises(GspoError, match="complete checkpoints here: step_000001, step_000002"):
        latest_checkpoint(tmp_path)


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path):
    for step in (1, 2, 3):
        _ckpt(tmp_path, step)
    (tmp_path / LATEST).write_text("step_000003\n")
    moved = set_aside_newer(tmp_path, tmp_path / "step_000001")
    assert [p.name for p in moved] == ["step_000002" + ABANDONED, "step_000003" + ABANDONED]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000001"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000001"]
    # An abandoned name is taken: the next one gets a number, nothing is overwritten.
    _ckpt(tmp_path, 2)
    assert [p.name for p in set_aside_newer(tmp_path, tmp_path / "step_000001")] == [
        "step_000002" + ABANDONED + "1"
    ]
