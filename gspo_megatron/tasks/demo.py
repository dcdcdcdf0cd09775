"""The built-in demo task: a tiny MoE learns to copy a list of words, rewarded by a checker.

    python -m gspo_megatron.tasks.demo --out outputs/quickstart/init [--warm-start-steps 15]
        [--family qwen3|glm4_moe]

Writes, under ``--out``: ``held_out.jsonl`` (64 problems that are not in the training rows,
for validation), ``train.jsonl`` (prompts like ``w5 w2 w7 w3 w0``, answer ``w5 w2 w7 w3``:
repeat the words before the separator ``w0``), ``hf/`` (a random tiny Qwen3-MoE, or with
``--family glm4_moe`` a GLM-4.5-style MoE, and its word-level tokenizer, after a short supervised warm start) and ``mcore/`` (the same model as a
megatron-core checkpoint, the trainer's ``model.ckpt``).

The warm start (next-token cross-entropy on a few batches of solved examples, in plain HF
transformers) only teaches the answer's shape: a few words then end of sequence. It is stopped
early on purpose, so the policy starts with a low reward; what the demo shows is the rise of the
reward under GSPO. The reward (``copy_reward``) is the fraction of answer positions right,
divided by the longer of the two lengths, so an answer too long or too short loses credit; it is
in [0, 1].

Everything is generated from seeds: no downloads.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import List, Optional

# torch, transformers and the converter are imported where the model is made, not here: the
# reward worker imports this module for copy_reward, and those imports cost it seconds.

SEPARATOR = "w0"

# The quickstart's task. 8 words, 4 per problem: measured to learn within its 30 steps (reward
# 0.30 -> 0.94; with 16 words it took 120 steps to climb from 0.09 to 0.85).
HELD_OUT = 64
"""Held-out problems written beside the training rows (held_out.jsonl)."""
FAMILIES = {"qwen3": ("Qwen3-MoE", dict(mlp_only_layers=[])), "glm4_moe": ("GLM-4.5", {})}
"""The demo model of each family (--family): what it is, its config fields beyond the shared."""
DEFAULTS = dict(rows=2048, alphabet=8, length=4, warm_start_steps=15, warm_start_lr=3e-3, seed=0)


def make_rows(n: int, seed: int, alphabet: int, length: int) -> List[dict]:
    """``n`` copy problems over words w1..w<alphabet> of ``length`` words each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randint(1, alphabet)}" for _ in range(length)]
        rows.append({"prompt": " ".join(words + [SEPARATOR]), "answer": " ".join(words)})
    return rows


def copy_reward(prompt: str, response: str, answer: Optional[str]) -> float:
    """Fraction of positions where the response repeats the answer, over the longer length."""
    got, want = response.split(), (answer or "").split()
    if not want:
        return 0.0
    right = sum(a == b for a, b in zip(got, want))
    return right / max(len(got), len(want))


