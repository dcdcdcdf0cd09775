"""gspo-eval: the same samples from an HF model and from its megatron checkpoint, from one
engine and from two, greedy samples equal to HF transformers' own greedy decoding; bad input is
one line before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, torchrun_cmd

REWARD = ["--rewards", "gspo_megatron.tasks.demo:copy_reward"]
SMALL = ["--max-new-tokens", "8", "--kv-cache-gib", "0.05"]


@pytest.fixture(scope="module")
def held_out(demo_init, tmp_path_factory) -> Path:
    """24 copy problems the demo model was not trained on (another seed)."""
    from gspo_megatron.tasks.demo import make_rows

    path = tmp_path_factory.mktemp("eval") / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24, 99, 16, 4)))
    return path


def _eval(model: Path, data: Path, out: Path, *extra, nproc: int = 1) -> dict:
    launch = torchrun_cmd(nproc) if nproc > 1 else [sys.executable]
    cmd = launch + ["-m", "gspo_megatron.evaluate", "--model", str(model), "--data", str(data)]
    cmd += REWARD + SMALL + ["--out", str(out)] + list(extra)
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("gspo-eval: 24 prompts x ")
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return {"rows": rows, "summary": json.loads((out / "summary.json").read_text())}


def _same(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    drop = ("model",)
    assert {k: v for k, v in a["summary"].items() if k not in drop} == {
        k: v for k, v in b["summary"].items() if k not in drop
    }


def test_hf_model_and_its_checkpoint_on_one_and_two_engines_sample_the_same(
    demo_init, held_out, tmp_path
):
    """Seeded sampling, 4 per prompt: the HF directory on one engine, the megatron checkpoint
    on two (each rank converts it and serves half the prompts)."""
    hf = _eval(demo_init / "mcore" / ".." / "hf", held_out, tmp_path / "a", "--k", "4")
    mc = _eval(demo_init / "mcore", held_out, tmp_path / "b", "--k", "4", nproc=2)
    _same(hf, mc)
    assert hf["summary"]["dtype"] == "fp32"  # auto on CPU without --config
    samples = [s for r in hf["rows"] for s in r["samples"]]
    assert len(samples) == 24 * 4 and len({s["response"] for s in samples}) > 24  # sampled
    rewards = [[s["reward"] for s in r["samples"]] for r in hf["rows"]]
    # Float sums of the same 96 rewards in another order: pytest.approx's default rel 1e-6.
    assert hf["summary"]["mean_reward"] == pytest.approx(sum(map(sum, rewards)) / 96)
    assert hf["summary"]["pass@1"] == pytest.approx(sum(x >= 1.0 for r in rewards for x in r) / 96)


def test_greedy_samples_equal_transformers_greedy_decoding(demo_init, held_out, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = _eval(demo_init / "mcore", held_out, tmp_path / "g", "--temperature", "0")
    hf_dir = demo_init / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for row in got["rows"]:
        ids = torch.tensor([tok.encode(row["prompt"], add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        [sample] = row["samples"]
        assert sample["response"] == want, row["prompt"]


def test_the_engine_precision_follows_the_training_config_unless_given(demo_init, tmp_path):
    """A run's own validation samples with its rollout engine's precision (rollout.dtype, auto:
    model.dtype); gspo-eval --config samples with the same one, so both give the same rows."""
    from gspo_megatron import evaluate

    config = (REPO / "launch" / "configs" / "tiny_cpu.yaml").read_text()
    data = demo_init / "train.jsonl"
    base = ["--model", str(demo_init / "hf"), "--data", str(data), "--out", str(tmp_path / "o")]
    base += SMALL

    def dtype(text: str, *extra: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return evaluate.plan(evaluate.parse_args(base + ["--config", str(path), *extra])).dtype

    assert dtype(config) == "fp32"  # model.dtype fp32, rollout.dtype auto
    bf16_engine = config.replace("rollout:\n", "rollout:\n  dtype: bf16\n")
    assert dtype(bf16_engine) == "bf16"
    assert dtype(bf16_engine, "--dtype", "fp32") == "fp32"
    assert dtype(config.replace("dtype: fp32", "dtype: bf16")) == "bf16"  # model.dtype
    no_config = evaluate.parse_args(base + ["--rewards", REWARD[1]])
    assert evaluate.plan(no_config).dtype == "auto"  # bf16 on GPU, fp32 on CPU at start-up


def _bad(argv, capsys) -> str:
    from gspo_megatron import evaluate

    def no_heavy_work(*args, **kwargs):
        raise AssertionError("the bad input got past the checks to the engine")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "run", no_heavy_work)
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/nonexistent"}, "--model /nonexistent: no such directory"),
        ({"--data": "/nonexistent.jsonl"}, "--data /nonexistent.jsonl: no such file"),
        ({"--k": "0"}, "--k 0: must be >= 1"),
        ({"--k": "8", "--n": "4"}, "--k 8 is more than the 4 samples per prompt"),
        ({"--temperature": "0", "--k": "2"}, "--temperature 0 (greedy) gives one response"),
        ({"--rewards": "nosuch"}, "--rewards='nosuch': not a built-in"),
        ({"--max-new-tokens": "200"}, "no room for a prompt in the model's max_position"),
        (
            {"--max-new-tokens": "8", "--max-prompt-tokens": "150"},
            "exceed the model's max_position_embeddings=128",
        ),
        ({"--k": "20000"}, "--n 20000: vLLM samples at most 16384 responses per prompt"),
    ],
)
def test_bad_input_is_one_line(demo_init, held_out, tmp_path, capsys, change, message):
    args = {"--model": str(demo_init / "hf"), "--data": str(held_out), "--out": str(tmp_path)}
    args.update({"--rewards": REWARD[1]}, **change)
    argv = [x for kv in args.items() for x in kv]
    assert message in _bad(argv, capsys)


def test_a_reward_needing_answers_on_data_without_them_is_one_line(demo_init, tmp_path, capsys):
    data = tmp_path / "no_answers.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w0"}) + "\n")
    argv = ["--model", str(demo_init / "hf"), "--data", str(data), "--rewards", "math"] + SMALL
    err = _bad(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "answer" in err and str(data) in err


def test_an_output_that_cannot_be_written_is_refused_before_sampling(
    demo_init, held_out, tmp_path, small_fs, capsys
):
    """--out a file, or on a read-only filesystem: one line before the engine starts (it used to
    sample and score everything and then lose it in a traceback)."""
    args = [
        "--model",
        str(demo_init / "hf"),
        "--data",
        str(held_out),
        "--rewards",
        REWARD[1],
    ] + SMALL
    a_file = tmp_path / "results"
    a_file.write_text("not a directory")
    err = _bad(args + ["--out", str(a_file)], capsys)
    assert err == f"error: --out={a_file}: {a_file} exists and is not a directory"
    read_only = small_fs(1)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    err = _bad(args + ["--out", str(read_only / "eval")], capsys)
    assert err.startswith(f"error: --out={read_only / 'eval'}: cannot write under {read_only}")


def test_the_sample_limit_is_vllms():
    """gspo-eval and the trainer's checks read vLLM's limit on samples per prompt without
    importing vLLM: it must be the value vLLM itself uses."""
    import vllm.envs

    from gspo_megatron.rollout.config import max_samples_per_prompt

    assert max_samples_per_prompt() == vllm.envs.VLLM_MAX_N_SEQUENCES
