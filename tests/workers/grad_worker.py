"""torchrun worker: GSPO forward/backward passes (or full policy updates) in given layouts.

One launch runs a list of cases (``--cases``, a JSON file) one after the other in the same
processes: megatron's parallel state is rebuilt for each case's layout (``init_distributed``),
and each case builds its model from the checkpoint again, so cases share nothing but the
process group and the imports (which cost more than the cases themselves on CPU).

Each case writes, on rank 0, the global metrics and every parameter's full gradient (or the
weights after the update), keyed like the checkpoint, so the test can compare layouts with the
single process. A case ``{"name", "samples", "layout": {"tp", "pp", "ep", "cp"}, "mode":
"grads"|"update", "variant", "clip_low", "clip_high", "micro_batch_size", "num_minibatches",
"trainer_old_logprobs", "kl_coef", "routing_replay", "lr", "route_meter", "rollout_correction",
"correction_cap", "max_tokens_per_microbatch", "overlap", "bucket_elements"}``: with a ``rollout_correction`` the grads mode takes the samples' log-probs as
the engine's and pi_old from a trainer forward first; with ``kl_coef`` the
grads mode takes the reference log-probs from the samples and the update mode builds the
reference policy from the checkpoint (``gspo_megatron.learner.reference``) and also reports its log-probs
per sample; ``route_meter`` reports ``train/moe_route_change`` of the update.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from cases import run_cases
from megatron.core import parallel_state as ps

from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
from gspo_megatron.distributed.context_parallel import zigzag_indices
from gspo_megatron.distributed.ddp import wrap_for_training
from gspo_megatron.distributed.parallel import ParallelLayout, check_layout, init_distributed
from gspo_megatron.learner.batch import Sample
from gspo_megatron.learner.old_logprobs import compute_old_logprobs, observe_route_agreement
from gspo_megatron.learner.optim import OptimConfig, build_optimizer
from gspo_megatron.learner.reference import build_reference, fill_ref_logprobs
from gspo_megatron.learner.route_change import RouteChangeMeter
from gspo_megatron.learner.routing_replay import RoutingReplay
from gspo_megatron.learner.update import (
    agreed_seq_len,
    build_minibatches,
    make_microbatches,
    policy_update,
    train_step,
)
from gspo_megatron.loss import PolicyLossConfig
from gspo_megatron.models import build_model
from gspo_megatron.testing.gather import gather_full_tensors, grads_as_data


def my_samples(case: dict) -> list:
    """This data-parallel rank's samples: minibatch k of the single process is
    samples[k*M:(k+1)*M], and each rank gets its slice of every minibatch, so the minibatches
    hold the same sequences in every layout."""
    rows = json.loads(Path(case["samples"]).read_text())
    kl = case.get("kl_coef", 0.0)
    samples = [
        Sample(
            r["prompt_ids"],
            r["response_ids"],
            r["advantage"],
            None if case.get("trainer_old_logprobs") else r.get("old_logprobs"),
            r.get("ref_logprobs") if kl and case["mode"] == "grads" else None,
            routes=np.array(r["routes"]) if case.get("engine_routes") else None,
            response_mask=r.get("response_mask"),
        )
        for r in rows
    ]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    k = case.get("num_minibatches", 2) if case["mode"] == "update" else 1
    m = len(samples) // k
    return [
        s
        for i in range(k)
        for s in samples[i * m + dp_rank * (m // dp) : i * m + (dp_rank + 1) * (m // dp)]
    ]


def reference_logprobs(reference, samples: list, vocab_size: int) -> dict:
    """The reference policy's log-prob of every response token, keyed by the sample's
    json([prompt_ids, response_ids]), gathered from the ranks that hold them (last pipeline
    stage, TP rank 0; CP 1 in these cases)."""
    seq_len = agreed_seq_len(samples)
    mbs = make_microbatches(samples, 1, seq_len)
    fill_ref_logprobs(reference, mbs, vocab_size, seq_len)
    mine = {}
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for s, mb in zip(samples, mbs):
            p, r = len(s.prompt_ids), len(s.response_ids)
            key = json.dumps([s.prompt_ids, s.response_ids])
            mine[key] = mb.ref_logprobs[0, p - 1 : p - 1 + r].tolist()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {i: lp for part in parts for i, lp in part.items()}


def logprobs_by_sample(mbs: list, samples: list, micro_batch_size: int) -> dict:
    """pi_old's log-prob of every response token (``mb.old_logprobs``), keyed by the sample's
    json([prompt_ids, response_ids]): CP shards put back in place, gathered from the ranks that
    hold them (last pipeline stage, TP rank 0, CP rank 0)."""
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    mine = {}
    if ps.is_pipeline_last_stage():
        for k, mb in enumerate(mbs):
            seq = mb.tokens.shape[1] * cp
            full = torch.zeros(mb.tokens.shape[0], seq)
            full[:, zigzag_indices(seq, cp, cp_rank)] = mb.old_logprobs
            if cp > 1:
                dist.all_reduce(full, group=ps.get_context_parallel_group())
            for j in range(mb.tokens.shape[0]):
                i = k * micro_batch_size + j
                if i >= len(samples) or ps.get_tensor_model_parallel_rank() or cp_rank:
                    continue
                s = samples[i]
                p, r = len(s.prompt_ids), len(s.response_ids)
                mine[json.dumps([s.prompt_ids, s.response_ids])] = full[
                    j, p - 1 : p - 1 + r
                ].tolist()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {key: lp for part in parts for key, lp in part.items()}


def run_case(case: dict, ckpt: Path) -> dict:
    spec = checkpoint_spec(ckpt)
    layout = ParallelLayout(**case.get("layout", {}))
    init_distributed(layout)
    check_layout(layout, spec, dist.get_world_size())
    model = build_model(spec, layout)
    load_model_checkpoint(model, ckpt, spec)
    update = case["mode"] == "update"
    ddp = wrap_for_training(
        model,
        use_distributed_optimizer=update,
        overlap_grad_reduce=case.get("overlap", False),
        grad_bucket_elements=case.get("bucket_elements", 0),
    )
    early = count_early_starts(ddp) if case.get("overlap") else None
    mine = my_samples(case)
    kl = case.get("kl_coef", 0.0)
    correction = case.get("rollout_correction", "none")
    engine_is_old = mine[0].old_logprobs is not None and correction == "none"
    cfg = PolicyLossConfig(
        variant=case.get("variant", "gspo"),
        clip_low=case.get("clip_low", 3e-4),
        clip_high=case.get("clip_high", 4e-4),
        micro_batch_size=case.get("micro_batch_size", 2),
        num_minibatches=case.get("num_minibatches", 2),
        kl_coef=kl,
        routing_replay=case.get("routing_replay", "none"),
        old_logprobs="rollout" if engine_is_old else "trainer",
        rollout_correction=correction,
        correction_cap=case.get("correction_cap", 2.0),
        max_tokens_per_microbatch=case.get("max_tokens_per_microbatch", 0),
        logprob_micro_batch_size=case.get("logprob_micro_batch_size", 0),
    )
    if case["mode"] == "logprobs":  # the pi_old forward alone, as policy_update runs it
        replay = RoutingReplay(ddp, cfg.routing_replay)
        seq_len = agreed_seq_len(mine)
        n_mb = -(-len(mine) // cfg.micro_batch_size)
        mbs = make_microbatches(mine, cfg.micro_batch_size, seq_len, num_microbatches=n_mb)
        with replay.old_pass():
            compute_old_logprobs(ddp, mbs, spec.vocab_size, seq_len)
        if replay.mode == "r3":
            observe_route_agreement(ddp, [mbs], spec.vocab_size, seq_len)
        return {
            "logprobs": logprobs_by_sample(mbs, mine, cfg.micro_batch_size),
            "agreement": replay.take_agreement(),
        }
    if not update:
        [mbs], seq_len = build_minibatches(mine, replace(cfg, num_minibatches=1))
        if cfg.old_logprobs == "trainer":
            compute_old_logprobs(ddp, mbs, spec.vocab_size, seq_len)
        metrics = train_step(ddp, None, mbs, cfg, spec.vocab_size, seq_len)
        with grads_as_data(ddp):
            tensors = gather_full_tensors(ddp)
        return {"metrics": metrics, "tensors": tensors}
    reference = build_reference(spec, layout, torch.float32, ckpt) if kl else None
    result = {}
    if reference is not None:
        result["ref_logprobs"] = reference_logprobs(reference, mine, spec.vocab_size)
    optimizer = build_optimizer(ddp, OptimConfig(lr=case.get("lr", 1e-3), clip_grad=1.0))
    if cfg.routing_replay != "none" or case.get("engine_routes"):  # replay, or agreement
        RoutingReplay(ddp, cfg.routing_replay)
    meter = RouteChangeMeter(ddp) if case.get("route_meter") else None
    update = policy_update(
        ddp, optimizer, mine, cfg, spec.vocab_size, ref_model=reference, route_meter=meter
    )
    result.update(metrics=update.steps, routes=update.routes, tensors=gather_full_tensors(ddp))
    if early is not None:
        result["early_starts"], result["bucket_groups"] = early["early"], early["groups"]
    result["rollout"] = update.rollout
    return result


def count_early_starts(ddp) -> dict:
    """Counts the gradient-bucket reductions megatron started from its gradient hooks, i.e.
    inside a backward, rather than from the schedule's finalisation after it."""
    groups = list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups)
    state = {"early": 0, "groups": len(groups), "finishing": False}
    for group in groups:

        def start(*args, _start=group.start_grad_sync, **kwargs):
            state["early"] += not state["finishing"]
            return _start(*args, **kwargs)

        group.start_grad_sync = start
    finish = ddp.finish_grad_sync

    def finishing(*args, **kwargs):
        state["finishing"] = True
        try:
            return finish(*args, **kwargs)
        finally:
            state["finishing"] = False

    ddp.finish_grad_sync = finishing
    return state


if __name__ == "__main__":
    run_cases(run_case)
