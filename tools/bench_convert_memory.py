"""Peak memory of checkpoint conversion against model size, measured in one run.

    python tools/bench_convert_memory.py [--layers 4,16 --experts 32 --hidden 1024]

Writes a synthetic Qwen3-MoE HF checkpoint of the requested size (tensor by tensor, so making it
is itself bounded), then runs `gspo-convert hf-to-mcore` and `mcore-to-hf` as child processes,
sampling their resident memory every 10 ms. Printed side by side: the model size, the largest
tensor, the RSS of a process that only imports the converter (the baseline), and each
conversion's peak RSS (total, and anonymous memory, which excludes file pages the kernel can
drop). The claim under test: peak - baseline is a few largest tensors, not the model size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from gspo_megatron.checkpoint.safetensors_io import (
    StreamingSafetensorsWriter,
    plan_shards,
    shard_file_names,
    tensor_nbytes,
)
from gspo_megatron.models import hf_mapping, spec_from_hf_config

MiB = 1024**2


def _config(args, layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "moe_intermediate_size": args.hidden // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": args.hidden // 16,
        "num_experts": args.experts,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "torch_dtype": args.dtype,
    }


def write_synthetic(hf_dir: Path, cfg: dict) -> tuple:
    spec = spec_from_hf_config(cfg)
    dtype = spec.dtype
    entries = [
        (n, s, dtype)
        for m in hf_mapping(spec).tensor_mappings(spec)
        for n, s in zip(m.hf_names, m.hf_shapes)
    ]
    shards = plan_shards(entries, 512 * MiB)
    names = shard_file_names(len(shards))
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    for shard, fname in zip(shards, names):
        w = StreamingSafetensorsWriter(hf_dir / fname, shard)
        for name, shape, dt in shard:
            w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(dt))
        w.close()
    if len(shards) > 1:
        wm = {n: f for s, f in zip(shards, names) for n, _, _ in s}
        (hf_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wm})
        )
    total = sum(tensor_nbytes(s, d) for _, s, d in entries)
    largest = max(tensor_nbytes(s, d) for _, s, d in entries)
    return total, largest


def _anon_rss(proc: psutil.Process) -> int:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_memory(cmd) -> tuple:
    """Run cmd; return (peak RSS, peak anonymous RSS, seconds) sampled every 10 ms."""
    start = time.time()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
                peak[1] = max(peak[1], _anon_rss(proc))
            except psutil.Error:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{err.decode()[-2000:]}")
    return peak[0], peak[1], time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", default="4,16", help="comma-separated layer counts, one run each")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    py = sys.executable
    base = peak_memory(
        [
            py,
            "-W",
            "ignore",
            "-c",
            "import checkpoints_convert.cli, "
            "gspo_megatron.checkpoint.hf_to_mcore, gspo_megatron.checkpoint.mcore_to_hf",
        ]
    )
    print(
        f"machine: {platform.node()} {platform.machine()} {psutil.cpu_count()} cpus, "
        f"{psutil.virtual_memory().total / 1024**3:.0f} GiB; {time.strftime('%Y-%m-%d')}; "
        f"{args.experts} experts, hidden {args.hidden}, {args.dtype}"
    )
    print(
        f"baseline (import only): peak RSS {base[0] / MiB:.0f} MiB, anon {base[1] / MiB:.0f} MiB\n"
    )
    print(
        f"{'layers':>6} {'model MiB':>10} {'largest MiB':>12} {'step':<12} {'peak RSS':>9} "
        f"{'peak anon':>10} {'anon-base':>10} {'/ model':>8} {'/ largest':>10} {'sec':>6}"
    )
    for layers in [int(x) for x in args.layers.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="gspo-bench-", dir=args.workdir))
        try:
            total, largest = write_synthetic(work / "hf", _config(args, layers))
            h2m = peak_memory(
                [
                    py,
                    "-W",
                    "ignore",
                    "-m",
                    "checkpoints_convert.cli",
                    "hf-to-mcore",
                    "--hf-dir",
                    str(work / "hf"),
                    "--out",
                    str(work / "mc"),
                    "--no-progress",
                ]
            )
            m2h = peak_memory(
                [
                    py,
                    "-W",
                    "ignore",
                    "-m",
                    "checkpoints_convert.cli",
                    "mcore-to-hf",
                    "--ckpt",
                    str(work / "mc"),
                    "--out",
                    str(work / "back"),
                    "--no-progress",
                ]
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name, (rss, anon, secs) in (("hf-to-mcore", h2m), ("mcore-to-hf", m2h)):
            extra = anon - base[1]
            print(
                f"{layers:>6} {total / MiB:10.0f} {largest / MiB:12.0f} {name:<12} {rss / MiB:9.0f} "
                f"{anon / MiB:10.0f} {extra / MiB:10.0f} {extra / total:8.2f} {extra / largest:10.1f} "
                f"{secs:6.1f}"
            )


if __name__ == "__main__":
    main()
