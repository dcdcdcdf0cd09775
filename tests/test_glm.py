"""GLM-4.5-style MoE (``glm4_moe``), the second family: its spec's one-line refusals, its GSPO
gradients in every layout against the single process, routing replay with its sigmoid router.

The tiny GLM (``tiny_glm_config``) has everything the family brings: a sigmoid router whose
random correction bias changes which experts win, 8 experts in 2 groups of which each token sees
the best one, routing weights scaled by 2.5, a shared expert, a dense first layer, RoPE on half of
each head, q/k/v biases and q/k norms. Log-prob parity with HF in every layout is in
tests/test_score_parity.py, the round trip (with the MTP layer) in tests/test_convert.py, vLLM in
tests/test_rollout.py, training and resume in tests/test_train.py.

Gradients are compared as tests/test_distributed_loss.py compares Qwen3-MoE's (same worker, same
tolerances and reasons: 1e-4 relative to a tensor's largest entry, where layouts differ by a few
ulp of accumulated rounding and a normalisation error moves gradients by >= 1/16).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import REPO
from test_distributed_loss import _assert_same, grad_runs, with_random_routes

from gspo_megatron.errors import GspoError
from gspo_megatron.models import spec_from_hf_config
from gspo_megatron.testing.hf_reference import hf_logprobs, max_abs_diff
from gspo_megatron.testing.tiny_model import random_rows, tiny_glm_config

WORKER = str(REPO / "tests" / "workers" / "grad_worker.py")

LAYOUTS = [
    ("TP2", 2, {"tp": 2}),
    ("PP2-split1,3", 2, {"pp": 2, "pp_layers": [1, 3]}),
    ("CP2", 2, {"cp": 2}),
    ("EP2", 2, {"ep": 2}),
    ("DP2", 2, {}),
    ("TP2xEP2", 4, {"tp": 2, "ep": 2}),
    ("TP2xPP2", 4, {"tp": 2, "pp": 2}),
    ("EP2xETP2", 4, {"ep": 2, "etp": 2}),
]
_PACKED = {"max_tokens_per_microbatch": 48}
PACKED_LAYOUTS = [("single", 1, {}), ("EP2", 2, {"ep": 2}), ("CP2", 2, {"cp": 2})]
REPLAY_LAYOUTS = [("single", 1, {}), ("EP2", 2, {"ep": 2}), ("TP2xPP2", 4, {"tp": 2, "pp": 2})]
_ROUTED = {"samples": "routed", "engine_routes": True, "trainer_old_logprobs": True}
# GRPO with a step large enough that routes move between pi_old and the second minibatch.
_R3 = {**_ROUTED, "mode": "update", "num_minibatches": 2, "variant": "grpo", "lr": 3e-2}
_R3.update(clip_low=0.2, clip_high=0.27, route_meter=True, routing_replay="r3")
# The same update with R2: pi_old's own routes replayed (no engine routes).
_R2 = {k: v for k, v in _R3.items() if k not in _ROUTED}
_R2.update(routing_replay="r2", trainer_old_logprobs=True)


def _cases() -> dict:
    cases = {"single": (1, {})}
    for name, nproc, layout in LAYOUTS:
        cases[name] = (nproc, {"layout": layout})
    for name, nproc, layout in PACKED_LAYOUTS:
        cases[f"{name}-packed"] = (nproc, {**_PACKED, "layout": layout})
    for name, nproc, layout in REPLAY_LAYOUTS:
        cases[f"{name}-r3"] = (nproc, {**_R3, "layout": layout})
        cases[f"{name}-r2"] = (nproc, {**_R2, "layout": layout})
        cases[f"{name}-moving"] = (nproc, {**_R2, "routing_replay": "none", "layout": layout})
        for mode in ("none", "r3"):
            logprobs = {**_ROUTED, "mode": "logprobs", "routing_replay": mode, "layout": layout}
            cases[f"{name}-{mode}-logprobs"] = (nproc, logprobs)
    return cases


@pytest.fixture(scope="module")
def samples_dir(tiny_glm, tmp_path_factory):
    """main: pi_old = HF's log-probs plus noise (some sequences clipped); routed: main's rows with
    random engine routes (top-2 distinct experts per fed token and MoE layer)."""
    root = tmp_path_factory.mktemp("glm_samples")
    rows = random_rows(8, seed=3)
    ref = hf_logprobs(tiny_glm.model, rows)
    rng = random.Random(0)
    main = [
        {
            "prompt_ids": p,
            "response_ids": r,
            "advantage": rng.gauss(0, 1),
            "old_logprobs": [x + rng.gauss(0, 0.003) for x in lp],
        }
        for (p, r), lp in zip(rows, ref)
    ]
    (root / "main.json").write_text(json.dumps(main))
    config = tiny_glm.model.config
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    top_k = config.num_experts_per_tok
    routed = with_random_routes(main, config.n_routed_experts, top_k, moe_layers, rng)
    (root / "routed.json").write_text(json.dumps(routed))
    return root


@pytest.fixture(scope="module")
def runs(tiny_glm, samples_dir, tmp_path_factory):
    return grad_runs(tiny_glm, samples_dir, _cases(), tmp_path_factory.mktemp("glm_grad_runs"))


@pytest.mark.parametrize("name", [case[0] for case in LAYOUTS])
def test_glm_gspo_loss_and_gradients_match_single_process(runs, name):
    ref = runs["single"]
    assert 0 < ref["metrics"]["gspo/clip_fraction"] < 1  # both clipped and unclipped sequences
    # The router, the shared expert and the q/k/v biases all get gradients.
    keys = ref["tensors"].keys()
    for part in ("mlp.router.weight", "shared_experts.linear_fc2", "linear_qkv.bias"):
        assert any(part in k and ref["tensors"][k].abs().max() > 0 for k in keys), part
    _assert_same(ref, runs[name])


@pytest.mark.parametrize("name", [case[0] for case in PACKED_LAYOUTS])
def test_glm_packed_microbatches_match_padded_single_process(runs, name):
    _assert_same(runs["single"], runs[f"{name}-packed"])


def _routed(samples_dir):
    rows = json.loads((samples_dir / "routed.json").read_text())
    return rows, [(r["prompt_ids"], r["response_ids"]) for r in rows]


def _by_row(result, rows):
    return [result["logprobs"][json.dumps([r["prompt_ids"], r["response_ids"]])] for r in rows]


@pytest.mark.parametrize("name", [case[0] for case in REPLAY_LAYOUTS])
def test_glm_r3_routes_every_token_as_the_engine_did(runs, tiny_glm, samples_dir, name):
    """With the engine's (random) routes forced, the log-probs equal transformers' with the same
    routes forced through its sigmoid router (weights: the chosen experts' sigmoid scores,
    renormalised, x 2.5), and differ from the unforced ones; through a whole GRPO update the
    routes do not move (route change exactly 0)."""
    rows, pairs = _routed(samples_dir)
    forced = [np.array(r["routes"]) for r in rows]
    want = hf_logprobs(tiny_glm.model, pairs, forced_routes=forced)
    assert max_abs_diff(_by_row(runs[f"{name}-r3-logprobs"], rows), want) <= 1e-4
    natural = _by_row(runs[f"{name}-none-logprobs"], rows)
    assert max_abs_diff(natural, hf_logprobs(tiny_glm.model, pairs)) <= 1e-4
    assert max_abs_diff(natural, want) > 1e-2
    update = runs[f"{name}-r3"]
    assert update["routes"]["train/moe_route_change"] == 0.0
    first = update["metrics"][0]
    assert first["gspo/abs_log_ratio"] == 0.0 and first["gspo/approx_kl"] == 0.0


@pytest.mark.parametrize("name", [case[0] for case in REPLAY_LAYOUTS])
def test_glm_r2_pins_the_updates_to_pi_old_routes(runs, name):
    """loss.routing_replay=r2 through the sigmoid router: without replay the second minibatch
    routes some tokens otherwise than pi_old did; with it, none (route change exactly 0), and
    the first minibatch sees pi_old's own log-probs exactly."""
    assert runs[f"{name}-moving"]["routes"]["train/moe_route_change"] > 0.0
    got = runs[f"{name}-r2"]
    assert got["routes"]["train/moe_route_change"] == 0.0
    first = got["metrics"][0]
    assert first["gspo/abs_log_ratio"] == 0.0 and first["gspo/approx_kl"] == 0.0


