"""Start the rollout engine on a model and sample a few groups: a one-minute check that vLLM
works on this machine with these settings, before committing a long run to it.

    python -m gspo_megatron.rollout.engines.check --hf-dir DIR [--kv-cache-gib 0.1] [--prompt "..."]
    torchrun --nproc-per-node 2 -m gspo_megatron.rollout.engines.check --hf-dir DIR --engine-tp 2

Prints each prompt's completions with their mean log-prob, the skipped prompts and the timing;
a bad setting or a vLLM start-up failure is one line and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed, world_size_from_env
from gspo_megatron.errors import GspoError, exit_on_error
from gspo_megatron.rollout.config import RolloutConfig
from gspo_megatron.rollout.engines.engine import RolloutEngine, check_model_fits


def parse_args(argv=None):
    d = RolloutConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--hf-dir", type=Path, required=True, help="HF model directory (config, tokenizer, weights)"
    )
    ap.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text (repeatable); default: two built-in prompts",
    )
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--engine-tp", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25, help="CPU: KV cache size")
    ap.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on GPU",
    )
    return ap.parse_args(argv)


@exit_on_error
def main() -> None:
    args = parse_args()

    cfg = RolloutConfig(
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        engine_tp=args.engine_tp,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    cfg.validate(world_size_from_env())  # before any heavy work
    if not (args.hf_dir / "config.json").is_file():
        raise GspoError(f"{args.hf_dir}: no config.json (an HF model directory is needed)")
    check_model_fits(args.hf_dir, cfg)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    init_distributed(ParallelLayout())
    engine = RolloutEngine(args.hf_dir, cfg, getattr(torch, dtype))
    tok = engine.llm.get_tokenizer()
    texts = args.prompt or ["w1 w2 w3", "w10 w20 w30 w40"]
    prompts = [tok.encode(t) for t in texts]
    batch = engine.generate(prompts)
    if torch.distributed.get_rank() == 0:
        print(
            f"engine started in {engine.start_seconds:.1f}s; {engine.num_engines} engine(s) of "
            f"TP{cfg.engine_tp}"
        )
        for text, group in zip(texts, batch.groups):
            if group is None:
                print(
                    f"[skipped: {len(tok.encode(text))} tokens > max_prompt_tokens] {text[:60]!r}"
                )
                continue
            for c in group:
                mean = sum(c.logprobs) / max(len(c.logprobs), 1)
                print(
                    f"{text[:40]!r} -> {tok.decode(c.token_ids)[:80]!r} "
                    f"({len(c.token_ids)} tokens, {c.finish_reason}, mean logprob {mean:.3f})"
                )
        print(
            f"{batch.num_tokens} tokens in {batch.seconds:.2f}s; skipped "
            f"{batch.skipped_overlong} overlong, {batch.skipped_empty} empty prompts"
        )
    engine.close()


if __name__ == "__main__":
    main()
