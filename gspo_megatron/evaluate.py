"""gspo-eval: sample a model on held-out prompts, score the samples, report pass@k and friends.

    gspo-eval --model PATH --data FILE [--k K] [--n N] [--temperature T] [--max-new-tokens N]
              [--rewards NAME[,NAME...] | --config FILE] [--out DIR]
    torchrun --nproc-per-node 2 -m gspo_megatron.evaluate ...      (an engine per rank)

PATH is an HF model directory or a megatron checkpoint of this project (converted, or a training
step's ``checkpoints/step_N``; it is converted to HF in a temporary directory first, with the
converter the trainer's export uses). Prompts are read and tokenized, and samples scored, by the
training code (``data``: the field names, the chat template; ``rewards``: built-ins, import
paths, the guarded worker and its timeouts). ``--config`` takes a training config's ``data`` and
``rewards`` sections (and ``rollout.max_prompt_tokens``); otherwise ``--rewards`` names the
functions, weight 1 each.

Each prompt gets ``--n`` samples (default ``--k``), seeded by (``--seed``, prompt position): the
same for any number of engines. Writes ``OUT/samples.jsonl`` (prompt, answer, each response, its
reward) and ``OUT/summary.json`` (``gspo_megatron.passk``: mean reward, pass@k for k = 1, 2, 4,
..., K with the unbiased estimator, a sample passing at reward >= ``--pass-threshold``, maj@n
where responses state answers; mean response length, truncated fraction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from gspo_megatron.errors import GspoError, exit_on_error
from gspo_megatron.rollout.sampling import episode_rewards, reward_item

CHUNK = 64
"""Prompts per engine call: seeds are (seed, call, position in the call), so a fixed chunk
keeps samples independent of the engine count."""


@dataclass
class EvalPlan:
    hf_dir: Optional[Path]
    """The model as an HF directory (None: a megatron checkpoint, converted at start)."""
    ckpt: Optional[Path]
    data: object  # DataConfig
    rewards: object  # RewardConfig
    n: int
    k: int
    temperature: float
    top_p: float
    max_prompt_tokens: int
    max_new_tokens: int
    pass_threshold: float
    seed: int
    kv_cache_gib: float
    out: Path
    agent: object = None
    """--config's agent section when it runs multi-turn episodes (AgentConfig), else None."""
    dtype: str = "auto"
    """The engine's precision: bf16, fp32, or auto (bf16 on GPU, fp32 on CPU)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gspo-eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", required=True, help="HF model directory or megatron checkpoint")
    p.add_argument("--data", default=None, help="JSONL or Parquet prompts (or --config's)")
    p.add_argument("--config", default=None, help="take data and rewards from a training config")
    p.add_argument("--rewards", default=None, help="NAME[,NAME...]: built-ins or module:function")
    p.add_argument("--prompt-field", default=None, help="default: prompt (or --config's)")
    p.add_argument("--answer-field", default=None, help="default: answer (or --config's)")
    p.add_argument("--k", type=int, default=1, help="largest k of pass@k (default 1)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: --k)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longer prompts are skipped (default: the config's, else the model's positions "
        "left after --max-new-tokens)",
    )
    p.add_argument("--pass-threshold", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=None, help="per reward call (default 10)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU only: KV cache size")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="the engine's precision (auto: --config's rollout engine precision, else bf16 on "
        "GPU and fp32 on CPU)",
    )
    p.add_argument("--out", default="outputs/eval")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/summary.json")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> EvalPlan:
    """Every check that needs no model: one line each, before anything heavy."""
    from gspo_megatron.checkpoint.atomic import check_writable_dir
    from gspo_megatron.checkpoint.model import checkpoint_spec
    from gspo_megatron.config import load_config
    from gspo_megatron.data import DataConfig
    from gspo_megatron.models import spec_from_hf_dir
    from gspo_megatron.rewards.registry import resolve
    from gspo_megatron.rewards.runner import RewardConfig, RewardFn
    from gspo_megatron.rollout.config import max_samples_per_prompt

    n = args.n if args.n is not None else args.k
    if args.k < 1:
        raise GspoError(f"--k {args.k}: must be >= 1 (the largest k of pass@k)")
    if n < args.k:
        raise GspoError(
            f"--k {args.k} is more than the {n} samples per prompt (--n): pass@k needs n >= k"
        )
    if not args.temperature >= 0:
        raise GspoError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if n > max_samples_per_prompt():
        raise GspoError(
            f"--n {n}: vLLM samples at most {max_samples_per_prompt()} responses per prompt "
            f"(its VLLM_MAX_N_SEQUENCES)"
        )
    if args.temperature == 0 and n > 1:
        raise GspoError(
            f"--temperature 0 (greedy) gives one response per prompt: --n {n} must be 1"
        )
    if not 0 < args.top_p <= 1:
        raise GspoError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise GspoError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not math.isfinite(args.pass_threshold):
        raise GspoError(f"--pass-threshold {args.pass_threshold}: must be a finite number")

    model = Path(args.model)
    if not model.is_dir():
        raise GspoError(f"--model {model}: no such directory (an HF model or a checkpoint)")
    if (model / "metadata.json").is_file():
        spec, hf_dir, ckpt = checkpoint_spec(model), None, model
    elif (model / "config.json").is_file():
        if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
            raise GspoError(
                f"--model {model}: config.json but no weights (*.safetensors); a training "
                f"checkpoint's hf/ holds the config only: pass the checkpoint directory"
            )
        spec, hf_dir, ckpt = spec_from_hf_dir(model), model, None
    else:
        raise GspoError(
            f"--model {model}: neither an HF model directory (config.json) nor a megatron "
            f"checkpoint (metadata.json)"
        )

    max_prompt = args.max_prompt_tokens
    dtype = args.dtype
    if args.config is not None:
        cfg = load_config(Path(args.config))
        data, rewards = cfg.data, cfg.rewards
        if dtype == "auto":  # the engine the training run samples (and validates) with
            dtype = cfg.model.dtype if cfg.rollout.dtype == "auto" else cfg.rollout.dtype
        agent = cfg.agent if cfg.agent.enabled else None
        if max_prompt is None:
            max_prompt = cfg.rollout.max_prompt_tokens
    else:
        data, rewards, agent = DataConfig(), None, None
    if agent is not None:
        from gspo_megatron.rollout.episodes.env_pool import check_environment
        from gspo_megatron.rollout.machine import machine_envs

        check_environment(agent.environment, timeout_s=agent.env_start_timeout_s)
        machine_envs(agent)
    if args.data is not None:
        data = replace(data, path=args.data)
    if args.prompt_field is not None:
        data = replace(data, prompt_field=args.prompt_field)
    if args.answer_field is not None:
        data = replace(data, answer_field=args.answer_field)
    if args.rewards is not None:
        names = [x.strip() for x in args.rewards.split(",") if x.strip()]
        for name in names:  # named as the user wrote them, before the config's own checks
            resolve(name, where="--rewards")
        rewards = RewardConfig(functions=[RewardFn(x, 1.0) for x in names])
    if rewards is None:
        raise GspoError("no reward functions: pass --rewards NAME[,NAME...] or --config FILE")
    if args.timeout_s is not None:
        rewards = replace(rewards, timeout_s=args.timeout_s)
    data.validate()
    if not Path(data.path).is_file():
        raise GspoError(f"--data {data.path}: no such file")
    rewards.validate()
    positions = spec.max_position_embeddings
    if args.max_new_tokens >= positions:
        raise GspoError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
            f"model's max_position_embeddings={positions}"
        )
    if max_prompt is None:
        max_prompt = min(4096, positions - args.max_new_tokens)
    if max_prompt < 1 or max_prompt + args.max_new_tokens > positions:
        raise GspoError(
            f"--max-new-tokens {args.max_new_tokens} + prompt tokens {max_prompt} exceed the "
            f"model's max_position_embeddings={spec.max_position_embeddings}"
        )
    out = Path(args.out)
    if (out / "summary.json").exists() and not args.overwrite:
        raise GspoError(f"--out {out}: holds an evaluation already (pass --overwrite to replace)")
    # Where the results go is checked before the sampling they would otherwise be lost after.
    check_writable_dir(out, "--out")
    return EvalPlan(
        hf_dir=hf_dir,
        ckpt=ckpt,
        data=data,
        rewards=rewards,
        n=n,
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_prompt_tokens=max_prompt,
        max_new_tokens=args.max_new_tokens,
        pass_threshold=args.pass_threshold,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
        out=out,
        agent=agent,
        dtype=dtype,
    )


def load_eval_prompts(p: EvalPlan, tokenizer, vocab_size: int):
    """The training reader, in file order (no shuffle), answers required if a reward needs them."""
    from gspo_megatron.data import load_prompts
    from gspo_megatron.preflight import reward_needing_answers

    needing = reward_needing_answers(p.rewards, p.data.answer_field, "--rewards", "--answer-field")
    data = replace(p.data, shuffle=False)
    return load_prompts(data, tokenizer, p.max_prompt_tokens, vocab_size, require_answers=needing)


def run(p: EvalPlan, hf_dir: Path, tokenizer, prompts) -> Optional[dict]:
    """Sample, score, summarise; rank 0 writes the files and returns the summary."""
    import torch
    import torch.distributed as dist

    from gspo_megatron.checkpoint.atomic import atomic_write_text
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.progress import progress_bar
    from gspo_megatron.rewards.runner import RewardRunner
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.engines.engine import RolloutEngine

    init_distributed(ParallelLayout())
    on_gpu = torch.cuda.is_available()
    rollout = RolloutConfig(
        group_size=p.n,
        temperature=p.temperature if p.temperature > 0 else 1.0,
        top_p=p.top_p,
        max_prompt_tokens=p.max_prompt_tokens,
        max_new_tokens=p.max_new_tokens,
        kv_cache_gib=p.kv_cache_gib,
        enable_prefix_caching=False,
        seed=p.seed,
    )
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(p.dtype)
    engine = RolloutEngine(hf_dir, rollout, dtype or (torch.bfloat16 if on_gpu else torch.float32))
    rank = dist.get_rank()  # (the engine's teardown ends the process group)
    runner = RewardRunner(p.rewards)
    episodes = None
    if p.agent is not None:  # multi-turn episodes, as the training config runs them
        from gspo_megatron.rollout.episodes.loop import make_runner

        episodes = make_runner(p.agent, rollout, tokenizer, engine)
    try:
        with progress_bar(total=len(prompts), desc="gspo-eval", unit="prompt") as bar:
            rows = sample_and_score(
                groups_of(engine, episodes),
                runner.score_across_ranks,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                prompts,
                p.n,
                greedy=p.temperature == 0,
                progress=bar.update,
            )
    finally:
        runner.close()
        if episodes is not None:
            episodes.envs.close()
        engine.close()
    if rank != 0:
        return None
    summary = {
        **summarize_rows(rows, p.k, p.pass_threshold),
        "model": str(p.ckpt or p.hf_dir),
        "data": str(p.data.path),
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_new_tokens": p.max_new_tokens,
        "pass_threshold": p.pass_threshold,
        "seed": p.seed,
        "dtype": "bf16" if engine.dtype == torch.bfloat16 else "fp32",
        "rewards": [f.name for f in p.rewards.functions],
    }
    p.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p.out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(p.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def groups_of(engine, episodes=None) -> Callable:
    """``generate(prompts, step=, n=, greedy=, stream=)`` for ``sample_and_score``: the
    engine's single responses, or multi-turn episodes (an ``EpisodeRunner``) on it."""
    if episodes is None:
        return lambda prompts, **kw: engine.generate([q.ids for q in prompts], **kw)
    from gspo_megatron.rollout.episodes.loop import agent_rollout

    def run(prompts, step, n, greedy, stream):
        return agent_rollout(episodes, prompts, n, step, stream=stream, greedy=greedy)

    return run


