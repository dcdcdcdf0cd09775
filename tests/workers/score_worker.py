"""torchrun worker: score rows in several layouts in one launch (the scoring tool's own code).

``--cases`` is a JSON list of ``{"name", "ckpt", "input", "layout": {"tp", "pp", "ep", "etp",
"cp", "pp_layers", "max_tokens"}}`` (``max_tokens``: packed rows of at most that many tokens,
``--max-tokens-per-microbatch``); each case rebuilds megatron's parallel state for its layout and runs
``gspo_megatron.score.score_rows``, the function behind ``python -m gspo_megatron.score``
(micro-batches of 2, 2 x pp micro-batches per step, fp32, as the CLI's defaults with
``--micro-batch-size 2``). Rank 0 writes ``{name: per-row log-prob lists}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from gspo_megatron.checkpoint.model import checkpoint_spec
from gspo_megatron.distributed.parallel import (
    ParallelLayout,
    check_layout,
    init_distributed,
    shutdown,
)
from gspo_megatron.score import read_rows, score_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, type=Path)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {}
    for case in json.loads(args.cases.read_text()):
        ckpt = Path(case["ckpt"])
        spec = checkpoint_spec(ckpt)
        layout = dict(case.get("layout", {}))
        max_tokens = layout.pop("max_tokens", 0)
        if layout.get("pp_layers"):
            layout["pp_layers"] = tuple(layout["pp_layers"])
        layout = ParallelLayout(**layout)
        init_distributed(layout)
        check_layout(layout, spec, dist.get_world_size())
        rows = read_rows(Path(case["input"]), spec.vocab_size, spec.max_position_embeddings)
        results[case["name"]] = score_rows(
            spec, layout, ckpt, rows, 2, 2 * layout.pp, torch.float32, max_tokens
        )
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
