"""Benchmarks of the RL step, side by side with a baseline in one run.

    python tools/bench_step.py step [--shape demo|m|l] [--steps 12] [--nproc 2 1]
    python tools/bench_step.py long-tail [--samples 64 --budget 1024 --micro-batch-size 4]

step: the demo's RL step (its data and copy reward; 16 prompts x 8 responses, 4 minibatch
steps), through gspo-train (torchrun, launch/configs/tiny_cpu.yaml, the quickstart's settings)
with the demo's two processes and with one process of all the machine's threads, and as a plain
single-process loop of the kind widely used for small models (transformers generate; the reward;
a no-grad forward for pi_old; one forward/backward per minibatch with the same GSPO loss and
torch AdamW; no weight sync). ``--shape``: the demo's model (hidden 128, 2 layers, 4 experts,
warm-started) or a larger random one, ``m`` (hidden 512, 4 layers, 8 experts top-2) or ``l``
(hidden 768, 6 layers, 16 experts top-4), both with responses of 16 new tokens and no warm start
(a random policy seldom ends early, so the responses are full length). Prints, per phase
(rollout, reward, pi_old forward, update, sync, whole step), the median seconds after two
warm-up steps of each run, the ratio to the plain loop, and the model FLOP/s of the pi_old
forward and of the update (``gspo_megatron.flops``) beside the machine's fp32 matrix-multiply
rate measured in the same run; then the time from launch to the end of each run. ``--rounds
N`` repeats ours and the plain loop N times, taking turns going first, and shows the medians
over rounds and each round's step ratio (how far the machine's drift moves the figures).
Both runs hold the policy (``--lr``, default 1e-30) so that they sample the same amount of work
at every step; the sampled tokens per step are printed beside the phases. Each engine gets the
KV cache that holds its share of the step at once (``rollout.kv_cache_gib``, at least the
config's), as the plain loop generates the step as one batch.

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
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def long_tail_samples(n: int, seed: int, vocab: int):
    from gspo_megatron.learner.batch import Sample

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
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.models import build_model
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
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer
    from gspo_megatron.learner.update import build_minibatches, train_step
    from gspo_megatron.loss import PolicyLossConfig

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


SHAPES = {
    "demo": dict(model=None, max_new_tokens=None, warm_start_steps=None),
    "m": dict(
        model=dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            moe_intermediate_size=384,
        ),
        max_new_tokens=16,
        warm_start_steps=0,
    ),
    "l": dict(
        model=dict(
            hidden_size=768,
            num_hidden_layers=6,
            num_local_experts=16,
            num_experts_per_tok=4,
            num_attention_heads=12,
            num_key_value_heads=4,
            moe_intermediate_size=512,
        ),
        max_new_tokens=16,
        warm_start_steps=0,
    ),
}
"""Model shapes of ``step --shape`` (transformers config fields over the demo's model; head_dim
64, all layers MoE), their response length and warm start (None: the demo's)."""


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 20) -> float:
    """The machine's fp32 matrix-multiply rate on ``threads`` threads (best of ``repeats``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return 2 * n**3 / best / 1e9


def kv_cache_gib(spec, cfg, shape: dict, sequences: int) -> float:
    """An engine's KV cache for ``sequences`` at once (at least the config's): the plain loop
    generates the step as one batch, and a cache too small for it makes vLLM generate in waves
    (gspo-train says so at start-up; at `m` the demo config's 0.05 GiB held 51 of 128)."""
    from gspo_megatron.rollout.engines.kv_cache import block_bytes, holding_gib

    tokens = cfg.rollout.max_prompt_tokens + (shape["max_new_tokens"] or cfg.rollout.max_new_tokens)
    block = 128  # vLLM's CPU block size
    need = holding_gib(sequences, tokens, block, block_bytes(spec, 4, 1, block))
    return max(cfg.rollout.kv_cache_gib, need)


def gspo_train_steps(
    init: Path, steps: int, nproc: int, out: Path, overrides=(), threads: int = 1
) -> dict:
    """gspo-train on the demo for ``steps`` steps; per-phase medians from its metrics."""
    import subprocess

    from gspo_megatron.distributed.parallel import free_port

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(free_port()), "-m", "gspo_megatron.train"]
    cmd += ["--config", str(repo / "launch/configs/tiny_cpu.yaml")]
    cmd += [f"model.ckpt={init / 'mcore'}", f"data.path={init / 'train.jsonl'}"]
    cmd += [f"train.output_dir={out}", f"train.steps={steps}", "train.save_every=0"]
    cmd += ["train.eval_every=0"]  # the step itself, as the plain loop has no validation
    cmd += list(overrides)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
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


