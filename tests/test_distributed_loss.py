"""The GSPO loss and every parameter's gradient are the same in every parallel layout.

Each layout runs `tests/workers/grad_worker.py` under torchrun/gloo on the tiny Qwen3-MoE: one
forward/backward through megatron's pipeline schedule with the loss on the last stage, megatron
DDP gradient reduction and finalisation, then all gradients gathered into full tensors. The
reference is the same computation in one process.

Tolerance (fp32): the layouts add the same terms in a different order (TP splits matmul
reductions and all-reduces partial sums; CP, DP and EP sum per-rank contributions), so gradients
agree to a few ulp of accumulated rounding: the observed worst case is ~2e-6 relative to a
tensor's largest entry. We assert 1e-4 relative (+1e-7 absolute): 50x margin, while any
normalisation error (a sequence counted twice, a per-shard mean) moves gradients by >= 1/16.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from gspo_megatron.testing.hf_reference import hf_logprobs
from gspo_megatron.testing.tiny_model import random_rows
from conftest import REPO, run_cli

WORKER = str(REPO / "tests" / "workers" / "grad_worker.py")

LAYOUTS = [
    ("TP2", 2, ["--tp", "2"]),
    ("PP2", 2, ["--pp", "2"]),
    ("CP2", 2, ["--cp", "2"]),
    ("EP2", 2, ["--ep", "2"]),
    ("DP2", 2, []),
    ("TP2xPP2", 4, ["--tp", "2", "--pp", "2"]),
    ("TP2xCP2", 4, ["--tp", "2", "--cp", "2"]),
    ("EP2xPP2", 4, ["--ep", "2", "--pp", "2"]),
    ("DP2xEP2", 4, ["--ep", "2"]),
]


@pytest.fixture(scope="module")
def samples_file(tiny_moe, tmp_path_factory):
    """Samples whose pi_old log-probs are HF's plus noise (the rollout-engine path), so ratios
    differ from 1 and some sequences are clipped."""
    rows = random_rows(8, seed=3)
    ref = hf_logprobs(tiny_moe.model, rows)
    rng = random.Random(0)
    out = [{"prompt_ids": p, "response_ids": r, "advantage": rng.gauss(0, 1),
            "old_logprobs": [x + rng.gauss(0, 0.003) for x in lp]} for (p, r), lp in zip(rows, ref)]
    path = tmp_path_factory.mktemp("samples") / "samples.json"
    path.write_text(json.dumps(out))
    return path


def _run(tiny_moe, samples_file, tmp_path, nproc, extra, name="out.pt"):
    out = tmp_path / name
    args = [WORKER, "--ckpt", str(tiny_moe.ckpt), "--samples", str(samples_file), "--out", str(out)] + extra
    run_cli(args, nproc=nproc if nproc > 1 else 0)
    return torch.load(out)


_single_cache = {}


def _single(tiny_moe, samples_file, tmp_path, extra):
    key = tuple(extra)
    if key not in _single_cache:
        _single_cache[key] = _run(tiny_moe, samples_file, tmp_path, 1, extra, "single.pt")
    return _single_cache[key]


def _assert_same(ref, got):
    for k in ("gspo/loss", "gspo/clip_fraction", "gspo/abs_log_ratio", "gspo/approx_kl", "train/entropy"):
        assert got["metrics"][k] == pytest.approx(ref["metrics"][k], rel=1e-5, abs=1e-7), k
    assert got["metrics"]["train/sequences"] == ref["metrics"]["train/sequences"]
    assert got["tensors"].keys() == ref["tensors"].keys()
    for key, g in ref["tensors"].items():
        diff = (got["tensors"][key] - g).abs().max().item()
        assert diff <= 1e-4 * g.abs().max().item() + 1e-7, (key, diff)


@pytest.mark.parametrize("name,nproc,extra", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_gspo_loss_and_gradients_match_single_process(tiny_moe, samples_file, tmp_path, name, nproc, extra):
    ref = _single(tiny_moe, samples_file, tmp_path, [])
    assert 0 < ref["metrics"]["gspo/clip_fraction"] < 1  # both clipped and unclipped sequences
    _assert_same(ref, _run(tiny_moe, samples_file, tmp_path, nproc, extra))


@pytest.mark.parametrize("variant,nproc,extra", [("grpo", 2, ["--cp", "2"]),
                                                 ("gspo_token", 4, ["--tp", "2", "--cp", "2"])])
def test_other_variants_match_single_process(tiny_moe, samples_file, tmp_path, variant, nproc, extra):
    flags = ["--variant", variant, "--clip-low", "0.002", "--clip-high", "0.003"]
    ref = _single(tiny_moe, samples_file, tmp_path, flags)
    _assert_same(ref, _run(tiny_moe, samples_file, tmp_path, nproc, extra + flags))


@pytest.mark.parametrize("name,nproc,extra", [("TP2", 2, ["--tp", "2"]), ("DP2", 2, [])])
def test_minibatch_updates_match_single_process(tiny_moe, samples_file, tmp_path, name, nproc, extra):
    """Old log-probs from a trainer forward, then 2 minibatch Adam steps (distributed optimizer,
    gradient clipping): same metrics per step and same weights after."""
    flags = ["--mode", "update", "--trainer-old-logprobs", "--num-minibatches", "2"]
    ref = _single(tiny_moe, samples_file, tmp_path, flags)
    got = _run(tiny_moe, samples_file, tmp_path, nproc, extra + flags)
    first, second = ref["metrics"]
    # pi_old is the trainer itself before the first step: the first ratio is exactly 1.
    assert first["gspo/abs_log_ratio"] == 0 and first["gspo/clip_fraction"] == 0
    assert second["gspo/abs_log_ratio"] > 0  # the policy moved within the rollout batch
    for a, b in zip(ref["metrics"], got["metrics"]):
        for k in ("gspo/loss", "train/grad_norm", "gspo/clip_fraction", "gspo/abs_log_ratio"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for key, w in ref["tensors"].items():
        # Adam divides by sqrt(v): fp32 reduction-order noise in tiny gradients shows up in the
        # update, so compare to the step size (lr 1e-3) rather than to the weights.
        assert (got["tensors"][key] - w).abs().max().item() <= 5e-5, key


def test_nonfinite_minibatch_is_skipped_and_leaves_no_trace(tiny_moe, tmp_path):
    """A minibatch whose loss is NaN (here: a NaN advantage) skips its optimizer step on every
    rank: the weights after [NaN minibatch, good minibatch] equal, bit for bit, those of an
    update that only ever saw the good minibatch (same Adam step count, same LR schedule)."""
    rows = sorted(random_rows(8, seed=5), key=lambda r: len(r[0]) + len(r[1]))
    rng = random.Random(1)
    # The longest row is in the good (second) minibatch, so both runs pad to the same length.
    samples = [{"prompt_ids": p, "response_ids": r, "advantage": rng.gauss(0, 1)} for p, r in rows]
    samples[1]["advantage"] = float("nan")
    both, good = tmp_path / "both.json", tmp_path / "good.json"
    both.write_text(json.dumps(samples))
    good.write_text(json.dumps(samples[4:]))
    flags = ["--mode", "update", "--trainer-old-logprobs"]
    got = _run(tiny_moe, both, tmp_path, 2, flags + ["--num-minibatches", "2"], "both.pt")
    ref = _run(tiny_moe, good, tmp_path, 2, flags + ["--num-minibatches", "1"], "good.pt")
    skipped, stepped = got["metrics"]
    assert skipped["train/skipped_steps"] == 1 and skipped["train/update_successful"] == 0
    assert stepped["train/skipped_steps"] == 0 and stepped["train/update_successful"] == 1
    assert stepped["gspo/loss"] == ref["metrics"][0]["gspo/loss"]
    for key, w in ref["tensors"].items():
        assert torch.isfinite(got["tensors"][key]).all(), key
        assert torch.equal(got["tensors"][key], w), key
