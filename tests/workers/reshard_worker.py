"""torchrun worker: training checkpoints saved in one parallel layout and resumed in another.

Cases (``--cases``, run in order in the same processes, each rebuilding megatron's parallel
state, model, optimizer and LR schedule as gspo-train does):

- ``{"name", "layout", "save": DIR}``: two minibatch updates on the samples, a training
  checkpoint of step 1 under DIR (``checkpoint.training.save_checkpoint``, the trainer's own),
  then two more updates: the weights after them are the uninterrupted run's;
- ``{"name", "layout", "load": CKPT, "save": DIR}``: a fresh model and optimizer in this layout,
  ``load_checkpoint(CKPT)``, saved again at once as step 1 under DIR (what the load restored,
  written back in the checkpoint's layout-free format), then the same two updates; ``"lr"``
  builds the optimizer and schedule with another peak LR (a resume that changes optim.lr).

Rank 0 returns the weights after the updates (full tensors, keyed like the checkpoint) and the
LR the scheduler reports.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cases import run_cases
from megatron.core import parallel_state as ps
from samples import random_samples

from gspo_megatron.checkpoint.model import HF_SUBDIR, checkpoint_spec, load_model_checkpoint
from gspo_megatron.checkpoint.run_dir import TrainState
from gspo_megatron.checkpoint.training import load_checkpoint, save_checkpoint
from gspo_megatron.distributed.ddp import wrap_for_training
from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
from gspo_megatron.learner.optim import OptimConfig, build_optimizer, build_scheduler
from gspo_megatron.learner.update import policy_update
from gspo_megatron.loss import PolicyLossConfig
from gspo_megatron.models import build_model
from gspo_megatron.testing.gather import gather_full_tensors

SAMPLES = random_samples(16, seed=11)
LOSS = PolicyLossConfig(
    variant="grpo", clip_low=0.2, clip_high=0.27, num_minibatches=2, micro_batch_size=2
)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=3, decay_style="linear", min_lr=1e-4)


def _update(model, optimizer, scheduler, vocab_size: int) -> None:
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    m = len(SAMPLES) // LOSS.num_minibatches
    mine = [
        s
        for k in range(LOSS.num_minibatches)
        for s in SAMPLES[k * m + rank * (m // dp) : k * m + (rank + 1) * (m // dp)]
    ]
    policy_update(model, optimizer, mine, LOSS, vocab_size, scheduler=scheduler)


def run_case(case: dict, ckpt: Path) -> dict:
    spec = checkpoint_spec(ckpt)
    layout = ParallelLayout(**case.get("layout", {}))
    init_distributed(layout, seed=1234)
    model = build_model(spec, layout)
    load_model_checkpoint(model, ckpt, spec)
    ddp = wrap_for_training(model)
    optim = replace(OPTIM, lr=case.get("lr", OPTIM.lr))  # a resume with another peak LR
    optimizer = build_optimizer(ddp, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=8)
    save = Path(case["save"])
    if "load" in case:
        state = load_checkpoint(Path(case["load"]), ddp, optimizer, scheduler)
    else:
        _update(ddp, optimizer, scheduler, spec.vocab_size)
        state = TrainState(step=1)
    save_checkpoint(save, ddp, optimizer, scheduler, state, ckpt / HF_SUBDIR, keep=1)
    _update(ddp, optimizer, scheduler, spec.vocab_size)
    return {"tensors": gather_full_tensors(ddp), "lr": scheduler.get_lr(optimizer.param_groups[0])}


if __name__ == "__main__":
    run_cases(run_case)
