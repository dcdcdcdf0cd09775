"""Prompts for RL: local JSONL or Parquet rows -> token ids, in a deterministic order.

Field names are mapped in the config (``prompt_field``, ``answer_field``), so a data set never has
to be rewritten. Every row is checked when the file is read, before any model is built: a missing
file, a missing field or a non-text prompt is one line naming the file, the row and the field.

The order is a function of (seed, step) only: step ``k`` takes prompts ``k*P .. (k+1)*P - 1`` of
an endless sequence of per-epoch permutations. A resumed run therefore sees exactly the prompts
an uninterrupted run would, and the data position in a checkpoint is just the step.

Prompts longer than the rollout's ``max_prompt_tokens`` after templating are dropped when the
data set is prepared and counted (``data/skipped_overlong``), so the rollout never sees them. A
prompt so long in characters that no tokenization could bring it within the limit
(``chars_for_tokens``) is dropped without being tokenized: one 50 MB row must not cost gigabytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from gspo_megatron.errors import GspoError
from gspo_megatron.jsonl import iter_objects


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they become token ids."""

    path: str = ""
    """A .jsonl / .json-lines or .parquet file of prompt rows."""
    format: str = "auto"
    """jsonl, parquet, or auto (from the file extension)."""
    prompt_field: str = "prompt"
    """Row field holding the prompt text."""
    answer_field: str = "answer"
    """Row field holding the reference answer for rewards ('' if the rewards need none)."""
    chat_template: bool = True
    """Wrap each prompt as a user message with the tokenizer's chat template (when it has one)."""
    system_prompt: str = ""
    """Optional system message placed before the prompt (chat template only)."""
    shuffle: bool = True
    """A new permutation of the rows every epoch (seeded)."""
    seed: int = 0
    """Seed of the epoch permutations."""
    eval_path: str = ""
    """Held-out prompts (same format and fields) for validation during training
    (train.eval_every); read in file order."""

    def validate(self) -> None:
        if not self.path:
            raise GspoError("data.path is empty: give a .jsonl or .parquet file of prompts")
        if self.format not in ("auto", "jsonl", "parquet"):
            raise GspoError(f"data.format='{self.format}' (allowed: auto, jsonl, parquet)")
        if not self.prompt_field:
            raise GspoError("data.prompt_field is empty")


@dataclass
class Prompt:
    text: str
    ids: List[int]
    answer: Optional[str]
    row: int  # 0-based row in the file
    fields: Optional[dict] = None
    """The whole data row (what a multi-turn environment is made from)."""


@dataclass
class PromptSet:
    prompts: List[Prompt]
    skipped_overlong: int = 0

    @property
    def stats(self) -> Dict[str, float]:
        """The data set's size after preparation, logged with every step's metrics."""
        return {
            "data/prompts": float(len(self.prompts)),
            "data/skipped_overlong": float(self.skipped_overlong),
        }

    def batch(self, step: int, size: int, seed: int, shuffle: bool = True) -> List[Prompt]:
        """The ``size`` prompts of ``step`` (deterministic in seed and step)."""
        n = len(self.prompts)
        out = []
        for k in range(step * size, (step + 1) * size):
            epoch, i = divmod(k, n)
            order = self._order(epoch, seed) if shuffle else None
            out.append(self.prompts[order[i] if order else i])
        return out

    def _order(self, epoch: int, seed: int) -> List[int]:
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            idx = list(range(len(self.prompts)))
            random.Random(f"{seed}/{epoch}").shuffle(idx)
            cache.clear()
            cache[epoch] = idx
        return cache[epoch]


