"""The command line the batched workers share (``conftest.BatchedRuns``): ``--ckpt CKPT --cases
FILE --out FILE``; every case run in order in the same processes, rank 0 saving
``{case name: result}`` with torch.save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from gspo_megatron.distributed.parallel import shutdown


def run_cases(run_case: Callable[[dict, Path], object]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--cases", required=True, type=Path, help="JSON list of cases")
    ap.add_argument("--out", required=True, help="torch.save of {case name: result}")
    args = ap.parse_args()
    results = {c["name"]: run_case(c, args.ckpt) for c in json.loads(args.cases.read_text())}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    shutdown()
