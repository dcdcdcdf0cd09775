"""Policy updates on megatron-core: old log-probs, then minibatch GSPO steps.

The loss lives on the last pipeline stage, inside megatron's schedule (``_loss_func`` below):
log-probs come vocab-parallel from the logits, per-sequence sums are all-reduced over the CP
group inside ``policy_loss``, and each micro-batch returns the *sum* of its sequences' objectives
together with its sequence count. With ``calculate_per_token_loss`` megatron then sums gradients
over data-parallel (and CP) ranks and divides by the global count (``finalize_model_grads``): the
gradient is that of the single-process mean over every sequence of the minibatch, however the
sequences are spread over micro-batches and ranks. Each CP rank reports its sequences only once
(count 0 on CP ranks other than 0), since all CP ranks hold the same sequences.

A rollout batch is split into ``num_minibatches`` minibatches, one optimizer step each (paper: 4),
so the policy drifts from pi_old within the batch. pi_old's log-probs come from one trainer
forward pass before the first step, or from the rollout engine (paper sec. 5.4).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import Router

from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.errors import GspoError
from gspo_megatron.learner import routing_replay
from gspo_megatron.learner.batch import (
    MicroBatch,
    Sample,
    build_microbatch,
    cp_shard,
    pad_to_multiple,
    sequence_multiple,
)
from gspo_megatron.learner.forward import label_logprobs, model_forward, run_schedule
from gspo_megatron.learner.old_logprobs import (
    compute_old_logprobs,
    compute_old_logprobs_stacked,
    observe_route_agreement,
    reduce_logprob_diff,
)
from gspo_megatron.learner.packing import packed_minibatches, unpacked
from gspo_megatron.learner.reference import fill_ref_logprobs
from gspo_megatron.learner.step_metrics import FROM_LOSS, reduce_metrics, summarise_steps
from gspo_megatron.loss import PolicyLossConfig, policy_loss
from gspo_megatron.models import have_transformer_engine


def agreed_seq_len(samples: Sequence[Sample]) -> int:
    """One padded length for all ranks (MoE dispatch and pipeline p2p need equal shapes)."""
    longest = max((len(s.prompt_ids) + len(s.response_ids) for s in samples), default=1)
    t = torch.tensor([longest], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    multiple = sequence_multiple(
        ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    )
    return pad_to_multiple(int(t.item()), multiple)


def make_microbatches(
    samples: Sequence[Sample],
    micro_batch_size: int,
    seq_len: int,
    num_microbatches: Optional[int] = None,
) -> List[MicroBatch]:
    """This rank's samples -> CP-sharded micro-batches, padded with empty rows/micro-batches
    to ``num_microbatches`` (all data-parallel ranks must run the same count)."""
    n = num_microbatches or max(1, -(-len(samples) // micro_batch_size))
    rows: List[Optional[Sample]] = list(samples) + [None] * (n * micro_batch_size - len(samples))
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    return [
        cp_shard(
            build_microbatch(rows[k * micro_batch_size : (k + 1) * micro_batch_size], seq_len),
            cp,
            cp_rank,
        )
        for k in range(n)
    ]


def build_minibatches(
    samples: Sequence[Sample], cfg: PolicyLossConfig
) -> Tuple[List[List[MicroBatch]], int]:
    """This rank's samples -> ``cfg.num_minibatches`` lists of CP-sharded micro-batches and the
    row length all ranks use: ``micro_batch_size`` rows padded to the longest sequence of any
    rank, or, with ``max_tokens_per_microbatch``, packed rows (``gspo_megatron.learner.packing``)."""
    k = cfg.num_minibatches
    per = len(samples) // k
    parts = [samples[i * per : (i + 1) * per] for i in range(k)]
    if cfg.max_tokens_per_microbatch:
        if have_transformer_engine():
            raise GspoError(
                "loss.max_tokens_per_microbatch > 0: packed sequences run on megatron's local "
                "attention with a block-diagonal mask; Transformer Engine's packed (THD) "
                "attention is not wired up yet: use loss.max_tokens_per_microbatch=0 here"
            )
        multiple = sequence_multiple(
            ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
        )
        packed, seq_len = packed_minibatches(parts, cfg.max_tokens_per_microbatch, multiple)
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        return [[cp_shard(mb, cp, cp_rank) for mb in mbs] for mbs in packed], seq_len
    seq_len = agreed_seq_len(samples)
    n_mb = max(1, -(-per // cfg.micro_batch_size))
    return [make_microbatches(p, cfg.micro_batch_size, seq_len, n_mb) for p in parts], seq_len


def _loss_func(cfg: PolicyLossConfig, vocab_size: int, mb: MicroBatch, logits: torch.Tensor):
    dev = logits.device
    if mb.old_logprobs is None:
        if mb.loss_mask.any():
            raise ValueError(
                "micro-batch has no old log-probs: run compute_old_logprobs first, "
                "or pass the rollout engine's log-probs with the samples"
            )
        mb.old_logprobs = torch.zeros(mb.loss_mask.shape)  # a filler micro-batch: no tokens
    if cfg.kl_coef and mb.ref_logprobs is None and mb.loss_mask.any():
        raise ValueError(
            "loss.kl_coef > 0 but the micro-batch has no reference log-probs: pass "
            "the reference policy to policy_update (ref_model)"
        )
    correcting = cfg.rollout_correction != "none"
    if correcting and mb.rollout_logprobs is None and mb.loss_mask.any():
        raise ValueError(
            f"loss.rollout_correction={cfg.rollout_correction} but the micro-batch has no "
            f"rollout engine log-probs (Sample.old_logprobs)"
        )
    # The logits are read only here: their storage can take their gradient.
    logp, entropy = label_logprobs(logits, mb, vocab_size, inplace_backward=True)
    row_mask = mb.loss_mask.to(dev)
    # The loss sees one row per sequence; a packed row is unpacked here (gspo_megatron.learner.packing).
    mb, logp = unpacked(mb, logp)
    mask = mb.loss_mask.to(dev)
    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    loss_sum, m = policy_loss(
        logp,
        mb.old_logprobs.to(dev),
        mb.advantages.to(dev),
        mask,
        cfg,
        ref_logprobs=None if mb.ref_logprobs is None else mb.ref_logprobs.to(dev),
        # A filler micro-batch (no tokens) has no engine log-probs; it still joins the
        # correction's CP collectives.
        rollout_logprobs=(
            (mb.old_logprobs if mb.rollout_logprobs is None else mb.rollout_logprobs).to(dev)
            if correcting
            else None
        ),
        num_sequences=1.0,
        num_tokens=1.0,
        cp_group=cp_group,
    )
    # megatron divides the summed gradients by the summed counts: sequences, or response tokens
    # for per-token objectives (cispo); every CP rank holds the same sequences, counted once.
    count = m["num_tokens"] if cfg.per_token else m["num_sequences"]
    if ps.get_context_parallel_rank() != 0:
        count = torch.zeros(())
    sums = {k: v for k, v in m.items() if k in FROM_LOSS}
    sums["loss_sum"] = loss_sum.detach()
    ent = torch.stack([(entropy.detach() * row_mask).sum(), row_mask.float().sum()])
    if cp_group is not None:  # tokens are spread over CP ranks; the metrics above are not
        dist.all_reduce(ent, group=cp_group)
    sums["entropy_sum"], sums["entropy_tokens"] = ent[0], ent[1]
    return loss_sum, count.to(torch.int), sums


def scale_moe_aux_loss(model, coeff: float, micro_batch_size: int) -> None:
    """Set the router's load-balancing coefficient so that ``coeff`` means what it means in
    megatron's pre-training: coeff x the mean over micro-batches of the aux loss.

    Under ``calculate_per_token_loss`` the schedule gives the aux loss of every micro-batch a
    gradient scale of 1, and ``finalize_model_grads`` divides all gradients by our count, the
    number of *sequences* in the batch: left alone, the aux loss would weigh coeff /
    micro_batch_size. (megatron's router can instead multiply by the micro-batch's token count,
    expecting a token-count divisor; it decides that from a flag it copies from the config when
    it is built, so it is set here explicitly rather than left to build order.)"""
    unwrapped = unwrap(model)
    config = unwrapped.config
    if not coeff or not getattr(config, "num_moe_experts", None):
        return
    for module in unwrapped.modules():
        if isinstance(module, Router):
            module.calculate_per_token_loss = False
    config.moe_aux_loss_coeff = coeff * micro_batch_size


def train_step(
    model,
    optimizer,
    microbatches: List[MicroBatch],
    cfg: PolicyLossConfig,
    vocab_size: int,
    seq_len: int,
    step_optimizer: bool = True,
    scheduler=None,
) -> Dict[str, float]:
    """One forward/backward over ``microbatches`` (+ one optimizer step). Returns global metrics
    under their logged names (``gspo/*``, ``train/*``), identical on every rank. ``scheduler`` (megatron's OptimizerParamScheduler) is advanced
    before the step, so optimizer step k uses the schedule's value at k (warmup never spends
    a step at lr 0)."""

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        return model_forward(model_chunk, mb), partial(_loss_func, cfg, vocab_size, mb)

    model.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    store = run_schedule(model, forward_step, microbatches, seq_len, forward_only=False)
    stepping = optimizer is not None and step_optimizer
    # The gradient check rides on the metrics' all-reduce: no collective of its own.
    out = reduce_metrics(
        store, cfg, nonfinite_grads=local_nonfinite_grads(model) if stepping else 0.0
    )
    nonfinite_grads = out.pop("nonfinite_grads")
    if stepping:
        # A non-finite loss or gradient must never reach the weights. megatron's optimizer only
        # looks for inf/NaN when it has a loss scaler (fp16, or an explicit loss_scale), not in
        # bf16 or fp32, and never at the loss: the step is skipped here instead, with the
        # scheduler left where it was (as megatron's trainer does for an unsuccessful update).
        if nonfinite_grads or not math.isfinite(out["gspo/loss"]):
            out.update(
                {
                    "train/update_successful": 0.0,
                    "train/skipped_steps": 1.0,
                    "train/grad_norm": float("nan"),
                }
            )
            return out
        if scheduler is not None:
            scheduler.step(increment=1)
            out["train/lr"] = float(optimizer.param_groups[0]["lr"])
        ok, grad_norm, _ = optimizer.step()
        out["train/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["train/update_successful"] = float(bool(ok))
        out["train/skipped_steps"] = float(not ok)
    return out


def local_nonfinite_grads(model) -> float:
    """1.0 if this rank's DDP gradient buffers hold a non-finite value, else 0.0 (no collective).

    After the data-parallel reduction a rank's buffer holds reduced gradients for the part its
    optimizer owns and its own local gradients elsewhere: a non-finite value anywhere in the
    reduced gradient is non-finite in some rank's buffer, so the sum of these flags over all
    ranks is 0 exactly when the global gradient norm is finite. A buffer's plain sum serves as
    the test (NaN and inf propagate through it, and it allocates nothing): it can only overflow
    where the squared norm would overflow too."""
    buffers = list(model.buffers) + list(model.expert_parallel_buffers)
    if not buffers:
        return 0.0
    sums = torch.stack([buf.grad_data.sum(dtype=torch.float32) for buf in buffers])
    return float(not bool(torch.isfinite(sums).all()))


@dataclass
class UpdateResult:
    steps: List[Dict[str, float]]
    """Metrics of each minibatch optimizer step (global, identical on every rank)."""
    rollout: Dict[str, float]
    """|engine - trainer| log-prob per response token under pi_old (empty when the samples
    carry no engine log-probs)."""
    seconds: Dict[str, float] = None
    """Wall time of the pi_old forward passes and of the minibatch steps."""
    routes: Dict[str, float] = None
    """MoE expert choices changed between pi_old and the last minibatch step's policy
    (``gspo_megatron.learner.route_change``); empty without a meter or a pi_old forward."""

    @property
    def metrics(self) -> Dict[str, float]:
        """Everything above as one rollout batch's metrics, under their logged names."""
        return {
            **summarise_steps(self.steps),
            **self.rollout,
            **(self.routes or {}),
            **(self.seconds or {}),
        }

    @property
    def skipped(self) -> List[bool]:
        """Per optimizer step, whether it was skipped (non-finite loss or gradients)."""
        return [bool(s.get("train/skipped_steps")) for s in self.steps]


def policy_update(
    model,
    optimizer,
    samples: Sequence[Sample],
    cfg: PolicyLossConfig,
    vocab_size: int,
    measure_rollout_diff: bool = True,
    scheduler=None,
    moe_aux_loss_coeff: float = 0.0,
    route_meter=None,
    ref_model=None,
) -> UpdateResult:
    """Consume this data-parallel rank's share of a rollout batch: old log-probs (unless taken
    from the rollout engine), then ``cfg.num_minibatches`` optimizer steps. Every rank must pass
    the same number of samples.

    Samples that carry the engine's log-probs (``Sample.old_logprobs``) are compared with the
    trainer's before any step: free when the trainer computes pi_old, one extra forward pass
    when pi_old comes from the engine (``measure_rollout_diff=False`` skips it).

    With ``cfg.kl_coef > 0``, ``ref_model`` is the frozen reference policy
    (``gspo_megatron.learner.reference``): its log-probs are computed once per minibatch, before any step.
    A ``routing_replay.RoutingReplay`` installed on the model measures the trainer-vs-engine
    route agreement in the pi_old forward (samples carrying ``routes``) and, with
    ``cfg.routing_replay`` r2 / r3, pins the updates' routes (the pi_old forward then runs even
    when pi_old's log-probs come from the engine)."""
    replay = routing_replay.of(model)
    if cfg.routing_replay != "none" and (replay is None or replay.mode != cfg.routing_replay):
        raise GspoError(
            f"loss.routing_replay={cfg.routing_replay} needs "
            f"routing_replay.RoutingReplay(model, '{cfg.routing_replay}')"
        )
    k = cfg.num_minibatches
    if len(samples) % k:
        raise GspoError(
            f"{len(samples)} samples per data-parallel rank do not split into "
            f"loss.num_minibatches={k} minibatches"
        )
    if cfg.old_logprobs == "rollout" or cfg.rollout_correction != "none":
        missing = [i for i, s in enumerate(samples) if s.old_logprobs is None]
        if missing:
            setting = (
                "loss.old_logprobs=rollout"
                if cfg.old_logprobs == "rollout"
                else f"loss.rollout_correction={cfg.rollout_correction}"
            )
            raise GspoError(
                f"{setting} needs the engine's log-probs, but sample {missing[0]} has none"
            )
    minibatches, seq_len = build_minibatches(samples, cfg)
    have_engine = torch.tensor([float(any(s.old_logprobs is not None for s in samples))])
    if dist.is_initialized():
        dist.all_reduce(have_engine, op=dist.ReduceOp.MAX)
    rollout: Dict[str, float] = {}
    t0 = time.perf_counter()
    watch = route_meter is not None
    recorded = False
    old_forward = cfg.old_logprobs == "trainer" or cfg.routing_replay != "none"
    if old_forward or (measure_rollout_diff and have_engine.item()):
        keep = cfg.old_logprobs == "rollout"
        diffs = []
        stack = (
            cfg.logprob_micro_batch_size > cfg.micro_batch_size
            and cfg.routing_replay == "none"
            and not cfg.max_tokens_per_microbatch
        )
        with replay.old_pass() if replay is not None else contextlib.nullcontext():
            if stack:  # fewer, larger forwards (loss.logprob_micro_batch_size)
                diffs = compute_old_logprobs_stacked(
                    model,
                    minibatches,
                    cfg.logprob_micro_batch_size,
                    vocab_size,
                    seq_len,
                    keep_rollout=keep,
                    route_meter=route_meter,
                )
                recorded = watch
            for i, mbs in enumerate([] if stack else minibatches):
                if watch and i == k - 1:  # pi_old's routes: last minibatch, first micro-batch
                    route_meter.start("record", mbs[0].loss_mask)
                    recorded = True
                diffs.append(
                    compute_old_logprobs(model, mbs, vocab_size, seq_len, keep_rollout=keep)
                )
                if watch:
                    route_meter.stop()
        if have_engine.item():
            rollout = reduce_logprob_diff(diffs)
    if replay is not None:
        if replay.mode == "r3":  # its pi_old pass replays: the agreement needs a pass without
            observe_route_agreement(model, minibatches, vocab_size, seq_len)
        rollout.update(replay.take_agreement())
    if cfg.kl_coef:
        if ref_model is None:
            raise GspoError("loss.kl_coef > 0 needs the reference policy (ref_model)")
        for mbs in minibatches:
            fill_ref_logprobs(ref_model, mbs, vocab_size, seq_len)
    scale_moe_aux_loss(model, moe_aux_loss_coeff, cfg.micro_batch_size)
    t1 = time.perf_counter()
    steps = []
    with replay.update_pass() if replay is not None else contextlib.nullcontext():
        for i, mbs in enumerate(minibatches):
            if recorded and i == k - 1:  # ... against pi_theta's after k - 1 optimizer steps
                route_meter.start("compare", mbs[0].loss_mask)
            steps.append(
                train_step(model, optimizer, mbs, cfg, vocab_size, seq_len, scheduler=scheduler)
            )
            if watch:
                route_meter.stop()
    routes = route_meter.result() if watch else {}
    return UpdateResult(
        steps,
        rollout,
        {"perf/old_logprob_seconds": t1 - t0, "perf/train_seconds": time.perf_counter() - t1},
        routes,
    )


def rollout_logprob_diff(
    model, samples: Sequence[Sample], vocab_size: int, micro_batch_size: int = 1
) -> Dict[str, float]:
    """|engine - trainer| log-prob per response token for this rank's ``samples`` (each carrying
    the engine's log-probs in ``old_logprobs``), reduced over all ranks."""
    seq_len = agreed_seq_len(samples)
    n_mb = torch.tensor([-(-len(samples) // micro_batch_size)])
    if dist.is_initialized():
        dist.all_reduce(n_mb, op=dist.ReduceOp.MAX)
    mbs = make_microbatches(samples, micro_batch_size, seq_len, max(1, int(n_mb.item())))
    return reduce_logprob_diff([compute_old_logprobs(model, mbs, vocab_size, seq_len)])
