"""Per-step metrics: TensorBoard events and a JSON-lines copy, written by rank 0.

Tags are grouped by what they measure: ``reward/`` (scores), ``gspo/`` (the objective: loss,
clip fraction, |log s_i|, KL to pi_old), ``rollout/`` (lengths, truncation, engine-vs-trainer
log-prob agreement), ``perf/`` (time split, throughput) and ``train/`` (LR, grad norm,
entropy). The JSON-lines file (``metrics.jsonl``, one object per step) is what the plot tool
and tests read; TensorBoard is for people.

A resumed run continues the same files: events and lines after the resumed step (written by
the killed run after its last checkpoint) are dropped, so every step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

from gspo_megatron.checkpoint.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def read_metrics(path: Path) -> list:
    """The rows of a metrics.jsonl file (a torn last line, from a killed run, is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    def __init__(self, out_dir: Path, start_step: int):
        # torch and TensorBoard here, not at the top: the plot tool reads metrics.jsonl through
        # this module, and those imports were 2.5 s of its 4.
        import torch.distributed as dist
        from torch.utils.tensorboard import SummaryWriter

        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.writer = None
        self.path = Path(out_dir) / METRICS_FILE
        if not self.enabled:
            return

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kept = (
            [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            if self.path.is_file()
            else []
        )
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # purge_step drops events at and after it that a killed run left behind.
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TB_DIR), purge_step=start_step + 1)
        self._file = open(self.path, "a")

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for tag, value in sorted(metrics.items()):
            value = float(value)
            row[tag] = value if math.isfinite(value) else None
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._file.close()
            self.writer = None
