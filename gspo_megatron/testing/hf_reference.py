"""Reference log-probs from HF transformers: what every Megatron log-prob is checked against."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file


def hf_logprobs(
    model, rows: Sequence[Tuple[list, list]], forced_routes: Optional[Sequence] = None
) -> List[List[float]]:
    """log p(response token | prefix) per row: HF forward of each row alone (no padding),
    log_softmax in fp64. ``forced_routes`` (per row, [positions, MoE layers, top-k] expert ids,
    -1 = the router's own choice) makes every MoE layer route as given."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for n, (prompt, response) in enumerate(rows):
            ids = torch.tensor([list(prompt) + list(response)], device=device)
            forced = None if forced_routes is None else forced_routes[n]
            with _routing(model, forced=forced):
                logits = model(ids).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1, device=device)
            out.append(logp[pos, torch.tensor(response, device=device)].tolist())
    return out


def hf_routes(model, sequences: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """Per sequence, the expert ids HF's routers choose: [positions, MoE layers, top-k], each
    sequence run alone (as ``hf_logprobs`` does)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq in sequences:
            seen: List[torch.Tensor] = []
            with _routing(model, seen=seen):
                model(torch.tensor([list(seq)], device=device))
            out.append(torch.stack(seen, dim=1).cpu())
    return out


def _weights(router, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The routing weights HF's router gives the experts ``chosen``: Qwen3-MoE's softmax over
    all experts; GLM-4.5's sigmoid scores (its correction bias only chooses), each renormalised
    over the chosen when the model says so, GLM's then scaled."""
    if hasattr(router, "e_score_correction_bias"):
        probs = logits.float().sigmoid().gather(1, chosen)
        if router.norm_topk_prob:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        return probs * router.routed_scaling_factor
    probs = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, chosen)
    if router.norm_topk_prob:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _routers(model) -> list:
    """HF's MoE routers in layer order (Qwen3-MoE and GLM-4.5: ``mlp.gate`` returning (logits,
    weights, indices))."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextlib.contextmanager
def _routing(model, forced=None, seen: Optional[list] = None) -> Iterator[None]:
    """Observe (``seen``) or force (``forced``) every MoE layer's choices during a forward."""
    hooks = []
    for layer, gate in enumerate(_routers(model)):

        def hook(module, inputs, output, layer=layer):
            logits, weights, indices = output
            if seen is not None:
                seen.append(indices.detach().clone())
            if forced is None:
                return None
            want = torch.as_tensor(forced[:, layer]).to(indices.device, torch.long)
            rows = min(want.shape[0], indices.shape[0])
            chosen = indices.clone()
            keep = want[:rows] < 0
            chosen[:rows] = torch.where(keep, indices[:rows], want[:rows])
            return logits, _weights(module, logits, chosen).to(logits.dtype), chosen

        hooks.append(gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


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
