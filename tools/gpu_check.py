"""Every GPU check of the project in one run, printed as one table.

    bash tools/gpu_check.sh [OUT_DIR]            # the wrapper: refuses without a GPU, runs `all`
    python tools/gpu_check.py all --out DIR
    python tools/gpu_check.py step [--layers 2 --seq 4096 --batch 4 --steps 3 | --tiny]

te: whether Transformer Engine imports (its version) and which layer spec build_model takes
(TE's fused modules, or megatron's local ones).

parity: a random Qwen3-MoE (head_dim 128, 8 experts, top 2) converted to megatron; the log-probs
of ``gspo_megatron.score`` (torchrun, one rank) in fp32 and in bf16 against HF transformers in
fp32 (the reference, TF32 off) and in bf16 (the yardstick for bf16 rounding): fp32 passes within
1e-3, bf16 when megatron's worst error is at most twice HF bf16's own.

step: one policy update (forward, backward, distributed-optimizer step; GSPO loss, log-probs
vocabulary-parallel) of a Qwen3-30B-A3B-shaped slice: the full width (hidden 2048, 32 query and 4
key/value heads of 128, 128 experts of 768 with 8 per token, vocabulary 151936) with ``--layers``
layers, random weights, bf16, ``--batch`` sequences of ``--seq`` tokens in micro-batches of one.
Reports the median step after a warm-up, tokens/s, TFLOP/s (``gspo_megatron.flops``: 3x the
forward's matrix FLOPs), MFU against the card's dense bf16 peak, and peak GPU memory. ``--tiny``
runs the same code on the demo-sized model in fp32 (on CPU too: the test suite's smoke run).

Prints the table and writes ``OUT/gpu_check.json`` (with the device and the date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gspo_megatron.flops import peak_bf16_tflops, train_flops  # noqa: E402
from gspo_megatron.models import ModelSpec, spec_from_hf_config  # noqa: E402


def qwen3_30b_a3b_slice(layers: int, seq: int) -> ModelSpec:
    """Qwen3-30B-A3B's shapes (its config.json) with fewer layers."""
    return spec_from_hf_config(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": 151936,
            "hidden_size": 2048,
            "num_hidden_layers": layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 6144,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "tie_word_embeddings": False,
            "max_position_embeddings": max(seq, 4096),
            "num_experts": 128,
            "moe_intermediate_size": 768,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "torch_dtype": "bfloat16",
        },
        "the Qwen3-30B-A3B slice",
    )


def tiny_slice(seq: int) -> ModelSpec:
    """The demo's model shape (gspo_megatron.tasks.demo), for a run on CPU."""
    return spec_from_hf_config(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": 256,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "intermediate_size": 256,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e4,
            "tie_word_embeddings": False,
            "max_position_embeddings": max(seq, 128),
            "num_experts": 4,
            "moe_intermediate_size": 128,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
        "the tiny slice",
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_check(args) -> dict:
    """One policy update of a model built from a spec, timed."""
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer
    from gspo_megatron.learner.update import build_minibatches, train_step
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.models import build_model

    on_gpu = torch.cuda.is_available()
    spec = tiny_slice(args.seq) if args.tiny else qwen3_30b_a3b_slice(args.layers, args.seq)
    dtype = torch.bfloat16 if on_gpu and not args.tiny else torch.float32
    layout = ParallelLayout()
    init_distributed(layout)
    torch.manual_seed(0)
    model = build_model(spec, layout, dtype)
    ddp = wrap_for_training(model, use_distributed_optimizer=True)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-6))
    rng = random.Random(0)
    prompt = min(256, args.seq // 4)
    samples = []
    for _ in range(args.batch):
        ids = [rng.randrange(spec.vocab_size) for _ in range(args.seq)]
        logp = [-rng.random() * 3 for _ in range(args.seq - prompt)]
        samples.append(Sample(ids[:prompt], ids[prompt:], rng.gauss(0, 1), logp))
    cfg = PolicyLossConfig(num_minibatches=1, old_logprobs="rollout", micro_batch_size=1)
    [microbatches], seq_len = build_minibatches(samples, cfg)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        train_step(ddp, optimizer, microbatches, cfg, spec.vocab_size, seq_len)
        _sync()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[args.warmup :])
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    flops = train_flops(spec, lengths)
    device = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    peak = args.peak_tflops or (peak_bf16_tflops(device) if on_gpu else None)
    tflops = flops / seconds / 1e12
    return {
        "shape": "tiny (demo)" if args.tiny else f"Qwen3-30B-A3B, {args.layers} layers",
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": sum(lengths),
        "step_seconds": seconds,
        "tokens_per_second": sum(lengths) / seconds,
        "train_flops": flops,
        "tflops": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "device": device,
    }


