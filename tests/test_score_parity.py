"""Megatron log-probs equal HF transformers' for tiny fp32 models of every family (Qwen3-MoE,
dense Qwen3, GLM-4.5-style MoE) under every parallel layout.

One converted checkpoint per model is scored in each layout, padded and packed (several rows end
to end in one, `--max-tokens-per-microbatch`, as training packs), under torchrun/gloo by the scoring
tool's own function (`gspo_megatron.score.score_rows`, through `tests/workers/score_worker.py`:
the layouts of one world size share a launch); the command line itself
(`python -m gspo_megatron.score`) runs under torchrun with two data-parallel ranks, where row
order is at stake. The reference is HF's forward of each row on its own with an fp64
log_softmax. Tolerance 1e-4 (fp32 accumulation order differs between layouts; the observed
differences are ~1e-6 on AVX2 and under ATEN_CPU_CAPABILITY=default: 100x margin, while a
wrong weight or position moves log-probs by ~1).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, BatchedRuns, score_cli

from gspo_megatron.testing.hf_reference import max_abs_diff, read_logprobs

TOL = 1e-4
PACK = 40
WORKER = str(REPO / "tests" / "workers" / "score_worker.py")

MOE_LAYOUTS = [
    ("single", 1, {}),
    ("TP2", 2, {"tp": 2}),
    ("PP2", 2, {"pp": 2}),
    ("EP2", 2, {"ep": 2}),
    ("EP2xETP2", 4, {"ep": 2, "etp": 2}),
    ("TP2xPP2", 4, {"tp": 2, "pp": 2}),
    ("EP2xPP2-split1,3", 4, {"ep": 2, "pp": 2, "pp_layers": [1, 3]}),
    ("TP2xEP2", 4, {"tp": 2, "ep": 2}),
    ("DP2xEP2", 4, {"ep": 2}),
    ("CP2", 2, {"cp": 2}),
    # Packed: rows of 3-26 tokens, 2-4 of them in a row of at most 40 tokens.
    ("packed", 1, {"max_tokens": PACK}),
    ("CP2-packed", 2, {"cp": 2, "max_tokens": PACK}),
    ("TP2xPP2-packed", 4, {"tp": 2, "pp": 2, "max_tokens": PACK}),
    ("DP2xEP2-packed", 4, {"ep": 2, "max_tokens": PACK}),
    ("CP2xEP2-packed", 4, {"cp": 2, "ep": 2, "max_tokens": PACK}),
]

DENSE_LAYOUTS = [
    ("single", 1, {}),
    ("TP2", 2, {"tp": 2}),
    ("PP2", 2, {"pp": 2}),
    ("TP2xPP2-split3,1", 4, {"tp": 2, "pp": 2, "pp_layers": [3, 1]}),
    ("CP2-packed", 2, {"cp": 2, "max_tokens": PACK}),
]


# GLM-4.5-style MoE (8 experts, grouped top-2, a shared expert, dense layer 0).
GLM_LAYOUTS = [
    ("single", 1, {}),
    ("TP2", 2, {"tp": 2}),
    ("PP2-split1,3", 2, {"pp": 2, "pp_layers": [1, 3]}),
    ("EP2", 2, {"ep": 2}),
    ("TP2xEP2", 4, {"tp": 2, "ep": 2}),
    ("TP2xPP2", 4, {"tp": 2, "pp": 2}),
    ("EP2xETP2", 4, {"ep": 2, "etp": 2}),
    ("CP2", 2, {"cp": 2}),
    ("packed", 1, {"max_tokens": PACK}),
    ("CP2xEP2-packed", 4, {"cp": 2, "ep": 2, "max_tokens": PACK}),
]


@pytest.fixture(scope="module")
def scored(tiny_moe, tiny_dense, tiny_glm, tmp_path_factory):
    cases = {}
    for kind, model, layouts in (
        ("moe", tiny_moe, MOE_LAYOUTS),
        ("dense", tiny_dense, DENSE_LAYOUTS),
        ("glm", tiny_glm, GLM_LAYOUTS),
    ):
        for name, nproc, layout in layouts:
            cases[f"{kind}-{name}"] = (
                nproc,
                {"ckpt": str(model.ckpt), "input": str(model.input), "layout": layout},
            )
    return BatchedRuns(
        WORKER,
        cases,
        tmp_path_factory.mktemp("score_runs"),
        lambda path: json.loads(path.read_text()),
    )


@pytest.mark.parametrize("name", [case[0] for case in MOE_LAYOUTS])
def test_moe_logprobs_match_hf(tiny_moe, scored, name):
    assert max_abs_diff(scored[f"moe-{name}"], tiny_moe.reference) <= TOL


@pytest.mark.parametrize("name", [case[0] for case in DENSE_LAYOUTS])
def test_dense_logprobs_match_hf(tiny_dense, scored, name):
    assert max_abs_diff(scored[f"dense-{name}"], tiny_dense.reference) <= TOL


@pytest.mark.parametrize("name", [case[0] for case in GLM_LAYOUTS])
def test_glm_logprobs_match_hf(tiny_glm, scored, name):
    assert max_abs_diff(scored[f"glm-{name}"], tiny_glm.reference) <= TOL


def test_score_cli_output_rows_in_input_order(tiny_moe, tmp_path):
    """The command line, two data-parallel ranks: rows come back in input order (each rank
    scores a length-sorted share), every one as long as its response and equal to HF's."""
    out = tmp_path / "out.jsonl"
    score_cli(tiny_moe.ckpt, tiny_moe.input, out, "--micro-batch-size", "2", nproc=2)
    got = read_logprobs(out)
    assert [len(x) for x in got] == [len(r) for _, r in tiny_moe.rows]
    assert max_abs_diff(got, tiny_moe.reference) <= TOL


