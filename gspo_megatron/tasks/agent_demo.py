"""The agent demo: a tiny Qwen3-MoE learns to call a tool and answer with what it returned.

    python -m gspo_megatron.tasks.agent_demo --out outputs/agent_demo/init [--warm-start-steps 60]

Each problem asks for a secret colour (one of ``VALUES``) that is in the data row but not in
the prompt: only the ``lookup`` tool returns it. A right answer needs an episode of two turns:
a tool call ``<tool_call>{"name": "lookup", "arguments": {}}</tool_call>``, then, after the
tool's result, the colour alone. Guessing scores 1/len(VALUES) on average. The reward is the
final answer's (``value_reward``: 1 when it is the colour) plus, from the environment, 0.5 for
the first well-formed lookup (``LOOKUP_REWARD``): up to 1.5.

Writes, under ``--out``: ``train.jsonl`` and ``held_out.jsonl`` (32 rows of their own),
``hf/`` (the model and a byte-level BPE tokenizer with a ChatML chat template and the tool-call
tokens, ``testing.chat_tokenizer``) and ``mcore/`` (the trainer's ``model.ckpt``).

The warm start (cross-entropy on the assistant turns of a few batches of solved episodes, in
plain transformers) teaches the shape of the two turns and is stopped early on purpose: the
policy starts writing the call imperfectly and copying the colour rarely; GSPO does the rest.
(A first version named a key in the prompt to pass to the tool: the tiny model did not learn to
copy the key, its lookups failed, and GSPO found guessing without the tool the better policy.)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import List, Optional

from gspo_megatron.rollout.episodes.tool_env import ToolEnvironment, tool

VALUES = ("red", "blue", "green", "gold", "pink", "gray", "teal", "plum")
QUESTIONS = (
    "What is the secret colour?",
    "Which colour is the secret?",
    "Tell me the secret colour.",
    "Find the secret colour.",
)
LOOKUP_REWARD = 0.5
HELD_OUT = 32
VOCAB = 1024
SYSTEM_PROMPT = "Call the lookup tool, then answer with the colour only."
DEFAULTS = dict(rows=1024, warm_start_steps=90, warm_start_lr=3e-3, seed=0)


class LookupEnv(ToolEnvironment):
    """One tool, ``lookup()``, returning the row's colour. The first well-formed call earns a
    per-turn reward of ``LOOKUP_REWARD`` (agent.turn_rewards: sum adds it to the final
    answer's): a denser signal for the tiny policy than the answer alone."""

    system_prompt = SYSTEM_PROMPT
    # The tool's JSON schema in the system turn would be most of the opening's tokens: a
    # 2-layer model then has to find the colour in a long context, and every step costs more.
    # The warm start teaches the call instead (a real model reads the schemas).
    render_tools = False

    def __init__(self, row: dict):
        super().__init__(row)
        self.found = False

    def tools(self):
        return [self.lookup]

    @tool("The secret colour of this problem.")
    def lookup(self) -> str:
        return self.row["answer"]

    def step(self, assistant_text, tool_calls):
        messages, done, _ = super().step(assistant_text, tool_calls)
        called = any(c.get("name") == "lookup" and c.get("arguments") == {} for c in tool_calls)
        reward = LOOKUP_REWARD if called and not self.found else None
        self.found = self.found or called
        return messages, done, reward


def value_reward(prompt: str, response: str, answer: Optional[str]) -> float:
    """1 when the final answer is the value, else 0."""
    return float(response.strip() == (answer or ""))


def make_rows(questions, n: int, seed: int) -> List[dict]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(questions), "answer": rng.choice(VALUES)} for _ in range(n)]


