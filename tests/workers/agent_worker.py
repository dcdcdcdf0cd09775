"""torchrun worker: multi-turn episodes sampled by the real vLLM engines, each environment in
its own process on its engine's rank, then the trainer's log-probs of the model's tokens beside
the engine's. Writes a JSON report on rank 0."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--env", required=True)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.data import Prompt
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed, shutdown
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.update import rollout_logprob_diff
    from gspo_megatron.models import build_model
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine
    from gspo_megatron.rollout.episodes.agent_config import AgentConfig
    from gspo_megatron.rollout.episodes.loop import agent_rollout, make_runner

    ckpt = Path(args.ckpt)
    spec = checkpoint_spec(ckpt)
    init_distributed(ParallelLayout(tp=args.tp))
    model = build_model(spec, ParallelLayout(tp=args.tp))
    load_model_checkpoint(model, ckpt, spec)
    ddp = wrap_for_training(model)
    hf = ckpt.parent / "hf"  # the weights (mcore/hf holds config and tokenizer only)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    rollout = RolloutConfig(
        group_size=2, max_prompt_tokens=256, max_new_tokens=64, kv_cache_gib=0.05
    )
    engine = RolloutEngine(hf, rollout, torch.float32)
    agent = AgentConfig(environment=args.env, max_turns=3, max_tokens_per_turn=24)
    runner = make_runner(agent, rollout, tokenizer, engine)
    rows = [json.loads(line) for line in (ckpt.parent / "train.jsonl").read_text().splitlines()[:6]]
    prompts = [
        Prompt(r["prompt"], [1], r["answer"], i, {**r, "turns": 3}) for i, r in enumerate(rows)
    ]
    batch = agent_rollout(runner, prompts, rollout.group_size, step=0)
    comps = [c for g in batch.groups for c in g]
    samples = [
        Sample(c.prompt_ids, c.token_ids, 0.0, c.logprobs, response_mask=c.loss_mask) for c in comps
    ]
    # Every rank scores its share (the diff is reduced over ranks).
    dp = dist.get_world_size() // args.tp
    rank = dist.get_rank() // args.tp
    diff = rollout_logprob_diff(ddp, samples[rank::dp], spec.vocab_size, micro_batch_size=2)
    report = {
        "diff": diff,
        "turns": [c.agent.turns for c in comps],
        "failures": [c.agent.failure for c in comps],
        "failure_details": [c.agent.failure_detail for c in comps],
        "model_tokens": sum(sum(c.loss_mask) for c in comps),
        "env_tokens": sum(len(c.loss_mask) - sum(c.loss_mask) for c in comps),
        "episodes": [
            {
                "prompt_ids": c.prompt_ids,
                "ids": c.token_ids,
                "mask": c.loss_mask,
                "logprobs": c.logprobs,
                "messages": c.agent.messages,
            }
            for c in comps
        ],
        "extra": batch.extra,
    }
    # Again: the same seeds sample the same episodes (what a resumed run relies on).
    again = agent_rollout(runner, prompts, rollout.group_size, step=0)
    report["repeatable"] = [c.token_ids for g in again.groups for c in g] == [
        c.token_ids for c in comps
    ]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    runner.envs.close()
    engine.close()
    shutdown()


if __name__ == "__main__":
    main()
