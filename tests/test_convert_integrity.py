"""gspo-convert cannot damage a run or a model without saying so: an output among a run's
training checkpoints is refused (it would replace trained weights and optimizer state, or be
resumed from), every source tensor must be used (a config.json describing fewer layers than the
weights would convert into a truncated model), config.json's fields are checked by type; and a
run whose newest checkpoint lost its optimizer state is not resumed from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
from gspo_megatron.checkpoint.mcore_to_hf import convert_mcore_to_hf
from gspo_megatron.checkpoint.run_dir import resume_point
from gspo_megatron.errors import GspoError


def _run_with_checkpoint(tiny_moe, root: Path, step: int = 3, trainer_state: bool = True) -> Path:
    """A run's checkpoint directory whose step_N holds ``tiny_moe``'s model-only checkpoint
    (with the trainer's step record unless ``trainer_state`` is False)."""
    ckpts = root / "run" / "checkpoints"
    ckpt = ckpts / f"step_{step:06d}"
    shutil.copytree(tiny_moe.ckpt, ckpt)
    if trainer_state:
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (ckpts / "latest").write_text(ckpt.name + "\n")
    return ckpt


def _files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_conversion_never_writes_into_a_runs_checkpoints(tiny_moe, tmp_path):
    ckpt = _run_with_checkpoint(tiny_moe, tmp_path)
    before = _files(ckpt)
    with pytest.raises(GspoError, match=r"a training checkpoint of a run \(trainer_state\.json\)"):
        convert_hf_to_mcore(tiny_moe.hf_dir, ckpt, overwrite=True, show_progress=False)
    beside = ckpt.parent / "step_000009"
    with pytest.raises(GspoError, match="inside a run's checkpoint directory"):
        convert_hf_to_mcore(tiny_moe.hf_dir, beside, show_progress=False)
    with pytest.raises(GspoError, match="inside a run's checkpoint directory"):
        convert_mcore_to_hf(tiny_moe.ckpt, ckpt.parent / "hf", show_progress=False)
    assert _files(ckpt) == before and not beside.exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["latest", ckpt.name]


@pytest.mark.parametrize(
    "trainer_state, why",
    [
        (False, "not a training checkpoint (no trainer_state.json"),
        (True, "holds no optimizer state, so it is not a whole training checkpoint"),
    ],
)
def test_a_checkpoint_without_its_optimizer_state_is_not_resumed(
    tiny_moe, tmp_path, trainer_state, why
):
    """A model-only checkpoint where the run's newest checkpoint was (as gspo-convert
    --overwrite once left it): --resume and --resume-from refuse it in one line, before any
    model is built."""
    ckpt = _run_with_checkpoint(tiny_moe, tmp_path, trainer_state=trainer_state)
    root = ckpt.parent
    with pytest.raises(GspoError) as err:
        resume_point(root, True, None, str(root.parent))
    assert str(err.value).startswith(f"cannot resume from {ckpt.name}: {ckpt}: {why}")
    assert str(err.value).endswith("no older complete checkpoint exists")
    with pytest.raises(GspoError, match=f"--resume-from {ckpt}: .*{why[:20]}"):
        resume_point(root, True, ckpt, str(root.parent))


def _edit_config(src: Path, dst: Path, config_path: str, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / config_path
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return dst


def test_every_source_tensor_must_be_used(tiny_moe, tmp_path):
    """config.json says 3 layers, the weights hold 4: refused naming a tensor of layer 3 (HF ->
    mcore), or of decoder layer 3 (mcore -> HF); nothing is written."""
    hf = _edit_config(tiny_moe.hf_dir, tmp_path / "hf3", "config.json", num_hidden_layers=3)
    with pytest.raises(GspoError) as err:
        convert_hf_to_mcore(hf, tmp_path / "out", show_progress=False)
    assert "tensor 'model.layers.3." in str(err.value)
    assert "is not part of the model config.json describes (3 layers" in str(err.value)
    mc = _edit_config(tiny_moe.ckpt, tmp_path / "mc3", "hf/config.json", num_hidden_layers=3)
    with pytest.raises(GspoError) as err:
        convert_mcore_to_hf(mc, tmp_path / "back", show_progress=False)
    assert "tensor 'decoder.layers.3." in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "back").exists()


@pytest.mark.parametrize(
    "field, value, want",
    [
        ("hidden_size", "64", 'hidden_size="64" must be an integer'),
        ("num_local_experts", 4.0, "num_local_experts=4.0 must be an integer"),
        ("num_hidden_layers", True, "num_hidden_layers=true must be an integer"),
        ("rms_norm_eps", "1e-6", 'rms_norm_eps="1e-6" must be a number'),
        ("tie_word_embeddings", "false", 'tie_word_embeddings="false" must be true or false'),
        ("vocab_size", -250, "vocab_size=-250 must be a non-negative integer"),
    ],
)
def test_config_fields_are_checked_by_type(tiny_moe, tmp_path, field, value, want):
    hf = _edit_config(tiny_moe.hf_dir, tmp_path / "hf", "config.json", **{field: value})
    with pytest.raises(GspoError) as err:
        convert_hf_to_mcore(hf, tmp_path / "out", show_progress=False)
    assert str(err.value) == f"{hf / 'config.json'}: {want}"