def test_score_cli_packed_rows_under_context_parallelism(tiny_moe, tmp_path):
    """The command line with --cp 2 and packed rows: each row split over two ranks, several
    sequences per row, put back together in input order and equal to HF's."""
    out = tmp_path / "out.jsonl"
    extra = ["--cp", "2", "--max-tokens-per-microbatch", str(PACK)]
    score_cli(tiny_moe.ckpt, tiny_moe.input, out, *extra, nproc=2)
    got = read_logprobs(out)
    assert [len(x) for x in got] == [len(r) for _, r in tiny_moe.rows]
    assert max_abs_diff(got, tiny_moe.reference) <= TOL
    longest = max(len(p) + len(r) for p, r in tiny_moe.rows)
    small = ["--max-tokens-per-microbatch", str(longest - 1)]
    proc = score_cli(tiny_moe.ckpt, tiny_moe.input, tmp_path / "o.jsonl", *small, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --max-tokens-per-microbatch={longest - 1}: the longest row has {longest} "
        f"tokens (prompt + response); give at least that, or 0 for padded rows"
    )


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt_ids": [1, 2]}', "'response_ids' must be a list of token ids"),
        ('{"prompt_ids": [], "response_ids": [3]}', "'prompt_ids' is empty"),
        (
            '{"prompt_ids": [1], "response_ids": [9999]}',
            "token id 9999 outside the vocabulary [0, 250)",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_score_rejects_bad_rows_with_one_line(tiny_moe, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1], "response_ids": [2]}\n' + line + "\n")
    proc = score_cli(tiny_moe.ckpt, bad, tmp_path / "o.jsonl", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {bad}:2: ") and message in lines[-1], proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_score_rejects_layout_that_does_not_divide(tiny_moe, tmp_path):
    proc = score_cli(tiny_moe.ckpt, tiny_moe.input, tmp_path / "o.jsonl", "--ep", "3", check=False)
    assert proc.returncode == 2
    assert (
        "does not fit the world size" in proc.stderr
        or "num_experts=4 is not divisible by EP=3" in proc.stderr
    )