def solved(row: dict) -> List[dict]:
    """The episode a perfect policy would have with this row."""
    call = json.dumps({"name": "lookup", "arguments": {}})
    env = LookupEnv(row)
    return env.reset() + [
        {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
        {"role": "tool", "content": env.lookup()},
        {"role": "assistant", "content": row["answer"]},
    ]


def warm_start(model, tokenizer, rows, steps: int, lr: float, batch: int, seed: int):
    """Cross-entropy on the assistant turns (their end-of-turn token included) of solved
    episodes, rendered by the chat template with the tool; returns the losses."""
    import torch

    from gspo_megatron.rollout.episodes.agent_config import end_of_turn_id
    from gspo_megatron.rollout.episodes.transcript import ChatRenderer, Transcript

    renderer = ChatRenderer(tokenizer, end_of_turn_id(tokenizer))
    specs = LookupEnv(rows[0]).tool_specs()

    def example(row):
        conv = solved(row)
        t = Transcript(renderer.opening(conv[:2], specs), conv[:2], specs)
        for m in conv[2:]:
            if m["role"] == "assistant":
                ids = renderer.encode(m["content"]) + [renderer.eot]
                t.add_model_turn(renderer, ids, [0.0] * len(ids))
            else:
                t.add_environment([m], t.environment_ids(renderer, [m]))
        ids = t.prompt_ids + t.ids
        labels = [-100] * len(t.prompt_ids) + [x if k else -100 for x, k in zip(t.ids, t.mask)]
        return ids, labels

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for _ in range(steps):
        pairs = [example(rows[rng.randrange(len(rows))]) for _ in range(batch)]
        width = max(len(i) for i, _ in pairs)
        inp = torch.tensor([i + [pad] * (width - len(i)) for i, _ in pairs])
        lab = torch.tensor([y + [-100] * (width - len(y)) for _, y in pairs])
        loss = model(input_ids=inp, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def prepare(out: Path, rows: int, warm_start_steps: int, warm_start_lr: float, seed: int) -> None:
    """Write data, tokenizer, the warm-started HF model and its megatron checkpoint
    (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_megatron.checkpoint.atomic import atomic_dir
    from gspo_megatron.tasks.demo import save_warm_started, say_warm_start
    from gspo_megatron.testing.chat_tokenizer import write_chat_tokenizer
    from gspo_megatron.testing.tiny_model import make_hf_model, tiny_moe_config

    with atomic_dir(out, overwrite=True) as tmp:
        data = make_rows(QUESTIONS, rows, seed)
        # Held out: rows of their own (seed + 1). The question carries nothing about the colour
        # (only the tool does), so they are the training questions; a question worded anew
        # was measured to leave the 2-layer policy without its call (held-out 0.13 -> 0.15).
        held = make_rows(QUESTIONS, HELD_OUT, seed + 1)
        for name, part in (("train.jsonl", data), ("held_out.jsonl", held)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        # The task's own episodes, rendered, in the tokenizer's corpus: merges for the tools'
        # system turn and the calls make the episodes short (fast steps on CPU).
        from jinja2 import Template  # transformers' dependency: the template without a tokenizer

        from gspo_megatron.testing.chat_tokenizer import CHAT_TEMPLATE

        template, specs = Template(CHAT_TEMPLATE), LookupEnv(data[0]).tool_specs()
        text = [template.render(messages=solved(r), tools=specs) for r in data[:300]]
        write_chat_tokenizer(tmp / "hf", vocab_size=VOCAB, seed=seed, extra_lines=text)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "hf"))
        attention = dict(head_dim=64, num_attention_heads=4, num_key_value_heads=2)
        mlp = dict(intermediate_size=256, moe_intermediate_size=128, mlp_only_layers=[])
        shape = dict(hidden_size=128, num_hidden_layers=2, max_position_embeddings=512)
        config = tiny_moe_config(vocab_size=VOCAB, **shape, **attention, **mlp)
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        make_hf_model(config, tmp / "hf", seed=seed)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(tmp / "hf"))
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        losses = warm_start(model, tokenizer, data, warm_start_steps, warm_start_lr, 32, seed)
        tokenizer.save_pretrained(tmp / "hf")
        save_warm_started(tmp, model, losses)
    say_warm_start(losses)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m gspo_megatron.tasks.agent_demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True)
    d = DEFAULTS
    ap.add_argument("--rows", type=int, default=d["rows"])
    ap.add_argument("--warm-start-steps", type=int, default=d["warm_start_steps"])
    ap.add_argument("--warm-start-lr", type=float, default=d["warm_start_lr"])
    ap.add_argument("--seed", type=int, default=d["seed"])
    a = ap.parse_args(argv)
    prepare(a.out, a.rows, a.warm_start_steps, a.warm_start_lr, a.seed)


if __name__ == "__main__":
    main()