def te_check() -> dict:
    """Transformer Engine's presence and the layer spec the model builder takes."""
    from gspo_megatron.models import have_transformer_engine

    try:
        import transformer_engine

        version = getattr(transformer_engine, "__version__", "?")
    except Exception as err:  # ImportError, or an install that fails at import
        return {"ok": None, "te": f"not importable ({type(err).__name__})", "spec": "local"}
    return {
        "ok": have_transformer_engine(),
        "te": version,
        "spec": "te" if have_transformer_engine() else "local",
    }


def _score(ckpt: Path, rows: Path, out: Path, dtype: str) -> None:
    from gspo_megatron.distributed.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    cmd += ["--master-port", str(free_port()), "-m", "gspo_megatron.score", "--ckpt", str(ckpt)]
    cmd += ["--input", str(rows), "--output", str(out), "--overwrite", "--dtype", dtype]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"gspo_megatron.score --dtype {dtype} failed: {proc.stderr[-2000:]}")


def parity_check(work: Path) -> dict:
    """megatron fp32 / bf16 log-probs against HF fp32 (reference) and HF bf16 (yardstick)."""
    from transformers import AutoModelForCausalLM

    from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from gspo_megatron.testing.hf_reference import (
        hf_logprobs,
        max_abs_diff,
        read_logprobs,
        write_rows,
    )
    from gspo_megatron.testing.tiny_model import (
        make_hf_model,
        random_rows,
        tiny_moe_config,
        write_tokenizer,
    )

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = tiny_moe_config(
        hidden_size=512,
        head_dim=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_local_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[],
        max_position_embeddings=256,
    )
    hf, ckpt = work / "hf", work / "mcore"
    make_hf_model(config, hf, seed=0)
    write_tokenizer(hf)
    convert_hf_to_mcore(hf, ckpt, show_progress=False)
    rows = random_rows(16, config.vocab_size, seed=0, max_prompt=48, max_response=64)
    write_rows(rows, work / "rows.jsonl")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reference, yardstick = None, None
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype).to(dev)
        lp = hf_logprobs(model, rows)
        reference, yardstick = (lp, yardstick) if dtype == torch.float32 else (reference, lp)
        del model
    result = {"hf_bf16_vs_fp32": max_abs_diff(yardstick, reference)}
    for name in ("fp32", "bf16"):
        out = work / f"megatron_{name}.jsonl"
        _score(ckpt, work / "rows.jsonl", out, name)
        result[f"megatron_{name}_vs_fp32"] = max_abs_diff(read_logprobs(out), reference)
    result["fp32_ok"] = result["megatron_fp32_vs_fp32"] <= 1e-3
    result["bf16_ok"] = result["megatron_bf16_vs_fp32"] <= 2 * result["hf_bf16_vs_fp32"]
    return result


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    lines = [f"{'check':<28} {'result':<7} figures"]
    te = results.get("te")
    if te:
        verdict = {True: "ok", False: "off", None: "absent"}[te["ok"]]
        lines.append(
            f"{'transformer engine':<28} {verdict:<7} TE {te['te']}, layer spec {te['spec']}"
        )
    par = results.get("parity")
    if par:
        lines.append(
            f"{'parity fp32 vs HF fp32':<28} {'ok' if par['fp32_ok'] else 'FAIL':<7} "
            f"max |dlogp| {par['megatron_fp32_vs_fp32']:.2e} (tol 1e-3)"
        )
        lines.append(
            f"{'parity bf16 vs HF fp32':<28} {'ok' if par['bf16_ok'] else 'FAIL':<7} "
            f"max |dlogp| {par['megatron_bf16_vs_fp32']:.2e}, HF bf16's own "
            f"{par['hf_bf16_vs_fp32']:.2e} (tol 2x)"
        )
    st = results.get("step")
    if st:
        mem = _fmt(st["peak_memory_gib"], ".1f")
        lines.append(
            f"{'step ' + st['shape']:<28} {'ok':<7} {st['tokens']} tokens in "
            f"{st['step_seconds']:.3f} s: {st['tokens_per_second']:.0f} tok/s, "
            f"{st['tflops']:.3g} TFLOP/s, MFU {_fmt(st['mfu'] and 100 * st['mfu'], '.1f')}% "
            f"of {_fmt(st['peak_tflops'], '.0f')}, peak memory {mem} GiB ({st['dtype']})"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("check", choices=("all", "te", "parity", "step"))
    ap.add_argument("--out", type=Path, default=None, help="directory for gpu_check.json")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="the demo-sized model (runs on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 peak")
    args = ap.parse_args()
    if args.check in ("all", "parity") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (parity needs one)", file=sys.stderr)
        return 2
    results = {}
    if args.check in ("all", "te"):
        results["te"] = te_check()
    if args.check in ("all", "parity"):
        with tempfile.TemporaryDirectory() as tmp:
            results["parity"] = parity_check(Path(tmp))
    if args.check in ("all", "step"):
        results["step"] = step_check(args)
    results["date"] = datetime.date.today().isoformat()
    results["torch"] = torch.__version__
    print(table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    par = results.get("parity")
    return 1 if par and not (par["fp32_ok"] and par["bf16_ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
