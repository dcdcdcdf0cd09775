"""Megatron log-probs equal HF transformers' for tiny fp32 models under every parallel layout.

One converted checkpoint per model is scored by the real CLI (`python -m gspo_megatron.score`
under torchrun/gloo) in each layout; the reference is HF's forward of each row on its own with
an fp64 log_softmax. Tolerance 1e-4 (fp32 accumulation order differs between layouts; the
observed differences are ~1e-6).
"""

from __future__ import annotations

import pytest

from gspo_megatron.testing.hf_reference import max_abs_diff, read_logprobs
from conftest import run_cli

TOL = 1e-4

MOE_LAYOUTS = [
    ("single", 1, []),
    ("TP2", 2, ["--tp", "2"]),
    ("PP2", 2, ["--pp", "2"]),
    ("EP2", 2, ["--ep", "2"]),
    ("EP2xETP2", 4, ["--ep", "2", "--etp", "2"]),
    ("TP2xPP2", 4, ["--tp", "2", "--pp", "2"]),
    ("EP2xPP2-split1,3", 4, ["--ep", "2", "--pp", "2", "--pp-layers", "1,3"]),
    ("TP2xEP2", 4, ["--tp", "2", "--ep", "2"]),
    ("DP2xEP2", 4, ["--ep", "2"]),
]

DENSE_LAYOUTS = [
    ("single", 1, []),
    ("TP2", 2, ["--tp", "2"]),
    ("PP2", 2, ["--pp", "2"]),
    ("TP2xPP2-split3,1", 4, ["--tp", "2", "--pp", "2", "--pp-layers", "3,1"]),
]


def _score(model, tmp_path, nproc, layout_args):
    out = tmp_path / "out.jsonl"
    run_cli(["-m", "gspo_megatron.score", "--ckpt", str(model.ckpt), "--input", str(model.input),
             "--output", str(out), "--micro-batch-size", "2"] + layout_args, nproc=nproc)
    return read_logprobs(out)


@pytest.mark.parametrize("name,nproc,layout_args", MOE_LAYOUTS, ids=[l[0] for l in MOE_LAYOUTS])
def test_moe_logprobs_match_hf(tiny_moe, tmp_path, name, nproc, layout_args):
    got = _score(tiny_moe, tmp_path, nproc, layout_args)
    assert max_abs_diff(got, tiny_moe.reference) <= TOL


@pytest.mark.parametrize("name,nproc,layout_args", DENSE_LAYOUTS, ids=[l[0] for l in DENSE_LAYOUTS])
def test_dense_logprobs_match_hf(tiny_dense, tmp_path, name, nproc, layout_args):
    got = _score(tiny_dense, tmp_path, nproc, layout_args)
    assert max_abs_diff(got, tiny_dense.reference) <= TOL


def test_score_output_rows_in_input_order(tiny_moe, tmp_path):
    got = _score(tiny_moe, tmp_path, 0, [])
    assert [len(x) for x in got] == [len(r) for _, r in tiny_moe.rows]


@pytest.mark.parametrize("line,message", [
    ('{"prompt_ids": [1, 2]}', "'response_ids' must be a list of token ids"),
    ('{"prompt_ids": [], "response_ids": [3]}', "'prompt_ids' is empty"),
    ('{"prompt_ids": [1], "response_ids": [9999]}', "token id 9999 outside the vocabulary [0, 250)"),
    ('not json', "not valid JSON"),
])
def test_score_rejects_bad_rows_with_one_line(tiny_moe, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1], "response_ids": [2]}\n' + line + "\n")
    proc = run_cli(["-m", "gspo_megatron.score", "--ckpt", str(tiny_moe.ckpt), "--input", str(bad),
                    "--output", str(tmp_path / "o.jsonl")], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {bad}:2: ") and message in lines[-1], proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_score_rejects_layout_that_does_not_divide(tiny_moe, tmp_path):
    proc = run_cli(["-m", "gspo_megatron.score", "--ckpt", str(tiny_moe.ckpt), "--input",
                    str(tiny_moe.input), "--output", str(tmp_path / "o.jsonl"), "--ep", "3"],
                   check=False)
    assert proc.returncode == 2
    assert "does not fit the world size" in proc.stderr or "num_experts=4 is not divisible by EP=3" in proc.stderr
