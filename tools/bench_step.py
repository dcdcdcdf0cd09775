"""Benchmarks of the RL step, side by side with a baseline in one run.

    python tools/bench_step.py step [--steps 12 --nproc 2]
    python tools/bench_step.py long-tail [--samples 64 --budget 1024 --micro-batch-size 4]

step: the demo's RL step (its warm-started model, data, copy reward; 16 prompts x 8 responses,
4 minibatch steps), once through gspo-train (torchrun, launch/configs/tiny_cpu.yaml, the
quickstart's settings) and once as a plain single-process loop of the kind widely used for
small models (transformers generate; the reward; a no-grad forward for pi_old; one
forward/backward per minibatch with the same GSPO loss and torch AdamW; no weight sync).
Prints, per phase (rollout, reward, pi_old forward, update, sync, whole step), the median
seconds after two warm-up steps and the tokens per second for each, the ratio, and the time
from launch to the end of the run.

long-tail: response lengths drawn log-uniformly from 8 to 512 tokens (16-token prompts), as a
reasoning run's are; one policy update (forward, backward, optimizer step over the whole batch)
of a tiny Qwen3-MoE with 1024 positions, once with padded micro-batches (``micro_batch_size``
rows padded to the longest sequence, today's default) and once packed
(``loss.max_tokens_per_microbatch``). Prints, for each, the padding waste (padded positions /
real tokens), the micro-batch count, the best update time of ``--repeats`` and the real tokens
per second, then the ratios; and one JSON line with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def long_tail_samples(n: int, seed: int, vocab: int):
    from gspo_megatron.batch import Sample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = int(round(8 * math.exp(rng.random() * math.log(512 / 8))))
        ids = [rng.randrange(vocab) for _ in range(16 + r)]
        logp = [-rng.random() * 3 for _ in range(r)]
        out.append(Sample(ids[:16], ids[16:], rng.gauss(0, 1), logp))
    return out


def _model(tmp: Path):
    from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.models.qwen3.model import build_model
    from gspo_megatron.parallel import ParallelLayout, init_distributed
    from gspo_megatron.testing.tiny_model import make_hf_model, tiny_moe_config, write_tokenizer

    hf, mcore = tmp / "hf", tmp / "mcore"
    make_hf_model(tiny_moe_config(max_position_embeddings=1024), hf)
    write_tokenizer(hf)
    convert_hf_to_mcore(hf, mcore, show_progress=False)
    layout = ParallelLayout()
    init_distributed(layout)
    spec = checkpoint_spec(mcore)
    model = build_model(spec, layout)
    load_model_checkpoint(model, mcore, spec)
    return model, spec


def long_tail(args) -> dict:
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.optim import OptimConfig, build_optimizer, wrap_for_training
    from gspo_megatron.update import build_minibatches, train_step

    with tempfile.TemporaryDirectory() as tmp:
        model, spec = _model(Path(tmp))
    ddp = wrap_for_training(model, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-6))
    samples = long_tail_samples(args.samples, args.seed, spec.vocab_size)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    base = PolicyLossConfig(
        num_minibatches=1, old_logprobs="rollout", micro_batch_size=args.micro_batch_size
    )
    results = {}
    for name, cfg in (
        ("padded", base),
        ("packed", replace(base, max_tokens_per_microbatch=args.budget)),
    ):
        [mbs], seq_len = build_minibatches(samples, cfg)
        positions = sum(mb.tokens.numel() for mb in mbs)
        times = []
        for _ in range(args.repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            train_step(ddp, optimizer, mbs, cfg, spec.vocab_size, seq_len)
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        results[name] = {
            "micro_batches": len(mbs),
            "row_length": seq_len,
            "padding_waste": (positions - real) / real,
            "update_seconds": best,
            "tokens_per_second": real / best,
        }
    print(f"{args.samples} samples, {real} real tokens (responses log-uniform 8..512)")
    print(f"{'':8} {'micro-batches':>13} {'row':>6} {'waste':>8} {'update s':>9} {'tok/s':>9}")
    for name, r in results.items():
        print(
            f"{name:8} {r['micro_batches']:>13} {r['row_length']:>6} "
            f"{100 * r['padding_waste']:>7.1f}% {r['update_seconds']:>9.3f} "
            f"{r['tokens_per_second']:>9.0f}"
        )
    speedup = results["packed"]["tokens_per_second"] / results["padded"]["tokens_per_second"]
    print(f"packed / padded update tokens/s: {speedup:.2f}x")
    return {"mode": "long-tail", "speedup": speedup, **results}


PHASES = (
    ("rollout", "perf/rollout_seconds"),
    ("reward", "perf/reward_seconds"),
    ("pi_old forward", "perf/old_logprob_seconds"),
    ("update", "perf/train_seconds"),
    ("sync", "perf/sync_seconds"),
    ("step", "perf/step_seconds"),
)


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def gspo_train_steps(init: Path, steps: int, nproc: int, out: Path, overrides=()) -> dict:
    """gspo-train on the demo for ``steps`` steps; per-phase medians from its metrics."""
    import subprocess

    from gspo_megatron.parallel import free_port

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(free_port()), "-m", "gspo_megatron.train"]
    cmd += ["--config", str(repo / "launch/configs/tiny_cpu.yaml")]
    cmd += [f"model.ckpt={init / 'mcore'}", f"data.path={init / 'train.jsonl'}"]
    cmd += [f"train.output_dir={out}", f"train.steps={steps}", "train.save_every=0"]
    cmd += ["train.eval_every=0"]  # the step itself, as the plain loop has no validation
    cmd += list(overrides)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"gspo-train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][2:]
    result = {name: _median([r[key] for r in rows if key in r]) for name, key in PHASES}
    result["rollout tokens"] = _median([r["rollout/tokens"] for r in rows])
    result["train tokens"] = _median([r["train/tokens"] for r in rows])
    result["wall"] = wall
    return result


def baseline_steps(init: Path, steps: int) -> dict:
    """The plain loop: same model, prompts, sampling settings, reward, loss and optimizer
    settings as the demo's config, in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_megatron.config import load_config
    from gspo_megatron.data import DataConfig, load_prompts
    from gspo_megatron.demo import copy_reward
    from gspo_megatron.loss import group_advantages, policy_loss

    t_start = time.perf_counter()
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "launch/configs/tiny_cpu.yaml")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(init / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(init / "hf")
    data = DataConfig(path=str(init / "train.jsonl"))
    prompt_set = load_prompts(data, tok, cfg.rollout.max_prompt_tokens)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    eos, g, k = tok.eos_token_id, cfg.rollout.group_size, cfg.loss.num_minibatches
    rows = []
    for step in range(steps):
        times = {}
        t0 = time.perf_counter()
        prompts = prompt_set.batch(step, cfg.train.prompts_per_step, data.seed, data.shuffle)
        width = max(len(p.ids) for p in prompts)
        ids = torch.tensor([[eos] * (width - len(p.ids)) + p.ids for p in prompts])
        attn = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts])
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=cfg.rollout.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=cfg.rollout.max_new_tokens,
                num_return_sequences=g,
                pad_token_id=eos,
                eos_token_id=eos,
            )[:, width:].tolist()
        responses = []
        for seq in out:  # up to and including the first EOS, as an engine returns it
            responses.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
        t1 = time.perf_counter()
        times["rollout"] = t1 - t0
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        rewards = [
            copy_reward(prompts[i // g].text, t, prompts[i // g].answer)
            for i, t in enumerate(texts)
        ]
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), g)
        t2 = time.perf_counter()
        times["reward"] = t2 - t1
        seqs = [prompts[i // g].ids + r for i, r in enumerate(responses)]
        n = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [eos] * (n - len(s)) for s in seqs])
        mask = torch.zeros(len(seqs), n - 1, dtype=torch.bool)
        for i, s in enumerate(seqs):
            p = len(prompts[i // g].ids)
            mask[i, p - 1 : len(s) - 1] = True

        def logprobs(x):
            logits = model(input_ids=x).logits[:, :-1].float()
            return torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]

        with torch.no_grad():
            old = logprobs(tokens)
        t3 = time.perf_counter()
        times["pi_old forward"] = t3 - t2
        model.train()
        per = len(seqs) // k
        for j in range(k):
            sl = slice(j * per, (j + 1) * per)
            loss, _ = policy_loss(
                logprobs(tokens[sl]),
                old[sl],
                adv[sl],
                mask[sl],
                cfg.loss,
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
        t4 = time.perf_counter()
        times["update"] = t4 - t3
        times["sync"] = 0.0
        times["step"] = t4 - t0
        times["rollout tokens"] = sum(len(r) for r in responses)
        times["train tokens"] = int(mask.sum())
        rows.append(times)
    result = {name: _median([r[name] for r in rows[2:]]) for name, _ in PHASES}
    result["rollout tokens"] = _median([r["rollout tokens"] for r in rows[2:]])
    result["train tokens"] = _median([r["train tokens"] for r in rows[2:]])
    result["wall"] = time.perf_counter() - t_start
    return result


def step(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = args.init
        if init is None:
            from gspo_megatron.demo import DEFAULTS, prepare

            init = tmp / "init"
            prepare(init, **DEFAULTS)
        ours = gspo_train_steps(init, args.steps, args.nproc, tmp / "run", args.overrides)
        base = baseline_steps(init, args.steps)
    print(f"median over steps 3..{args.steps} (16 prompts x 8 responses, 4 minibatch steps)")
    print(f"{'phase':16} {'gspo-train s':>12} {'baseline s':>11} {'ratio':>6}")
    for name, _ in PHASES:
        ratio = ours[name] / base[name] if base[name] else float("nan")
        print(f"{name:16} {ours[name]:>12.3f} {base[name]:>11.3f} {ratio:>6.2f}")
    for name, phase in (("rollout tok/s", "rollout"), ("update tok/s", "update")):
        key = "rollout tokens" if phase == "rollout" else "train tokens"
        a, b = ours[key] / ours[phase], base[key] / base[phase]
        print(f"{name:16} {a:>12.0f} {b:>11.0f} {a / b:>6.2f}")
    print(
        f"{'launch to end':16} {ours['wall']:>12.1f} {base['wall']:>11.1f} "
        f"{ours['wall'] / base['wall']:>6.2f}   ({args.steps} steps)"
    )
    return {"mode": "step", "gspo_train": ours, "baseline": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    st = sub.add_parser("step", help="the demo's RL step: gspo-train vs a plain loop")
    st.add_argument("--steps", type=int, default=12)
    st.add_argument("--nproc", type=int, default=2, help="gspo-train processes (the demo's 2)")
    st.add_argument("--init", type=Path, help="a prepared demo (default: made in a temp dir)")
    st.add_argument(
        "overrides", nargs="*", help="config overrides for the gspo-train run (key=value)"
    )
    lt = sub.add_parser("long-tail", help="padded vs packed micro-batches, long-tail lengths")
    lt.add_argument("--samples", type=int, default=64)
    lt.add_argument("--budget", type=int, default=1024, help="loss.max_tokens_per_microbatch")
    lt.add_argument("--micro-batch-size", type=int, default=4, help="padded micro-batch rows")
    lt.add_argument("--repeats", type=int, default=2)
    lt.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = long_tail(args) if args.mode == "long-tail" else step(args)
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        date=datetime.date.today().isoformat(),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
