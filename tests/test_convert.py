"""gspo-convert: HF -> mcore -> HF is bitwise, and bad input gets one line and no output."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, score_cli
from safetensors import safe_open

from gspo_megatron.testing.hf_reference import hf_logprobs, max_abs_diff
from gspo_megatron.testing.tiny_model import (
    make_hf_model,
    tiny_dense_config,
    tiny_glm_config,
    tiny_moe_config,
    write_tokenizer,
)

CONVERT = str(Path(sys.executable).parent / "gspo-convert")


def _tensors(hf_dir: Path) -> dict:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


def _leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_roundtrip_is_bitwise_with_config_and_tokenizer(tmp_path, family, dtype):
    """GLM's checkpoint also holds an MTP layer the megatron model has not: it comes back too."""
    hf = tmp_path / "hf"
    config = {"qwen3_moe": tiny_moe_config, "glm4_moe": tiny_glm_config}[family]()
    make_hf_model(config, hf, dtype=dtype)
    if family == "glm4_moe":
        assert any(name.startswith("model.layers.4.") for name in _tensors(hf))
    write_tokenizer(hf)
    run_cli([CONVERT, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc")])
    # A small shard limit forces several shards and an index, as for a real model.
    run_cli(
        [
            CONVERT,
            "mcore-to-hf",
            "--ckpt",
            str(tmp_path / "mc"),
            "--out",
            str(tmp_path / "back"),
            "--max-shard-size",
            "100KB",
        ]
    )
    back = tmp_path / "back"
    assert (
        len(list(back.glob("*.safetensors"))) > 1
        and (back / "model.safetensors.index.json").is_file()
    )
    _assert_bitwise(_tensors(hf), _tensors(back))
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (hf / name).read_bytes() == (back / name).read_bytes(), name
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fixture", ["tiny_moe", "tiny_glm"])
def test_converted_back_model_loads_in_transformers_with_same_outputs(request, fixture, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = request.getfixturevalue(fixture)
    run_cli([CONVERT, "mcore-to-hf", "--ckpt", str(tiny.ckpt), "--out", str(tmp_path / "back")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert max_abs_diff(hf_logprobs(model, tiny.rows), tiny.reference) == 0.0
    assert AutoTokenizer.from_pretrained(tmp_path / "back").eos_token == "<eos>"


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


def test_unsupported_architecture(tmp_path):
    hf = tmp_path / "hf"
    make_hf_model(tiny_dense_config(), hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    line = _error_line(
        run_cli(
            [CONVERT, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "o")], check=False
        )
    )
    assert "unsupported architecture 'MixtralForCausalLM'" in line and "Qwen3MoeForCausalLM" in line
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def _sharded_hf(tmp_path) -> Path:
    """A HF model saved in several shards with an index, as released checkpoints are."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    make_hf_model(tiny_moe_config(), src)
    model = AutoModelForCausalLM.from_pretrained(src)
    hf = tmp_path / "hf"
    model.save_pretrained(hf, max_shard_size="100KB")
    assert (hf / "model.safetensors.index.json").is_file()
    return hf


def test_missing_shard_is_named(tmp_path):
    hf = _sharded_hf(tmp_path)
    victim = sorted(hf.glob("*.safetensors"))[1]
    victim.unlink()
    line = _error_line(
        run_cli(
            [CONVERT, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "o")], check=False
        )
    )
    assert victim.name in line and "missing" in line
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_truncated_shard_is_named(tmp_path):
    hf = _sharded_hf(tmp_path)
    victim = sorted(hf.glob("*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    line = _error_line(
        run_cli(
            [CONVERT, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "o")], check=False
        )
    )
    assert victim.name in line and "corrupt" in line
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(tiny_moe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    line = _error_line(
        run_cli(
            [CONVERT, "hf-to-mcore", "--hf-dir", str(tiny_moe.hf_dir), "--out", str(out)],
            check=False,
        )
    )
    assert "already exists" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "user data"
    run_cli(
        [CONVERT, "hf-to-mcore", "--hf-dir", str(tiny_moe.hf_dir), "--out", str(out), "--overwrite"]
    )
    assert not (out / "keep.txt").exists() and (out / "metadata.json").is_file()
    assert _leftovers(tmp_path) == []


def test_checkpoint_of_another_model_shape_is_refused(tiny_moe, tmp_path):
    """A checkpoint whose hf/config.json disagrees with its tensors (or with the model)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_moe.ckpt, ckpt)
    cfg = json.loads((ckpt / "hf" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (ckpt / "hf" / "config.json").write_text(json.dumps(cfg))
    line = _error_line(
        run_cli(
            [CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o")], check=False
        )
    )
    assert "another model shape" in line and "linear_fc1.weight_w" in line
    assert not (tmp_path / "o").exists()
    line = _error_line(score_cli(ckpt, tiny_moe.input, tmp_path / "s.jsonl", check=False))
    assert "another model shape" in line


def test_failure_mid_write_leaves_nothing(tiny_moe, tmp_path, monkeypatch):
    """A conversion that dies after some tensors were written leaves no output that looks valid."""
    from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from gspo_megatron.models import hf_mapping, spec_from_hf_dir

    mapping = hf_mapping(spec_from_hf_dir(tiny_moe.hf_dir))
    calls = {"n": 0}
    real = mapping.to_mcore

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full (injected)")
        return real(*args)

    monkeypatch.setattr(mapping, "to_mcore", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_mcore(tiny_moe.hf_dir, tmp_path / "o", show_progress=False)
    assert calls["n"] == 10
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def _copy_ckpt(tiny_moe, tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_moe.ckpt, ckpt)
    return ckpt


def _refused_up_front(tiny_moe, ckpt: Path, tmp_path) -> str:
    """mcore-to-hf and the score tool both refuse with the same line before reading a tensor."""
    line = _error_line(
        run_cli(
            [CONVERT, "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o")], check=False
        )
    )
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []
    score = _error_line(score_cli(ckpt, tiny_moe.input, tmp_path / "s.jsonl", check=False))
    assert score == line and not (tmp_path / "s.jsonl").exists()
    return line


def test_truncated_data_file_is_refused_up_front(tiny_moe, tmp_path):
    ckpt = _copy_ckpt(tiny_moe, tmp_path)
    victim = sorted(ckpt.glob("*.distcp"))[0]
    full = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(full // 2)  # as a copy cut short by a full disk leaves it
    line = _refused_up_front(tiny_moe, ckpt, tmp_path)
    assert line == (
        f"error: {victim}: truncated: {full // 2} bytes, the checkpoint's metadata needs {full}"
    )


def test_missing_data_file_is_refused_up_front(tiny_moe, tmp_path):
    ckpt = _copy_ckpt(tiny_moe, tmp_path)
    victim = sorted(ckpt.glob("*.distcp"))[0]
    victim.unlink()
    line = _refused_up_front(tiny_moe, ckpt, tmp_path)
    assert line.startswith(f"error: {victim}: data file missing"), line


def test_broken_common_files_are_named(tiny_moe, tmp_path):
    from gspo_megatron.checkpoint.model import check_checkpoint_files
    from gspo_megatron.errors import GspoError

    ckpt = _copy_ckpt(tiny_moe, tmp_path)
    check_checkpoint_files(ckpt)
    data = (ckpt / "common.pt").read_bytes()
    (ckpt / "common.pt").write_bytes(data[: len(data) - 30])
    with pytest.raises(GspoError, match=r"common.pt: missing, truncated or not a torch.save file"):
        check_checkpoint_files(ckpt)
    (ckpt / "common.pt").write_bytes(data)
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_di')
    with pytest.raises(GspoError, match=r"metadata.json: not valid JSON"):
        check_checkpoint_files(ckpt)
