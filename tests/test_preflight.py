"""gspo-train's pre-flight: every bad input (config values, files, tokenizer, data rows, the
output directory, the checkpoint a resume would continue from) is one line and exit status 2,
before any process group, model or engine exists (the Trainer, where those are made, is
replaced by a function that fails the test if it is reached)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import train_runs as tr
from conftest import REPO


def _main(argv, monkeypatch, capsys, world: int = 1) -> str:
    from gspo_megatron import train

    def no_heavy_work(plan):
        raise AssertionError("the bad input got past the pre-flight checks to the Trainer")

    # The Trainer is where process groups, models and engines are made: it must not be reached.
    monkeypatch.setattr(train, "Trainer", no_heavy_work)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture()
def good(demo_init, tmp_path):
    return ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(
        demo_init, tmp_path / "o"
    )


def test_missing_dataset_file(good, monkeypatch, capsys, tmp_path):
    err = _main(good + [f"data.path={tmp_path / 'nope.jsonl'}"], monkeypatch, capsys)
    assert "nope.jsonl" in err and "data" in err


def test_dataset_without_the_configured_field(good, monkeypatch, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "w1 w2 w0", "answer": "w1 w2"}\n')
    err = _main(good + [f"data.path={data}"], monkeypatch, capsys)
    assert (
        f"{data}:1: no field 'prompt' (data.prompt_field; this line has: question, answer)" in err
    )


def test_unknown_key_and_wrong_type(good, monkeypatch, capsys):
    err = _main(good + ["train.stpes=3"], monkeypatch, capsys)
    assert "unknown config key 'train.stpes'" in err and "steps" in err
    err = _main(good + ["optim.lr=fast"], monkeypatch, capsys)
    assert "optim.lr='fast': expected a number" in err


def test_layout_that_does_not_fit_the_world(good, monkeypatch, capsys):
    err = _main(good + ["parallel.tp=2"], monkeypatch, capsys, world=3)
    assert "world size 3" in err and "TP2" in err


def test_samples_that_do_not_split_over_ranks(good, monkeypatch, capsys):
    err = _main(
        good + ["train.prompts_per_step=2", "rollout.group_size=3", "loss.num_minibatches=2"],
        monkeypatch,
        capsys,
        world=2,
    )
    assert "= 6 samples do not split over 2 data-parallel ranks x loss.num_minibatches=2" in err


def test_existing_run_needs_resume(multinode_run, demo_init, monkeypatch, capsys):
    argv = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(
        demo_init, multinode_run
    )
    err = _main(argv, monkeypatch, capsys)
    assert "already holds a run" in err and "--resume" in err


def test_torn_latest_pointer_is_refused(tmp_path):
    from gspo_megatron.checkpoint.run_dir import latest_checkpoint
    from gspo_megatron.errors import GspoError

    (tmp_path / "step_000003.partial").mkdir()
    (tmp_path / "latest").write_text("step_000003.partial\n")
    with pytest.raises(GspoError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_000002\n")  # pointer to a directory that is gone
    with pytest.raises(GspoError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "none") is None


# -- degenerate settings, non-finite values -----------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.group_size=1", "rollout.group_size=1: advantages are normalised within a group"),
        ("rollout.temperature=0", "rollout.temperature=0 is greedy decoding"),
        ("train.eval_k=0", "train.eval_k=0 >= 1"),
        ("optim.adam_beta1=1.0", "optim.adam_beta1=1.0 must be in [0, 1)"),
        ("optim.adam_beta2=-0.1", "optim.adam_beta2=-0.1 must be in [0, 1)"),
        ("optim.adam_eps=0", "optim.adam_eps=0.0 must be > 0"),
        ("optim.grad_bucket_elements=-1", "optim.grad_bucket_elements=-1 must be >= 0"),
        ("optim.grad_bucket_elements=1000", "needs optim.overlap_grad_reduce: true"),
        ("optim.lr=.nan", "config optim.lr=nan: expected a finite number"),
        ("optim.lr=.inf", "config optim.lr=inf: expected a finite number"),
        ("optim.clip_grad=nan", "config optim.clip_grad='nan': expected a finite number"),
        ("rewards.timeout_s=1e999", "config rewards.timeout_s='1e999': expected a finite number"),
        ("loss.clip_high=-.inf", "config loss.clip_high=-inf: expected a finite number"),
        ("rewards.functions=[{name: exact_match, weight: 0}]", "every weight is 0"),
        ("train.max_skipped_steps=0", "train.max_skipped_steps=0 must be >= 1"),
        ("train.collective_timeout_s=0", "train.collective_timeout_s=0.0 must be > 0"),
        ("rollout.max_new_tokens=1000", "= 1016 exceeds the model's max_position_embeddings=128"),
        # objectives and rollout correction
        ("loss.variant=ppo", "loss.variant='ppo' (allowed: gspo, gspo_token, grpo, sapo, cispo)"),
        (
            "loss.rollout_correction=seq_tis",
            "loss.rollout_correction='seq_tis' (allowed: none, tis, mis, icepop)",
        ),
        ("loss.correction_cap=0", "loss.correction_cap=0.0 must be > 0"),
        (
            "loss.correction_low=3",
            "loss.correction_low=3.0 and loss.correction_high=2.0: need 0 <= low <= high",
        ),
        ("loss.rollout_correction=icepop", "icepop masks token terms, but loss.variant=gspo"),
        (
            ("loss.rollout_correction=tis", "loss.old_logprobs=rollout"),
            "loss.old_logprobs=rollout makes them the same (rho = 1)",
        ),
        ("loss.sapo_tau_neg=0", "loss.sapo_tau_neg=0.0 must be > 0"),
        # padding-free micro-batches
        ("loss.max_tokens_per_microbatch=-1", "loss.max_tokens_per_microbatch=-1 must be >= 0"),
        (
            "loss.max_tokens_per_microbatch=20",
            "loss.max_tokens_per_microbatch=20 is less than a sample can be (rollout."
            "max_prompt_tokens + rollout.max_new_tokens = 24)",
        ),
        (
            ("loss.max_tokens_per_microbatch=64", "model.moe_aux_loss_coeff=0.01"),
            "loss.max_tokens_per_microbatch=64 packs a varying number of sequences",
        ),
        (
            ("loss.variant=cispo", "model.moe_aux_loss_coeff=0.01"),
            "loss.variant=cispo normalises by tokens",
        ),
    ],
)
def test_degenerate_or_non_finite_settings(good, monkeypatch, capsys, override, message):
    overrides = [override] if isinstance(override, str) else list(override)
    assert message in _main(good + overrides, monkeypatch, capsys)


def _model_copy(demo_init, tmp_path) -> Path:
    ckpt = tmp_path / "model"
    shutil.copytree(demo_init / "mcore", ckpt)
    return ckpt


def test_checkpoint_without_tokenizer_files(good, demo_init, monkeypatch, capsys, tmp_path):
    """transformers builds a one-token tokenizer from config.json alone; it is refused."""
    ckpt = _model_copy(demo_init, tmp_path)
    for f in (ckpt / "hf").glob("tokenizer*"):
        f.unlink()
    err = _main(good + [f"model.ckpt={ckpt}"], monkeypatch, capsys)
    assert f"{ckpt / 'hf'}: no usable tokenizer (a vocabulary of 1 token" in err


def test_tokenizer_that_does_not_belong_to_the_model(
    good, demo_init, monkeypatch, capsys, tmp_path
):
    from gspo_megatron.testing.tiny_model import write_tokenizer

    ckpt = _model_copy(demo_init, tmp_path)
    write_tokenizer(ckpt / "hf", vocab_size=300)  # the model's embedding has 250 rows
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "w3 w1 w0", "answer": "w3 w1"}\n{"prompt": "w280 w0", "answer": "w280"}\n'
    )
    err = _main(good + [f"model.ckpt={ckpt}", f"data.path={data}"], monkeypatch, capsys)
    assert (
        f"{data}:2: the tokenizer gives token id 280, outside the model's vocabulary [0, 250)"
        in err
    )


def test_output_dir_that_cannot_be_created(good, monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _main(good + [f"train.output_dir={blocker / 'run'}"], monkeypatch, capsys)
    assert f"train.output_dir={blocker / 'run'}: {blocker} exists and is not a directory" in err


def test_check_flag_runs_the_preflight_only(good, capsys, monkeypatch):
    from gspo_megatron import train

    monkeypatch.setattr(train, "Trainer", None)  # --check must not reach it
    train.main(good + ["--check"])
    assert "is ready for 1 rank(s) (256 prompts, a fresh start)" in capsys.readouterr().err


def test_launch_script_refuses_bad_input_before_torchrun():
    """launch/train.sh checks the inputs first: one line and exit 2 instead of torchrun's
    failed-worker banner (and its exit status 1)."""
    proc = subprocess.run(
        ["bash", "launch/train.sh", "launch/configs/tiny_cpu.yaml", "train.stpes=3"],
        cwd=REPO,
        env=dict(tr.env(), PYTHON=sys.executable, NPROC_PER_NODE="2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'train.stpes'"), lines


# -- checkpoints: what a run may start from, and never overwrites -------------------------------


def _run_copy(multinode_run, tmp_path) -> Path:
    """A copy of a finished run's output directory (its checkpoints: step_000004, step_000005)."""
    out = tmp_path / "run"
    shutil.copytree(multinode_run / "checkpoints", out / "checkpoints")
    return out


