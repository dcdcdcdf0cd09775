"""Test-side names for the library's tiny models and HF reference helpers."""

from __future__ import annotations

from gspo_megatron import tiny_model
from gspo_megatron.hf_reference import hf_logprobs, max_abs_diff, read_logprobs, write_rows  # noqa: F401
from gspo_megatron.tiny_model import TINY_VOCAB as VOCAB
from gspo_megatron.tiny_model import make_hf_model, write_tokenizer  # noqa: F401
from gspo_megatron.tiny_model import tiny_dense_config as dense_config  # noqa: F401
from gspo_megatron.tiny_model import tiny_moe_config as moe_config  # noqa: F401


def random_rows(n: int, seed: int = 0):
    return tiny_model.random_rows(n, VOCAB, seed=seed)
