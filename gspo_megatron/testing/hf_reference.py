"""Reference log-probs from HF transformers: what every Megatron log-prob is checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from safetensors.torch import load_file


def hf_logprobs(model, rows: Sequence[Tuple[list, list]]) -> List[List[float]]:
    """log p(response token | prefix) per row: HF forward of each row alone (no padding),
    log_softmax in fp64."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt, response in rows:
            ids = torch.tensor([list(prompt) + list(response)], device=device)
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1, device=device)
            out.append(logp[pos, torch.tensor(response, device=device)].tolist())
    return out


def read_rows(path: Path) -> List[Tuple[list, list]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            rows.append((obj["prompt_ids"], obj["response_ids"]))
    return rows


def write_rows(rows, path: Path) -> None:
    Path(path).write_text(
        "".join(json.dumps({"prompt_ids": p, "response_ids": r}) + "\n" for p, r in rows)
    )


def read_logprobs(path: Path) -> List[List[float]]:
    return [json.loads(line)["logprobs"] for line in Path(path).read_text().splitlines()]


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over all tokens of all rows (rows must have equal lengths)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} rows vs {len(b)} rows")
    worst = 0.0
    for x, y in zip(a, b):
        if len(x) != len(y):
            raise ValueError(f"row lengths differ: {len(x)} vs {len(y)}")
        if x:
            worst = max(
                worst,
                (torch.tensor(x, dtype=torch.float64) - torch.tensor(y, dtype=torch.float64))
                .abs()
                .max()
                .item(),
            )
    return worst


def read_hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of an HF safetensors checkpoint directory, by name."""
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