def test_checkpoints_without_latest_still_need_resume(
    multinode_run, demo_init, monkeypatch, capsys, tmp_path
):
    """A run killed before it wrote its first `latest` left complete checkpoints: a fresh run
    there would prune them, so it needs --resume like any other run."""
    out = _run_copy(multinode_run, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    argv = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(demo_init, out)
    err = _main(argv, monkeypatch, capsys)
    assert "already holds a run (step_000004, step_000005)" in err and "--resume" in err


def _plan_of(argv, monkeypatch):
    """The Plan gspo-train would hand the Trainer."""
    from gspo_megatron import train

    seen = []

    class Reached(Exception):
        pass

    def trainer(plan, *placement):
        seen.append(plan)
        raise Reached

    monkeypatch.setattr(train, "Trainer", trainer)
    with pytest.raises(Reached):
        train.main(argv)
    return seen[0]


def test_corrupt_newest_checkpoint_names_the_file_and_the_older_one(
    multinode_run, demo_init, monkeypatch, capsys, tmp_path
):
    out = _run_copy(multinode_run, tmp_path)
    newest, older = out / "checkpoints" / "step_000005", out / "checkpoints" / "step_000004"
    data = sorted(newest.glob("*.distcp"))[0]
    with open(data, "r+b") as f:  # a write cut short (disk full, node lost)
        f.truncate(data.stat().st_size // 2)
    argv = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(demo_init, out)
    err = _main(argv + ["--resume"], monkeypatch, capsys)
    assert f"cannot resume from step_000005: {data}: truncated" in err, err
    assert f"the newest intact older checkpoint is {older}: pass --resume-from {older}" in err
    plan = _plan_of(argv + ["--resume-from", str(older)], monkeypatch)
    assert plan.resume_from == older
    # Nothing was moved or deleted by the checks.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step_000004",
        "step_000005",
    ]


def test_resume_from_must_be_a_training_checkpoint_of_this_run(
    multinode_run, demo_init, monkeypatch, capsys, tmp_path
):
    out = _run_copy(multinode_run, tmp_path)
    argv = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(demo_init, out)
    err = _main(
        argv + ["--resume-from", str(multinode_run / "checkpoints" / "step_000004")],
        monkeypatch,
        capsys,
    )
    assert "holds another run's checkpoints (step_000005)" in err
    fresh = ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")] + tr.overrides(
        demo_init, tmp_path / "new"
    )
    err = _main(fresh + ["--resume-from", str(demo_init / "mcore")], monkeypatch, capsys)
    assert (
        "not a training checkpoint (no trainer_state.json; a model checkpoint goes in model.ckpt)"
        in err
    )