def baseline_steps(
    init: Path, steps: int, max_new_tokens: Optional[int] = None, lr: Optional[float] = None
) -> dict:
    """The plain loop: same model, prompts, sampling settings, reward, loss and optimizer
    settings as the demo's config (``lr`` in place of its learning rate), in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_megatron.config import load_config
    from gspo_megatron.data import DataConfig, load_prompts
    from gspo_megatron.loss import group_advantages, policy_loss
    from gspo_megatron.tasks.demo import copy_reward

    t_start = time.perf_counter()
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "launch/configs/tiny_cpu.yaml")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(init / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(init / "hf")
    data = DataConfig(path=str(init / "train.jsonl"))
    prompt_set = load_prompts(data, tok, cfg.rollout.max_prompt_tokens)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr or cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    eos, g, k = tok.eos_token_id, cfg.rollout.group_size, cfg.loss.num_minibatches
    max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
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
                max_new_tokens=max_new_tokens,
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
        times["sequence tokens"] = sum(len(x) for x in seqs)
        rows.append(times)
    result = {name: _median([r[name] for r in rows[2:]]) for name, _ in PHASES}
    result["rollout tokens"] = _median([r["rollout tokens"] for r in rows[2:]])
    result["train tokens"] = _median([r["train tokens"] for r in rows[2:]])
    result["sequence tokens"] = _median([r["sequence tokens"] for r in rows[2:]])
    result["wall"] = time.perf_counter() - t_start
    return result


def _flops_rates(result: dict, spec, prompt_len: float, sequences: int) -> dict:
    """Model GFLOP/s of the pi_old forward and of the update, from the run's token counts
    (every sequence taken at the mean length: the attention's n^2 term is a few per cent)."""
    from gspo_megatron.flops import forward_flops, train_flops

    if "sequence tokens" in result:
        mean_len = result["sequence tokens"] / sequences
    else:
        mean_len = prompt_len + result["rollout tokens"] / sequences
    lengths = [round(mean_len)] * sequences
    return {
        "pi_old forward": forward_flops(spec, lengths) / result["pi_old forward"] / 1e9,
        "update": train_flops(spec, lengths) / result["update"] / 1e9,
    }


def _median_of(results) -> dict:
    """Per key, the median over rounds of one run's figures (phases' medians, tokens, wall)."""
    results = list(results)
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def step(args) -> dict:
    from transformers import AutoTokenizer

    from gspo_megatron.checkpoint.model import checkpoint_spec
    from gspo_megatron.config import load_config

    shape = SHAPES[args.shape]
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "launch/configs/tiny_cpu.yaml")
    sequences = cfg.train.prompts_per_step * cfg.rollout.group_size
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = args.init
        if init is None:
            from gspo_megatron.tasks.demo import DEFAULTS, prepare

            init = tmp / "init"
            settings = dict(DEFAULTS)
            if shape["warm_start_steps"] is not None:
                settings["warm_start_steps"] = shape["warm_start_steps"]
            prepare(init, **settings, model_shape=shape["model"])
        spec = checkpoint_spec(init / "mcore")
        tok = AutoTokenizer.from_pretrained(init / "hf")
        rows = [json.loads(x) for x in (init / "train.jsonl").read_text().splitlines()[:64]]
        prompt_len = sum(len(tok.encode(r["prompt"])) for r in rows) / len(rows)
        rate = matmul_gflops(threads)
        extra = [f"rollout.max_new_tokens={shape['max_new_tokens']}"] * bool(
            shape["max_new_tokens"]
        )
        rounds = []
        for r in range(args.rounds):
            # Ours and the plain loop take turns going first: a machine whose speed drifts
            # over minutes (shared VMs do, by 10-20%) then tilts the rounds both ways.
            ours_first = r % 2 == 0
            base = (
                None
                if ours_first
                else baseline_steps(init, args.steps, shape["max_new_tokens"], args.lr)
            )
            runs = {}
            for nproc in args.nproc:
                # One micro-batch per minibatch and one pi_old forward per rank, as the demo's
                # config has for its two processes.
                per_rank = sequences // nproc
                sizes = [
                    f"loss.micro_batch_size={per_rank // cfg.loss.num_minibatches}",
                    f"loss.logprob_micro_batch_size={per_rank}",
                    f"rollout.kv_cache_gib={kv_cache_gib(spec, cfg, shape, per_rank):g}",
                ]
                runs[f"{nproc} proc"] = gspo_train_steps(
                    init,
                    args.steps,
                    nproc,
                    tmp / f"run{nproc}_{r}",
                    extra + sizes + [f"optim.lr={args.lr}"] * bool(args.lr) + list(args.overrides),
                    threads=max(1, threads // nproc),
                )
            if ours_first:
                base = baseline_steps(init, args.steps, shape["max_new_tokens"], args.lr)
            rounds.append((runs, base))
        runs = {name: _median_of(ours[name] for ours, _ in rounds) for name in rounds[0][0]}
        base = _median_of(b for _, b in rounds)
    print(
        f"shape {args.shape}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.num_experts} experts top-{spec.moe_top_k}; {sequences} sequences of "
        f"{prompt_len:.0f} prompt tokens + up to {shape['max_new_tokens'] or cfg.rollout.max_new_tokens} "
        f"new; median over steps 3..{args.steps}, {cfg.loss.num_minibatches} minibatch steps"
    )
    head = f"{'phase':16}" + "".join(f" {name + ' s':>10} {'ratio':>6}" for name in runs)
    print(head + f" {'plain s':>9}")
    for name, _ in PHASES:
        line = f"{name:16}"
        for ours in runs.values():
            ratio = ours[name] / base[name] if base[name] else float("nan")
            line += f" {ours[name]:>10.3f} {ratio:>6.2f}"
        print(line + f" {base[name]:>9.3f}")
    line = f"{'sampled tokens':16}"
    for ours in runs.values():
        line += f" {ours['rollout tokens']:>10.0f} {'':>6}"
    print(line + f" {base['rollout tokens']:>9.0f}   (a step's, median: equal work when alike)")
    if len(rounds) > 1:
        line = f"{'step by round':16}"
        for name in runs:
            ratios = [ours[name]["step"] / b["step"] for ours, b in rounds]
            line += f" {'/'.join(f'{x:.2f}' for x in ratios):>17}"
        print(line + f"   (ratio in each of {len(rounds)} rounds; the table: medians of rounds)")
    rates = {name: _flops_rates(ours, spec, prompt_len, sequences) for name, ours in runs.items()}
    base_rates = _flops_rates(base, spec, prompt_len, sequences)
    for phase in ("pi_old forward", "update"):
        line = f"{phase[:10] + ' GFLOP/s':16}"
        for name in runs:
            r = rates[name][phase]
            line += f" {r:>10.1f} {100 * r / rate:>5.0f}%"
        print(line + f" {base_rates[phase]:>9.1f} ({100 * base_rates[phase] / rate:.0f}%)")
    print(f"{'fp32 matmul':16} {rate:>10.1f} GFLOP/s on {threads} threads (1024^3, best of 20)")
    line = f"{'launch to end':16}"
    for ours in runs.values():
        line += f" {ours['wall']:>10.1f} {ours['wall'] / base['wall']:>6.2f}"
    print(line + f" {base['wall']:>9.1f}   ({args.steps} steps)")
    return {
        "mode": "step",
        "shape": args.shape,
        "matmul_gflops": rate,
        "gspo_train": runs,
        "baseline": base,
        "rounds": [{"gspo_train": ours, "baseline": b} for ours, b in rounds],
        "gflops": {**rates, "plain": base_rates},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    st = sub.add_parser("step", help="the demo's RL step: gspo-train vs a plain loop")
    st.add_argument("--steps", type=int, default=12)
    st.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        default=[2, 1],
        help="gspo-train process counts to run (the demo's 2, and 1 with all threads)",
    )
    st.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="model size")
    st.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat ours and the plain loop this many times, taking turns going first; "
        "the table shows medians over rounds and the step ratio of each round",
    )
    st.add_argument(
        "--lr",
        type=float,
        default=1e-30,
        help="learning rate of both runs (0: the demo's). The default holds the policy (Adam's "
        "steps fall below fp32's resolution), so that both sample from the same policy and do "
        "the same work: learning at the demo's rate, two runs drift apart in response length "
        "(measured at shape m: 1629 against 2048 sampled tokens a step)",
    )
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
