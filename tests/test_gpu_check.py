"""tools/gpu_check: its step runs on CPU at the demo's size (the same code the GPU run takes, so
it cannot rot unseen between GPU sessions), and the wrapper refuses a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_check  # noqa: E402

from gspo_megatron.flops import train_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_tiny_step_reports_the_tokens_and_flops_it_ran(tmp_path):
    out = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "step", "--tiny", "--seq", "48", "--batch", "2"]
        + ["--steps", "1", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    step = json.loads((tmp_path / "gpu_check.json").read_text())["step"]
    assert step["tokens"] == 2 * 48
    assert step["train_flops"] == train_flops(gpu_check.tiny_slice(48), [48, 48])
    # The same division of the reported figures, in float64 (tflops ~1e-3 on CPU).
    assert abs(step["tflops"] - step["train_flops"] / step["step_seconds"] / 1e12) < 1e-12
    assert "step tiny (demo)" in out.stdout


def test_the_30b_slice_has_qwen3_30b_a3b_shapes():
    """3.3B active parameters per token in the full 48 layers, as the model's name says (the
    experts' 8 of 128, attention, router; the embedding and LM head counted once each)."""
    spec = gpu_check.qwen3_30b_a3b_slice(48, 4096)
    h, q, kv = spec.hidden_size, 32 * 128, 4 * 128
    per_layer = h * (q + 2 * kv) + q * h + h * 128 + 8 * 3 * h * 768
    active = 48 * per_layer + 2 * spec.vocab_size * h
    assert 3.2e9 < active < 3.4e9


def test_the_wrapper_refuses_a_machine_without_a_gpu():
    if torch.cuda.is_available():
        return
    out = subprocess.run(
        ["bash", "tools/gpu_check.sh", "/tmp/unused"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("gpu_check: no CUDA GPU visible to torch")
