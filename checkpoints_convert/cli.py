"""``gspo-convert``: HF <-> megatron-core checkpoint conversion.

gspo-convert hf-to-mcore --hf-dir DIR --out DIR [--overwrite]
gspo-convert mcore-to-hf --ckpt DIR --out DIR [--overwrite] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from gspo_megatron.checkpoint.atomic import write_error
from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
from gspo_megatron.checkpoint.mcore_to_hf import convert_mcore_to_hf
from gspo_megatron.errors import GspoError, exit_on_error


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise GspoError(f"--max-shard-size '{text}': expected a size such as 5GB, 500MB or 1048576")
    scale = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[(m.group(2) or "").upper()]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise GspoError(f"--max-shard-size '{text}': must be at least 1 byte (e.g. 5GB)")
    return size


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise GspoError(f"--io-threads '{text}': expected a number of threads >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # the docstring's layout, as written
    p = argparse.ArgumentParser(prog="gspo-convert", description=__doc__, formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron torch_dist checkpoint")
    a.add_argument(
        "--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)"
    )
    a.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a.add_argument("--io-threads", default="1", help="parallel writer threads (files; default 1)")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b = sub.add_parser("mcore-to-hf", help="megatron torch_dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="checkpoint directory")
    b.add_argument("--out", required=True, help="output HF directory (must not exist)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)"
    )
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@exit_on_error
def main() -> None:
    args = build_parser().parse_args()
    start = time.time()
    try:
        _convert(args)
    except OSError as err:  # a full disk, a file size limit, an I/O error: one line
        raise write_error(Path(args.out), err) from None
    print(f"{args.command}: wrote {args.out} in {time.time() - start:.1f}s", file=sys.stderr)


def _convert(args: argparse.Namespace) -> None:
    common = dict(overwrite=args.overwrite, show_progress=not args.no_progress)
    if args.command == "hf-to-mcore":
        convert_hf_to_mcore(args.hf_dir, args.out, io_threads=_threads(args.io_threads), **common)
    else:
        convert_mcore_to_hf(
            args.ckpt, args.out, max_shard_bytes=_size(args.max_shard_size), **common
        )


if __name__ == "__main__":
    main()
