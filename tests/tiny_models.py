"""Tiny random Qwen3 / Qwen3-MoE models made with transformers, and HF reference log-probs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Tuple

import torch

VOCAB = 250  # not a multiple of 128: exercises vocabulary padding


def moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
              mlp_only_layers=[2], max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def dense_config(**overrides):
    from transformers import Qwen3Config

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, tie_word_embeddings=True,
              rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    kw.update(overrides)
    return Qwen3Config(**kw)


def make_hf_model(config, out: Path, seed: int = 0, dtype=torch.float32):
    """Random weights with a larger spread than the default init, so parity is a real test
    (router decisions and attention patterns far from uniform)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config.architectures = [ {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM"}[config.model_type] ]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    model.save_pretrained(out)
    return model


def random_rows(n: int, seed: int = 0, max_prompt: int = 12, max_resp: int = 14) -> List[Tuple[list, list]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))]
        r = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_resp))]
        rows.append((p, r))
    return rows


def write_rows(rows, path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt_ids": p, "response_ids": r}) + "\n" for p, r in rows))


def hf_logprobs(model, rows) -> List[List[float]]:
    """Reference: HF forward of each row alone (no padding), log_softmax in fp64."""
    model.eval()
    out = []
    with torch.no_grad():
        for p, r in rows:
            ids = torch.tensor([p + r])
            logits = model(ids).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            out.append(lp[pos, torch.tensor(r)].tolist())
    return out


def read_logprobs(path: Path) -> List[List[float]]:
    return [json.loads(line)["logprobs"] for line in path.read_text().splitlines()]


def max_abs_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    worst = 0.0
    for x, y in zip(a, b):
        assert len(x) == len(y)
        if x:
            worst = max(worst, (torch.tensor(x) - torch.tensor(y)).abs().max().item())
    return worst