@pytest.mark.parametrize("name", [case[0] for case in REPLAY_LAYOUTS])
def test_glm_correction_bias_stays_frozen_through_updates(runs, tiny_glm, name):
    """After two Adam steps at lr 3e-2 (every weight moved), each MoE layer's
    e_score_correction_bias is the released one bit for bit: megatron's bias update adds
    0 x sign(load imbalance)."""
    tensors = runs[f"{name}-r3"]["tensors"]
    layers = tiny_glm.model.model.layers
    moved = tensors["decoder.layers.1.mlp.router.weight"] - layers[1].mlp.gate.weight
    assert moved.abs().max() > 1e-3
    for i in range(1, len(layers)):
        got = tensors[f"decoder.layers.{i}.mlp.router.expert_bias"]
        assert torch.equal(got, layers[i].mlp.gate.e_score_correction_bias), i


def _config(**overrides) -> dict:
    cfg = tiny_glm_config().to_dict()
    cfg["architectures"] = ["Glm4MoeForCausalLM"]
    cfg.update(overrides)
    return cfg


def test_glm_spec_reads_what_transformers_builds():
    from transformers import Glm4MoeForCausalLM
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    config = tiny_glm_config(first_k_dense_replace=2)
    model = Glm4MoeForCausalLM(config)
    spec = spec_from_hf_config(_config(first_k_dense_replace=2))
    assert spec.moe_layers == tuple(isinstance(la.mlp, Glm4MoeMoE) for la in model.model.layers)
    assert spec.rotary_fraction == 0.5 and spec.num_mtp_layers == 1
    assert spec.shared_ffn_hidden_size == model.model.layers[2].mlp.shared_experts.intermediate_size
    # A released-style config: partial_rotary_factor and rope_theta at the top level.
    released = _config()
    rope = released.pop("rope_parameters")
    released.update(rope_theta=rope["rope_theta"], partial_rotary_factor=0.25)
    got = spec_from_hf_config(released)
    assert got.rotary_fraction == 0.25 and got.rope_theta == rope["rope_theta"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(norm_topk_prob=False),
            "norm_topk_prob=false is not supported with num_experts_per_tok=2 (megatron-core "
            "always renormalises sigmoid top-k weights; supported: true)",
        ),
        (
            dict(n_group=4, topk_group=2, num_experts_per_tok=2),
            "grouped top-k with num_experts_per_tok=2, topk_group=2 is not supported",
        ),
        (dict(n_group=3), "n_routed_experts=8 is not divisible by n_group=3"),
        (dict(topk_group=3), "topk_group=3 exceeds n_group=2"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace=4 leaves no MoE layer"),
        (dict(n_routed_experts="8"), 'n_routed_experts="8" must be an integer'),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported (supported: silu)"),
        (
            dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.3125}),
            "partial_rotary_factor=0.3125 must be in (0, 1] and rotate an even number",
        ),
    ],
)
def test_glm_spec_refuses_what_megatron_cannot_reproduce_in_one_line(overrides, message):
    with pytest.raises(GspoError) as err:
        spec_from_hf_config(_config(**overrides), where="x/config.json")
    text = str(err.value)
    assert text.startswith("x/config.json: ") and message in text and "\n" not in text
