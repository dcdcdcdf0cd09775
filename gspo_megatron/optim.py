"""Wrapping a model for training: megatron DDP, gradient finalisation, the optimizer.

``calculate_per_token_loss`` is switched on because the GSPO loss normalises by its own count
(sequences, see ``gspo_megatron.update``): megatron then sums gradients over data-parallel ranks
and divides by the global count once, in ``finalize_model_grads``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimConfig:
    """megatron-core optimizer settings."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""


def wrap_for_training(model, use_distributed_optimizer: bool = True):
    """megatron DDP around ``model``, with gradient finalisation wired into the schedules."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, cfg: OptimConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mc = ddp_model.module.config
    oc = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=mc.bf16, fp16=mc.fp16, params_dtype=mc.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer)
    return get_megatron_optimizer(oc, [ddp_model])
