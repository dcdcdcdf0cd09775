"""Write a tiny random Qwen3-MoE (or dense Qwen3) HF model + tokenizer to a directory.

python tools/make_tiny_model.py --out DIR [--dense] [--dtype bf16]
"""

from __future__ import annotations

import argparse

import torch

from gspo_megatron.testing.tiny_model import (
    make_hf_model,
    tiny_dense_config,
    tiny_moe_config,
    write_tokenizer,
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--dense", action="store_true", help="dense Qwen3 instead of Qwen3-MoE")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = tiny_dense_config() if args.dense else tiny_moe_config()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    make_hf_model(config, args.out, seed=args.seed, dtype=dtype)
    write_tokenizer(args.out)
    print(f"wrote {config.model_type} model to {args.out}")


if __name__ == "__main__":
    main()
