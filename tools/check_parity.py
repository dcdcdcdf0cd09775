"""Convert a HF model to megatron and check Megatron log-probs against HF transformers.

    python tools/check_parity.py --hf-dir DIR --work DIR [--layouts "1;2:--tp 2;2:--ep 2"]

For each layout ("NPROC[:score args]"), runs ``gspo_megatron.score`` under torchrun on the
converted checkpoint and prints the max |logp_megatron - logp_hf| over random rows. Exits 1 if
any layout exceeds --tol. Use it after converting a real checkpoint, before training on it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from gspo_megatron.distributed.parallel import free_port
from gspo_megatron.models import spec_from_hf_dir
from gspo_megatron.testing.hf_reference import hf_logprobs, max_abs_diff, read_logprobs, write_rows
from gspo_megatron.testing.tiny_model import random_rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--work", required=True, help="directory for the checkpoint and outputs")
    ap.add_argument("--layouts", default="1;2:--tp 2;2:--pp 2;2:--ep 2")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    hf_dir, work = Path(args.hf_dir), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = spec_from_hf_dir(hf_dir)
    ckpt = work / "mcore"
    if not (ckpt / "metadata.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "checkpoints_convert.cli",
                "hf-to-mcore",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(ckpt),
            ],
            check=True,
        )

    from transformers import AutoModelForCausalLM

    rows = random_rows(args.rows, spec.vocab_size, seed=0)
    write_rows(rows, work / "rows.jsonl")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference = hf_logprobs(model, rows)

    print(f"\n{'layout':<28} {'ranks':>5} {'max |diff|':>12} {'seconds':>8}  result")
    failed = False
    for item in args.layouts.split(";"):
        nproc, _, extra = item.partition(":")
        out = work / f"scores-{len(extra)}-{nproc}.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            nproc,
            "--master-port",
            str(free_port()),
            "-m",
            "gspo_megatron.score",
            "--ckpt",
            str(ckpt),
            "--input",
            str(work / "rows.jsonl"),
            "--output",
            str(out),
            "--overwrite",
        ]
        start = time.time()
        proc = subprocess.run(cmd + shlex.split(extra), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(
                f"{extra or 'single':<28} {nproc:>5} {'-':>12} {time.time() - start:8.1f}  FAILED"
            )
            failed = True
            continue
        diff = max_abs_diff(read_logprobs(out), reference)
        ok = diff <= args.tol
        failed |= not ok
        print(
            f"{extra or 'single':<28} {nproc:>5} {diff:12.2e} {time.time() - start:8.1f}  "
            f"{'ok' if ok else 'FAIL'} (tol {args.tol:g})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