def warm_start(
    model, tokenizer, rows: List[dict], steps: int, lr: float, batch: int, seed: int
) -> List[float]:
    """Next-token cross-entropy on the answer (and EOS) of solved rows; returns the losses."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        chosen = [rows[rng.randrange(len(rows))] for _ in range(batch)]
        ids, labels = [], []
        for row in chosen:
            p = tokenizer.encode(row["prompt"], add_special_tokens=False)
            a = tokenizer.encode(row["answer"], add_special_tokens=False) + [eos]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(x) for x in ids)
        inp = torch.tensor([x + [eos] * (width - len(x)) for x in ids])
        lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        loss = model(input_ids=inp, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # float(loss) warns on a tensor that requires grad
    model.eval()
    return losses


def save_warm_started(tmp: Path, model, losses: List[float]) -> None:
    """A demo's warm-started HF model into ``tmp/hf`` (over the random one there), its losses
    into ``tmp/warm_start.json``, and its megatron checkpoint into ``tmp/mcore``."""
    from gspo_megatron.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from gspo_megatron.testing.tiny_model import complete_checkpoint

    model.save_pretrained(tmp / "hf")
    complete_checkpoint(tmp / "hf", model.config)  # GLM: its MTP layers, as released
    (tmp / "warm_start.json").write_text(json.dumps({"steps": len(losses), "loss": losses}))
    convert_hf_to_mcore(tmp / "hf", tmp / "mcore", show_progress=False)


def say_warm_start(losses: List[float]) -> None:
    if losses:
        print(f"warm start: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def prepare(
    out: Path,
    rows: int,
    alphabet: int,
    length: int,
    warm_start_steps: int,
    warm_start_lr: float,
    seed: int,
    model_shape: Optional[dict] = None,
    family: str = "qwen3",
) -> None:
    """Write data, the warm-started HF model and its megatron checkpoint (atomically).
    ``model_shape``: transformers config fields that replace the demo model's; ``family``:
    qwen3 (Qwen3-MoE) or glm4_moe (GLM-4.5-style MoE)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_megatron.checkpoint.atomic import atomic_dir
    from gspo_megatron.testing.tiny_model import (
        make_hf_model,
        tiny_glm_config,
        tiny_moe_config,
        write_tokenizer,
    )

    if family not in FAMILIES:
        raise ValueError(f"family '{family}' (allowed: {', '.join(FAMILIES)})")

    with atomic_dir(out, overwrite=True) as tmp:
        data = make_rows(rows, seed, alphabet, length)
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        # Held-out problems for validation (train.eval_every): none of them in train.jsonl.
        seen = {r["prompt"] for r in data}
        held = [
            r
            for r in make_rows(4 * HELD_OUT, seed + 1, alphabet, length)
            if r["prompt"] not in seen
        ]
        (tmp / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held[:HELD_OUT]))
        # Hidden 128, head_dim 64 (a size vLLM's CPU attention runs); Qwen3: 2 MoE layers;
        # GLM: a dense layer, then a MoE layer of 8 experts in 2 groups and a shared expert.
        attention = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2)
        mlp = dict(intermediate_size=256, moe_intermediate_size=128)
        mlp.update(FAMILIES[family][1])
        shape = dict(hidden_size=128, num_hidden_layers=2, max_position_embeddings=128)
        make_config = {"qwen3": tiny_moe_config, "glm4_moe": tiny_glm_config}[family]
        config = make_config(**{**shape, **attention, **mlp, **(model_shape or {})})
        model = make_hf_model(config, tmp / "hf", seed=seed)
        write_tokenizer(tmp / "hf")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "hf"))
        # A fresh, default-initialised model learns faster than the wide-spread test init.
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        with torch.no_grad():  # GLM: a correction bias that changes choices (default: zeros)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0.0, 0.05)
        losses = warm_start(model, tokenizer, data, warm_start_steps, warm_start_lr, 32, seed)
        save_warm_started(tmp, model, losses)
    say_warm_start(losses)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m gspo_megatron.tasks.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True)
    d = DEFAULTS
    ap.add_argument("--rows", type=int, default=d["rows"])
    ap.add_argument("--alphabet", type=int, default=d["alphabet"], help="distinct words (w1..wN)")
    ap.add_argument("--length", type=int, default=d["length"], help="words per problem")
    ap.add_argument("--warm-start-steps", type=int, default=d["warm_start_steps"])
    ap.add_argument("--warm-start-lr", type=float, default=d["warm_start_lr"])
    ap.add_argument("--seed", type=int, default=d["seed"])
    ap.add_argument(
        "--family", choices=sorted(FAMILIES), default="qwen3", help="the demo model's family"
    )
    a = ap.parse_args(argv)
    prepare(
        a.out,
        a.rows,
        a.alphabet,
        a.length,
        a.warm_start_steps,
        a.warm_start_lr,
        a.seed,
        family=a.family,
    )


if __name__ == "__main__":
    main()