def _format(cfg: DataConfig, path: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise GspoError(
        f"{path}: cannot tell the format from '{suffix}' (set data.format to jsonl or parquet)"
    )


def read_rows(cfg: DataConfig) -> List[dict]:
    path = Path(cfg.path)
    if not path.is_file():
        raise GspoError(f"{path}: no such data file (data.path)")
    fmt = _format(cfg, path)
    if fmt == "jsonl":
        rows = []
        for n, row in iter_objects(path):
            row["__line__"] = n
            rows.append(row)
    else:
        try:
            import pyarrow.parquet as pq  # only Parquet input needs it
        except ImportError:
            raise GspoError("reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as err:
            raise GspoError(f"{path}: not a readable Parquet file ({err})") from None
        rows = table.to_pylist()
        for n, row in enumerate(rows, 1):
            row["__line__"] = n
    if not rows:
        raise GspoError(f"{path}: no rows")
    where = "line" if fmt == "jsonl" else "row"
    for row in rows:
        for name, setting in (
            (cfg.prompt_field, "data.prompt_field"),
            (cfg.answer_field, "data.answer_field"),
        ):
            if not name:
                continue
            if name not in row:
                fields = ", ".join(k for k in row if k != "__line__")
                raise GspoError(
                    f"{path}:{row['__line__']}: no field '{name}' ({setting}; this "
                    f"{where} has: {fields})"
                )
        if not isinstance(row[cfg.prompt_field], str) or not row[cfg.prompt_field].strip():
            raise GspoError(
                f"{path}:{row['__line__']}: field '{cfg.prompt_field}' must be non-empty text"
            )
    return rows


COMPOSITION = 4
"""Characters a Unicode normaliser may compose into one (NFC: a letter and its marks, a Hangul
syllable from three jamo): the margin of ``chars_for_tokens`` for tokenizers that normalise
(Qwen's applies NFC) before they split."""


def max_token_chars(tokenizer) -> Optional[int]:
    """The most characters of text one token stands for, where that is bounded: a byte-level
    BPE (Qwen's, Llama 3's, DeepSeek's, GLM's) turns every byte of the text into part of some
    token and spells each byte of a vocabulary entry as one character, so no token covers more
    characters than the longest entry has. None for other tokenizers: one that drops
    whitespace or maps an unknown word of any length to one <unk> has no such bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return None
    # The pre-tokenizer's own JSON (a Sequence lists its parts), not the whole tokenizer's.
    pre = backend.pre_tokenizer
    if pre is None or b'"ByteLevel"' not in pre.__getstate__():
        return None
    return max(len(t) for t in tokenizer.get_vocab())


def chars_for_tokens(tokens: int, token_chars: Optional[int]) -> Optional[int]:
    """Characters beyond which a text surely encodes to more than ``tokens`` tokens, with
    ``token_chars`` from ``max_token_chars`` (None: no such bound): after normalising it still
    has more than ``tokens * token_chars`` characters, and no token covers more."""
    return None if token_chars is None else COMPOSITION * token_chars * tokens


def render(tokenizer, cfg: DataConfig, text: str) -> List[int]:
    """Prompt text -> token ids, through the chat template when configured and available."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_prompts(
    cfg: DataConfig,
    tokenizer,
    max_prompt_tokens: int,
    vocab_size: Optional[int] = None,
    require_answers: str = "",
) -> PromptSet:
    """Every row tokenised and checked. ``vocab_size`` (the model's) refuses prompts whose ids
    the embedding has no row for: a tokenizer that does not belong to the model.
    ``require_answers`` names a reward that compares with the answer: every row needs one."""
    rows = read_rows(cfg)
    prompts, overlong = [], 0
    surely_overlong = chars_for_tokens(max_prompt_tokens, max_token_chars(tokenizer))
    for i, row in enumerate(rows):
        if surely_overlong is not None and len(row[cfg.prompt_field]) > surely_overlong:
            overlong += 1
            continue
        ids = render(tokenizer, cfg, row[cfg.prompt_field])
        where = f"{cfg.path}:{row['__line__']}"
        if not ids:
            raise GspoError(
                f"{where}: field '{cfg.prompt_field}' encodes to no tokens with the "
                f"model's tokenizer (nothing for the policy to condition on)"
            )
        if vocab_size is not None and not all(0 <= t < vocab_size for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise GspoError(
                f"{where}: the tokenizer gives token id {bad}, outside the model's "
                f"vocabulary [0, {vocab_size}): the tokenizer does not belong to "
                f"this model"
            )
        if len(ids) > max_prompt_tokens:
            overlong += 1
            continue
        answer = row.get(cfg.answer_field) if cfg.answer_field else None
        if require_answers and answer is None:
            raise GspoError(
                f"{where}: field '{cfg.answer_field}' is null, and the "
                f"{require_answers} reward compares with it (data.answer_field)"
            )
        if require_answers and isinstance(answer, (list, dict)):
            # Its text ("['4', 'four']") would never equal a response: every reward 0, silently.
            kind = "a list" if isinstance(answer, list) else "an object"
            raise GspoError(
                f"{where}: field '{cfg.answer_field}' is {kind} ({str(answer)[:60]}), and the "
                f"{require_answers} reward compares the response with one answer: give each "
                f"row a string or a number (data.answer_field)"
            )
        prompts.append(
            Prompt(
                row[cfg.prompt_field],
                ids,
                None if answer is None else str(answer),
                i,
                {k: v for k, v in row.items() if k != "__line__"},
            )
        )
    if not prompts:
        raise GspoError(
            f"{cfg.path}: all {len(rows)} prompts are longer than "
            f"rollout.max_prompt_tokens={max_prompt_tokens}"
        )
    return PromptSet(prompts, overlong)