def sample_and_score(
    generate: Callable,
    score: Callable,
    decode: Callable,
    prompts: Sequence,
    n: int,
    greedy: bool = False,
    progress: Optional[Callable[[int], object]] = None,
) -> List[dict]:
    """``n`` responses per prompt from the engines (collective), scored across ranks; per
    prompt a row of its samples. gspo-eval and the trainer's validation both sample through
    here, with seeds keyed by (seed, "eval", call, position in the call): the same policy gives
    the same rows in either, on any number of engines."""
    rows: List[dict] = []
    for call, start in enumerate(range(0, len(prompts), CHUNK)):
        chunk = prompts[start : start + CHUNK]
        batch = generate(chunk, step=call, n=n, greedy=greedy, stream="eval")
        items, comps = [], []
        for q, group in zip(chunk, batch.groups):
            for c in group:
                items.append(reward_item(q, c, decode))
                comps.append(c)
        totals = episode_rewards(score(items)[0], comps)
        for i, q in enumerate(chunk):
            samples = [
                {
                    "response": items[j][1],
                    "reward": totals[j],
                    "tokens": len(comps[j].token_ids),
                    "finish_reason": comps[j].finish_reason,
                    **episode_summary(comps[j]),
                }
                for j in range(i * n, (i + 1) * n)
            ]
            rows.append({"row": q.row, "prompt": q.text, "answer": q.answer, "samples": samples})
        if progress is not None:
            progress(len(chunk))
    return rows


