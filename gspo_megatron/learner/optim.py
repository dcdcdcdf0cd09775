"""Wrapping a model for training: megatron DDP, gradient finalisation, the optimizer and its
learning-rate schedule (megatron-core's ``OptimizerParamScheduler``).

``calculate_per_token_loss`` is switched on because the GSPO loss normalises by its own count
(sequences, see ``gspo_megatron.learner.update``): megatron then sums gradients over data-parallel ranks
and divides by the global count once, in ``finalize_model_grads``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo_megatron.errors import GspoError

# megatron is imported inside the functions that use it: the pre-flight reads OptimConfig from
# here and must not load megatron (seconds of imports before a one-line error).


@dataclass(frozen=True)
class OptimConfig:
    """megatron-core optimizer settings."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    decay_style: str = "constant"
    """LR after warmup: constant, linear or cosine (down to min_lr at decay_steps)."""
    decay_steps: int = 0
    """Optimizer steps over which the LR decays; 0 = the whole run
    (train.steps x loss.num_minibatches)."""
    cpu_offload_fraction: float = 0.0
    """GPU only: fraction of the optimizer state (fp32 master weights, Adam moments) kept and
    stepped on the CPU (megatron's hybrid-device optimizer); 0 = all on the GPU."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's data-parallel all-reduce (or reduce-scatter) as soon as the
    last micro-batch's backward has filled it, while the backward goes on (megatron's
    overlap_grad_reduce), instead of all of them after it. Same sums, in buckets."""
    grad_bucket_elements: int = 0
    """With overlap_grad_reduce: gradient elements per bucket; 0 = megatron's default
    (max(40M, 1M x data-parallel ranks)). Smaller buckets start reducing earlier."""

    def validate(self) -> None:
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise GspoError(
                f"optim.lr={self.lr} must be > 0 and optim.min_lr={self.min_lr} in [0, lr]"
            )
        if self.decay_style not in DECAY_STYLES:
            raise GspoError(
                f"optim.decay_style='{self.decay_style}' (allowed: {', '.join(DECAY_STYLES)})"
            )
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise GspoError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not 0 <= self.cpu_offload_fraction <= 1:
            raise GspoError(
                f"optim.cpu_offload_fraction={self.cpu_offload_fraction} must be in [0, 1]"
            )
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise GspoError("optim.clip_grad and optim.weight_decay must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise GspoError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.grad_bucket_elements < 0:
            raise GspoError(
                f"optim.grad_bucket_elements={self.grad_bucket_elements} must be >= 0 "
                f"(0: megatron's default)"
            )
        if self.grad_bucket_elements and not self.overlap_grad_reduce:
            raise GspoError(
                f"optim.grad_bucket_elements={self.grad_bucket_elements} needs "
                f"optim.overlap_grad_reduce: true (without it every gradient is one bucket)"
            )
        if not self.adam_eps > 0:
            raise GspoError(
                f"optim.adam_eps={self.adam_eps} must be > 0 (it keeps Adam's "
                f"denominator away from 0)"
            )


DECAY_STYLES = ("constant", "linear", "cosine")


def build_optimizer(ddp_model, cfg: OptimConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mc = ddp_model.module.config
    oc = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=mc.bf16,
        fp16=mc.fp16,
        params_dtype=mc.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    if cfg.cpu_offload_fraction > 0 and torch.cuda.is_available():
        oc.optimizer_cpu_offload = True
        oc.optimizer_offload_fraction = cfg.cpu_offload_fraction
    optimizer = get_megatron_optimizer(oc, [ddp_model])
    if not torch.cuda.is_available():
        for inner in torch_optimizers(optimizer):
            fuse_adam_on_cpu(inner)
    return optimizer


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained, distributed or not) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def fuse_adam_on_cpu(inner) -> None:
    """Step torch's AdamW with its fused CPU kernel (one pass over parameter, gradient and
    moments) instead of its default one-op-per-tensor loop: without apex or Transformer Engine
    megatron hands the CPU torch.optim.AdamW with neither set, which walks every parameter's
    elements six times. Measured: 0.28 s -> 0.09 s a step at 123M parameters on 2 cores. The
    kernel rounds differently in the last bit (about 1 ulp of a weight per step).

    Set before every step, not once: loading a checkpoint replaces the parameter groups'
    settings with those it saved (torch's load_state_dict), which older runs saved unfused."""
    if not isinstance(inner, torch.optim.Adam):  # AdamW included
        return

    def fused(opt, args, kwargs):
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False

    inner.register_step_pre_hook(fused)


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    """megatron's LR/WD scheduler; stepped once per optimizer step, checkpointed with the run."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = cfg.decay_steps or total_steps
    # megatron requires warmup < decay steps; a run shorter than its warmup just warms up.
    decay = max(decay, cfg.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
