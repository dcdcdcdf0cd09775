"""The shipped configs and the parts of the trainer config that need no model: every shipped
YAML parses into typed sections and, for the large models, fits the real model's shape and the
world it is written for; the LR schedule follows its formula; the README's config reference is
the one generated from the code."""

from __future__ import annotations

import math

import pytest
from conftest import REPO

from gspo_megatron.config import load_config
from gspo_megatron.distributed.parallel import check_layout

# Shapes of the released models (their config.json), the facts the layouts are built on. Both
# have 128 experts (8 per token), 4 KV heads of 128, the same vocabulary and context.
RELEASED = dict(vocab_size=151936, num_key_value_heads=4, head_dim=128, num_experts=128)
RELEASED.update(num_experts_per_tok=8, max_position_embeddings=40960, rms_norm_eps=1e-6)
RELEASED.update(rope_theta=1000000.0, norm_topk_prob=True, torch_dtype="bfloat16")
QWEN3_30B_A3B = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32)
QWEN3_30B_A3B.update(intermediate_size=6144, moe_intermediate_size=768)
QWEN3_235B_A22B = dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64)
QWEN3_235B_A22B.update(intermediate_size=12288, moe_intermediate_size=1536)


QWEN3 = dict(RELEASED, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
# GLM-4.5-Air: 46 layers (the first dense), 96 heads, 8 KV heads of 128, 128 routed experts
# (8 per token, one group) and a shared one, partial RoPE, q/k/v biases, one MTP layer.
GLM_4_5_AIR = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe")
GLM_4_5_AIR.update(hidden_size=4096, num_hidden_layers=46, num_attention_heads=96)
GLM_4_5_AIR.update(num_key_value_heads=8, head_dim=128, intermediate_size=10944)
GLM_4_5_AIR.update(moe_intermediate_size=1408, n_routed_experts=128, n_shared_experts=1)
GLM_4_5_AIR.update(num_experts_per_tok=8, n_group=1, topk_group=1, first_k_dense_replace=1)
GLM_4_5_AIR.update(routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5)
GLM_4_5_AIR.update(rope_theta=1000000.0, vocab_size=151552, attention_bias=True)
GLM_4_5_AIR.update(use_qk_norm=False, num_nextn_predict_layers=1, rms_norm_eps=1e-5)
GLM_4_5_AIR.update(max_position_embeddings=131072, torch_dtype="bfloat16")


def _spec(config: dict):
    from gspo_megatron.models import spec_from_hf_config

    return spec_from_hf_config(config, "test")


@pytest.mark.parametrize(
    "name,config,world",
    [
        ("qwen3_30b_a3b", dict(QWEN3, **QWEN3_30B_A3B), 8),
        ("qwen3_235b_a22b", dict(QWEN3, **QWEN3_235B_A22B), 128),
        ("glm4_5_air", GLM_4_5_AIR, 32),
    ],
)
def test_large_configs_fit_their_model_and_cluster(name, config, world):
    cfg = load_config(REPO / "launch/configs" / f"{name}.yaml")
    spec = _spec(config)
    # The world the SLURM script asks for.
    sbatch = (REPO / "launch/slurm" / f"{name}.sbatch").read_text()
    nodes = int(sbatch.split("#SBATCH --nodes=")[1].split()[0])
    assert nodes * int(sbatch.split("#SBATCH --gpus-per-node=")[1].split()[0]) == world
    check_layout(cfg.parallel, spec, world)
    cfg.rollout.validate(world)
    cfg.loss.validate()
    cfg.optim.validate()
    # The paper's GSPO settings.
    assert (cfg.loss.variant, cfg.loss.clip_low, cfg.loss.clip_high) == ("gspo", 3e-4, 4e-4)
    assert cfg.loss.num_minibatches == 4 and cfg.loss.kl_coef == 0
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    assert (cfg.train.prompts_per_step * cfg.rollout.group_size) % (
        dp * cfg.loss.num_minibatches
    ) == 0
    assert cfg.rollout.max_model_len <= spec.max_position_embeddings


@pytest.mark.parametrize(
    "config,active,with_vocab",
    [
        (dict(QWEN3, **QWEN3_30B_A3B), 3.3e9, True),
        (dict(QWEN3, **QWEN3_235B_A22B), 22e9, True),
        (GLM_4_5_AIR, 12e9, False),
    ],
)
def test_each_family_counts_the_published_active_parameters(config, active, with_vocab):
    """Every matrix a token meets (the family's FLOPs per token / 2: attention projections, the
    dense or routed + shared MLPs, the LM head) plus its embedding row is the published active
    parameter count (Qwen's figures count the embedding and LM head, GLM's do not). The figures
    are rounded (3.3B, 22B, 12B): 5% covers that, while a family counting one matrix per expert
    too few or too many is off by a sixth or more, and one forgetting GLM's shared expert by
    6.5%."""
    spec = _spec(config)
    vocab = spec.hidden_size * spec.vocab_size
    counted = spec.matmul_flops_per_token() / 2 + (vocab if with_vocab else -vocab)
    assert counted == pytest.approx(active, rel=0.05)


def test_tiny_config_parses():
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml")
    assert (
        cfg.model.dtype == "fp32"
        and cfg.rewards.functions[0].name == "gspo_megatron.tasks.demo:copy_reward"
    )
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.num_minibatches) == (3e-4, 4e-4, 4)


def test_lr_schedule_warmup_then_cosine():
    import torch

    from gspo_megatron.learner.optim import OptimConfig, build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, decay_style="cosine")
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        sched.step(1)  # as train_step does, before each optimizer step
        lrs.append(opt.param_groups[0]["lr"])
    for k, lr in enumerate(lrs, 1):
        if k <= 4:
            want = 1e-3 * k / 4
        else:
            frac = (k - 4) / (20 - 4)
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
        # The same float64 formula as megatron's scheduler, evaluated in another order.
        assert lr == pytest.approx(want, rel=1e-9), (k, lr, want)


def test_readme_config_reference_is_generated_from_the_code():
    from gspo_megatron.config.doc import END, START, reference

    text = (REPO / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == reference().strip(), (
        "run: python -m gspo_megatron.config.doc --update README.md"
    )


def test_moe_aux_loss_weight_means_coeff_times_mean_aux_loss(tiny_moe):
    """Through the GSPO update path (per-sequence normalisation) the load-balancing gradient is
    coeff x the mean over micro-batches, as in megatron's pre-training, for any micro-batch size
    and padding; without the coefficient scaling it would be off by the micro-batch size."""
    import json

    from conftest import run_cli

    proc = run_cli(["tests/workers/aux_loss_worker.py", str(tiny_moe.ckpt)])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Relative differences of fp32 router gradients from two computations of the same sum
    # (~1e-7); a coefficient off by the micro-batch size is a ratio of 0.5.
    for key in ("mbs1_pad0", "mbs2_pad0", "mbs2_pad16"):
        assert out[key] < 1e-5, out
    assert out["unscaled_ratio_mbs1"] == pytest.approx(1.0, rel=1e-4)
    assert out["unscaled_ratio_mbs2"] == pytest.approx(0.5, rel=1e-4)