def episode_summary(c) -> dict:
    """A multi-turn sample's turns, tool calls and failure ({} for a single response)."""
    if c.agent is None:
        return {}
    rec = c.agent
    return {
        "turns": rec.turns,
        "tool_calls": rec.tool_calls,
        "malformed_calls": rec.malformed_calls,
        "failure": rec.failure,
        "messages": rec.messages,
    }


def summarize_rows(rows: List[dict], k: int, threshold: float) -> Dict[str, float]:
    """``passk.summarize`` over the rows, with the mean response length and truncated share."""
    from gspo_megatron.passk import summarize
    from gspo_megatron.rewards.builtin import final_answer

    rewards = [[s["reward"] for s in r["samples"]] for r in rows]
    answers = [[final_answer(s["response"]) for s in r["samples"]] for r in rows]
    samples = [s for r in rows for s in r["samples"]]
    return {
        **summarize(rewards, k, threshold, answers),
        "mean_response_tokens": sum(s["tokens"] for s in samples) / len(samples),
        "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
    }


def one_line(summary: dict, out: Path) -> str:
    passes = ", ".join(
        f"{k} {v:.3f}" for k, v in summary.items() if k.startswith(("pass@", "maj@"))
    )
    return (
        f"gspo-eval: {int(summary['prompts'])} prompts x {int(summary['samples_per_prompt'])}: "
        f"mean reward {summary['mean_reward']:.3f}, {passes}; {out}/summary.json"
    )


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from gspo_megatron.models import spec_from_hf_dir
    from gspo_megatron.preflight import load_tokenizer

    p = plan(parse_args(argv))
    # The prompts before any model: a data problem is one line, not a failure after loading.
    tokenizer_dir = p.hf_dir if p.hf_dir is not None else p.ckpt / "hf"
    tokenizer = load_tokenizer(tokenizer_dir)
    prompts = load_eval_prompts(p, tokenizer, spec_from_hf_dir(tokenizer_dir).vocab_size).prompts
    if not prompts:
        raise GspoError(f"{p.data.path}: no prompt fits in {p.max_prompt_tokens} tokens")
    with tempfile.TemporaryDirectory(prefix="gspo-eval-") as tmp:
        hf_dir = p.hf_dir
        if hf_dir is None:  # every rank converts its own copy: nothing shared between them
            from gspo_megatron.checkpoint.mcore_to_hf import convert_mcore_to_hf

            hf_dir = Path(tmp) / "hf"
            convert_mcore_to_hf(p.ckpt, hf_dir, show_progress=False)
        summary = run(p, hf_dir, tokenizer, prompts)
    if summary is not None:
        print(one_line(summary, p.out), file=sys.stderr)


def cli() -> None:
    """gspo-eval: ``main``, then a quick exit."""
    from gspo_megatron.procutil import exit_without_teardown

    main()
    exit_without_teardown()


if __name__ == "__main__":
    cli()