def test_output_dir_without_room_for_a_checkpoint(good, small_fs, monkeypatch, capsys):
    out = small_fs(2) / "run"
    err = _main(good + [f"train.output_dir={out}"], monkeypatch, capsys)
    assert (
        f"no space left on {out.parent} for {out}: a training checkpoint (model + optimizer "
        f"state) needs 11.04 MiB, 2.00 MiB free" in err
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("rewards.functions=[{name: exact_match, weight: 1}]", None),  # the data has answers: fine
        (
            "data.answer_field=''",
            "exact_match compares with a reference answer but data.answer_field is empty",
        ),
        ("train.output_dir=''", "train.output_dir is empty"),
        (
            "rollout.kv_cache_gib=100000",
            "rollout.kv_cache_gib=100000 is more than this machine's free memory",
        ),
    ],
)
def test_settings_that_would_fail_every_call_or_the_machine(
    good, monkeypatch, capsys, override, message
):
    argv = good + ["rewards.functions=[{name: exact_match, weight: 1}]", override]
    if message is None:
        assert _plan_of(argv, monkeypatch).prompts.prompts
    else:
        assert message in _main(argv, monkeypatch, capsys)


def test_the_kv_caches_of_every_engine_on_the_node_must_fit(good, monkeypatch, capsys):
    """Two ranks on this node, an engine each: each engine's cache fits in free memory, the two
    together do not (the kernel's OOM killer would end the run mid-start)."""
    import psutil

    gib = round(0.75 * psutil.virtual_memory().available / (1 << 30), 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    err = _main(good + [f"rollout.kv_cache_gib={gib}"], monkeypatch, capsys, world=2)
    assert f"rollout.kv_cache_gib={gib:g} for each of the 2 engines on this node is more " in err


def test_data_the_rewards_or_the_reader_cannot_use(good, monkeypatch, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "w3 w0", "answer": "w3"}\n{"prompt": "w4 w0", "answer": null}\n')
    err = _main(
        good + [f"data.path={data}", "rewards.functions=[{name: exact_match, weight: 1}]"],
        monkeypatch,
        capsys,
    )
    assert f"{data}:2: field 'answer' is null, and the exact_match reward compares with it" in err
    data.write_bytes(
        b'{"prompt": "w3 w0", "answer": "w3"}\n{"prompt": "w4 \xff w0", "answer": "w4"}\n'
    )
    err = _main(good + [f"data.path={data}"], monkeypatch, capsys)
    assert f"{data}:2: not UTF-8 text (byte 0xff at column 16)" in err
    # A Parquet answer column of lists: its text would never equal a response.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "d.parquet"
    rows = [{"prompt": "w3 w0", "answer": ["w3"]}, {"prompt": "w4 w0", "answer": ["w4", "4"]}]
    pq.write_table(pa.Table.from_pylist(rows), table)
    exact = "rewards.functions=[{name: exact_match, weight: 1}]"
    err = _main(good + [f"data.path={table}", exact], monkeypatch, capsys)
    assert (
        f"{table}:1: field 'answer' is a list (['w3']), and the exact_match reward compares "
        f"the response with one answer: give each row a string or a number (data.answer_field)"
    ) in err


def test_hf_directory_as_model_checkpoint(good, demo_init, monkeypatch, capsys):
    err = _main(good + [f"model.ckpt={demo_init / 'hf'}"], monkeypatch, capsys)
    assert (
        f"{demo_init / 'hf'}: an HF model directory, not a megatron checkpoint: convert it "
        f"first (gspo-convert hf-to-mcore" in err
    )


def test_resuming_a_run_of_another_model(
    multinode_run, demo_init, tiny_moe, monkeypatch, capsys, tmp_path
):
    """model.ckpt changed between the run and its resume: refused before megatron meets
    mismatched shapes deep in the checkpoint loader."""
    out = _run_copy(multinode_run, tmp_path)
    argv = (
        ["--config", str(REPO / "launch/configs/tiny_cpu.yaml")]
        + tr.overrides(demo_init, out)
        + [
            f"model.ckpt={tiny_moe.ckpt}",
            "rollout.max_new_tokens=4",
            "rollout.max_prompt_tokens=12",
        ]
    )
    err = _main(argv + ["--resume"], monkeypatch, capsys)
    assert "step_000005 (vs model.ckpt=" in err and "checkpoint is of another model shape" in err


def test_routing_replay_needs_a_moe_model_and_a_known_mode(good, tiny_dense, monkeypatch, capsys):
    dense = [f"model.ckpt={tiny_dense.ckpt}", "loss.routing_replay=r2"]
    err = _main(good + dense, monkeypatch, capsys)
    assert (
        f"loss.routing_replay=r2: {tiny_dense.ckpt} is a dense model (no routed experts to "
        f"replay); use loss.routing_replay=none" in err
    )
    err = _main(good + ["loss.routing_replay=r5"], monkeypatch, capsys)
    assert "loss.routing_replay='r5' (allowed: none, r2, r3)" in err


def test_r3_needs_an_engine_that_records_its_routes(good, monkeypatch, capsys):
    from gspo_megatron import preflight

    err = _main(
        good + ["loss.routing_replay=r3", "rollout.capture_routes=never"], monkeypatch, capsys
    )
    assert (
        "loss.routing_replay=r3 replays the engine's routes, but rollout.capture_routes=never does "
        "not record them; use auto or always" in err
    )
    reason = "the installed vLLM lacks the hook route capture uses (def set_capture_fn in ...)"
    monkeypatch.setattr(preflight, "capture_unavailable", lambda: reason)
    err = _main(good + ["loss.routing_replay=r3"], monkeypatch, capsys)
    assert f"loss.routing_replay=r3 needs the engine's routes, but {reason}" in err
    # Without r3 the route agreement is simply not measured: the run goes ahead.
    plan = _plan_of(good, monkeypatch)
    assert plan.capture_routes is False


def test_gspo_train_starts_without_the_heavy_imports():
    """The pre-flight answers bad input in a second or two: importing gspo-train's module pulls
    in neither vLLM nor megatron-core nor transformers (the Trainer imports them, after it)."""
    code = (
        "import sys, gspo_megatron.train; "
        "print(sorted({k.split('.')[0] for k in sys.modules} & "
        "{'vllm', 'megatron', 'transformers', 'tensorboard'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_metrics_reader_imports_neither_torch_nor_tensorboard():
    """The plot tool (the quickstart's last step) reads metrics.jsonl through gspo_megatron.metrics:
    torch and TensorBoard, which only the logger needs, cost it 2.5 s of 4 when imported there."""
    code = (
        "import sys, gspo_megatron.metrics; "
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'tensorboard'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_held_out_prompts_are_checked_like_the_training_rows(good, monkeypatch, capsys, tmp_path):
    """data.eval_path goes through the training reader in the pre-flight: a row without the
    answer a reward needs is one line naming the file and the row."""
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "w1 w0", "answer": "w1"}\n{"prompt": "w2 w0"}\n')
    argv = good + [f"data.eval_path={held}", "train.eval_every=2"]
    argv += ["rewards.functions=[{name: exact_match, weight: 1}]"]
    err = _main(argv, monkeypatch, capsys)
    assert str(held) in err and "answer" in err


def test_validation_without_held_out_prompts(good, monkeypatch, capsys):
    err = _main(good + ["data.eval_path=''", "train.eval_every=5"], monkeypatch, capsys)
    assert "train.eval_every=5 needs held-out prompts: set data.eval_path" in err


def test_a_staleness_bound_past_the_run_is_said(good, monkeypatch, capsys):
    """rollout.max_staleness=5 on a 5-step run: every batch would come from the starting
    policy. Said once, before any model; below the run's length, nothing is said."""
    _plan_of(good + ["train.steps=5", "rollout.max_staleness=5"], monkeypatch)
    assert (
        capsys.readouterr().err.count(
            "note: rollout.max_staleness=5 reaches past the 5 step(s) this run takes: every batch "
            "of it is sampled by the policy it starts from (batch j by version max(j - 5, 0))"
        )
        == 1
    )
    _plan_of(good + ["train.steps=5", "rollout.max_staleness=4"], monkeypatch)
    assert "max_staleness" not in capsys.readouterr().err
