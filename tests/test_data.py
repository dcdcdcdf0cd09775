"""Prompt data: JSONL and Parquet with mapped field names, overlong prompts dropped and counted,
a deterministic order per step, and one-line errors for bad files and rows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gspo_megatron.data import DataConfig, load_prompts
from gspo_megatron.errors import GspoError
from gspo_megatron.testing.tiny_model import write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


ROWS = [
    {"question": "w1 w2 w3", "solution": "6"},
    {"question": " ".join(["w5"] * 30), "solution": "1"},
    {"question": "w7", "solution": 7},
    {"question": "w8 w9", "solution": "17"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_give_the_same_prompts(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = _jsonl(tmp_path / "p.jsonl", ROWS)
    pqt = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "solution": str(r["solution"])} for r in ROWS]), pqt)
    sets = [
        load_prompts(
            DataConfig(path=str(p), prompt_field="question", answer_field="solution"),
            tokenizer,
            max_prompt_tokens=10,
        )
        for p in (jl, pqt)
    ]
    for ps in sets:
        assert ps.skipped_overlong == 1 and ps.stats["data/skipped_overlong"] == 1
        assert [p.text for p in ps.prompts] == ["w1 w2 w3", "w7", "w8 w9"]
        assert [p.answer for p in ps.prompts] == ["6", "7", "17"]
        assert ps.prompts[0].ids == tokenizer.encode("w1 w2 w3", add_special_tokens=False)


def test_order_is_a_function_of_seed_and_step(tmp_path, tokenizer):
    jl = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"w{i}", "answer": str(i)} for i in range(10)])
    ps = load_prompts(DataConfig(path=str(jl)), tokenizer, 8)
    steps = [[p.text for p in ps.batch(k, 4, seed=3)] for k in range(5)]  # crosses epochs
    again = load_prompts(DataConfig(path=str(jl)), tokenizer, 8)
    assert [[p.text for p in again.batch(k, 4, seed=3)] for k in (4, 0, 2)] == [
        steps[4],
        steps[0],
        steps[2],
    ]
    first_epoch = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_epoch) == sorted(f"w{i}" for i in range(10))  # each row once per epoch
    assert steps[0] != [p.text for p in ps.batch(0, 4, seed=4)]


@pytest.mark.parametrize(
    "content,cfg,message",
    [
        (None, {}, "no such data file (data.path)"),
        (
            '{"prompt": "w1", "answer": "1"}\n{"question": "w2", "answer": "2"}\n',
            {},
            ":2: no field 'prompt' (data.prompt_field; this line has: question, answer)",
        ),
        (
            '{"prompt": "w1"}\n',
            {},
            ":1: no field 'answer' (data.answer_field; this line has: prompt)",
        ),
        ('{"prompt": ""}\n', {"answer_field": ""}, ":1: field 'prompt' must be non-empty text"),
        ('{"prompt": "w1"\n', {"answer_field": ""}, ":1: not valid JSON"),
    ],
)
def test_bad_data_is_one_line(tmp_path, tokenizer, content, cfg, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GspoError) as err:
        load_prompts(DataConfig(path=str(path), **cfg), tokenizer, 8)
    assert message in str(err.value) and str(path) in str(err.value)


def test_prompts_the_model_cannot_read_are_refused(tmp_path, tokenizer):
    """A prompt that the tokenizer turns into no tokens, or into ids past the model's
    vocabulary (a tokenizer that is not the model's), is one line naming the row."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"w1": 0, "w2": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(Regex("[?!]"), "")  # punctuation is dropped...
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    dropping = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "w1 w2"}, {"prompt": "?! ?!"}])  # ...all of it
    with pytest.raises(GspoError, match=r"d.jsonl:2: field 'prompt' encodes to no tokens"):
        load_prompts(DataConfig(path=str(path), answer_field=""), dropping, 8)
    path = _jsonl(tmp_path / "v.jsonl", [{"prompt": "w1 w2"}, {"prompt": "w1 w200"}])
    with pytest.raises(
        GspoError,
        match=r"v.jsonl:2: the tokenizer gives token id 200, outside the "
        r"model's vocabulary \[0, 100\)",
    ):
        load_prompts(DataConfig(path=str(path), answer_field=""), tokenizer, 8, vocab_size=100)
    assert len(load_prompts(DataConfig(path=str(path), answer_field=""), tokenizer, 8).prompts) == 2


def test_a_huge_row_is_judged_overlong_without_tokenizing_it(tmp_path):
    """A 20 MB prompt among short ones: dropped and counted, and the tokenizer never sees more
    than the character bound of its byte-level BPE (the bound is sound: a text made of the
    vocabulary's longest entry still encodes to more tokens than the limit past it)."""
    from transformers import AutoTokenizer

    from gspo_megatron.data import chars_for_tokens, max_token_chars
    from gspo_megatron.testing.chat_tokenizer import write_chat_tokenizer

    write_chat_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    limit = 10
    bound = chars_for_tokens(limit, max_token_chars(tok))
    longest = tok.convert_tokens_to_string([max(tok.get_vocab(), key=len)])
    dense = longest * (bound // len(longest) + 1)
    # No normaliser here: the bound's margin for composed characters is not even needed.
    assert len(tok.encode(dense[: bound // 4 + 1], add_special_tokens=False)) > limit
    rows = [{"prompt": "w1 w2"}, {"prompt": "w3 " * 7_000_000}, {"prompt": "w4"}]
    seen = []
    encode = tok.encode

    def spy(text, *args, **kwargs):
        seen.append(len(text))
        return encode(text, *args, **kwargs)

    tok.encode = spy
    cfg = DataConfig(path=str(_jsonl(tmp_path / "p.jsonl", rows)), chat_template=False)
    ps = load_prompts(replace(cfg, answer_field=""), tok, max_prompt_tokens=limit)
    assert [p.text for p in ps.prompts] == ["w1 w2", "w4"] and ps.skipped_overlong == 1
    assert max(seen) <= bound


def test_tokenizers_without_a_character_bound_tokenize_every_row(tokenizer):
    """The word-level test tokenizer maps any unknown word, however long, to one <unk>: no
    character count proves a row overlong, so none is judged by its length."""
    from gspo_megatron.data import chars_for_tokens, max_token_chars

    assert max_token_chars(tokenizer) is None and chars_for_tokens(10, None) is None
    assert len(tokenizer.encode("x" * 10_000, add_special_tokens=False)) == 1
