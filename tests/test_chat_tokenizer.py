"""The local chat tokenizer: its ChatML template against text written out by hand, prefix
stability, single-id specials, token drift, the vocabulary bound and determinism."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gspo_megatron.testing.chat_tokenizer import (
    CHAT_SPECIALS,
    drifting_ids,
    write_chat_tokenizer,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Value of a key.",
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}}},
        },
    }
]
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"key": "k17"}}\n</tool_call>'
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What are k17 and k18?"},
    {"role": "assistant", "content": "Looking up.\n" + CALL},
    {"role": "tool", "content": '{"value": 42}'},
    {"role": "tool", "content": '{"value": 7}'},
    {"role": "assistant", "content": "42 and 7."},
]

# Written out by hand, not produced by the template: the independent reference. TOOLS_SYSTEM is
# the system turn from the tools block to its end.
TOOLS_SYSTEM = (
    "# Tools\n"
    "\n"
    "You may call one or more functions to assist with the user query.\n"
    "\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
    '{"type": "function", "function": {"name": "lookup", "description": "Value of a key.", '
    '"parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}}\n'
    "</tools>\n"
    "\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
EXPECTED = (
    "<|im_start|>system\nYou are terse.\n\n" + TOOLS_SYSTEM + "<|im_start|>user\n"
    "What are k17 and k18?<|im_end|>\n"
    "<|im_start|>assistant\n"
    "Looking up.\n"
    "<tool_call>\n"
    '{"name": "lookup", "arguments": {"key": "k17"}}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n"
    "<tool_response>\n"
    '{"value": 42}\n'
    "</tool_response>\n"
    "<tool_response>\n"
    '{"value": 7}\n'
    "</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
    "42 and 7.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok")
    write_chat_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def render(tok, messages, tools=None, gen=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)


def test_template_renders_expected_text(tok):
    assert render(tok, CONVERSATION, TOOLS) == EXPECTED
    assert render(tok, CONVERSATION, TOOLS, gen=True) == EXPECTED + "<|im_start|>assistant\n"


def test_template_without_tools(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    assert render(tok, messages, gen=True) == expected + "<|im_start|>assistant\n"
    # Tools without a system message: the tools' system turn comes first all the same.
    assert render(tok, messages[1:], TOOLS) == (
        "<|im_start|>system\n" + TOOLS_SYSTEM + "<|im_start|>user\nU<|im_end|>\n"
    )


def test_structured_tool_calls_render_as_the_text_a_model_writes(tok):
    structured = [dict(m) for m in CONVERSATION]
    structured[2] = {
        "role": "assistant",
        "content": "Looking up.",
        "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"key": "k17"}}}
        ],
    }
    assert render(tok, structured, TOOLS) == EXPECTED


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_prefix_stable(tok, tools):
    # Every prefix of the conversation that ends with an assistant turn.
    cuts = [i + 1 for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    more = [{"role": "user", "content": "And k19?"}, {"role": "assistant", "content": CALL}]
    for cut in cuts:
        head = render(tok, CONVERSATION[:cut], tools)
        for tail in (CONVERSATION[cut:], more, more[:1], [{"role": "tool", "content": "1"}]):
            for gen in (False, True):
                assert render(tok, CONVERSATION[:cut] + tail, tools, gen).startswith(head)


def test_specials_are_single_ids(tok):
    ids = [tok.encode(s, add_special_tokens=False) for s in CHAT_SPECIALS]
    assert all(len(i) == 1 for i in ids)
    # The last ids, in CHAT_SPECIALS' order; eos and pad are the ChatML ones.
    assert [i[0] for i in ids] == list(range(len(tok) - len(CHAT_SPECIALS), len(tok)))
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    # Inside rendered text they are still matched whole, and the text comes back unchanged.
    text = render(tok, CONVERSATION, TOOLS, gen=True)
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded.count(tok.convert_tokens_to_ids("<tool_call>")) == 3
    assert encoded.count(tok.convert_tokens_to_ids("<|im_start|>")) == 6
    assert tok.decode(encoded) == text


def test_skip_special_tokens_keeps_tool_markers(tok):
    ids = tok.encode(CALL + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == CALL
    assert tok.decode(ids, skip_special_tokens=False) == CALL + "<|im_end|>"


def test_drifting_ids_drift(tok):
    ids = drifting_ids(tok)
    specials = set(tok.convert_tokens_to_ids(CHAT_SPECIALS))
    assert ids and all(0 <= i < len(tok) and i not in specials for i in ids)
    assert tok.encode(tok.decode(ids), add_special_tokens=False) != ids
    assert drifting_ids(tok) == ids


@pytest.mark.parametrize("vocab_size", [300, 512])
def test_vocab_within_bound(tmp_path, vocab_size):
    write_chat_tokenizer(tmp_path, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) <= vocab_size
    assert max(tok.get_vocab().values()) < vocab_size


def test_vocab_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="byte alphabet"):
        write_chat_tokenizer(tmp_path, vocab_size=256)


def test_same_seed_same_encoding(tmp_path):
    text = "The value of k17 is 42.\n" + CALL + " 12 * 34 = 408"
    toks = []
    for name in ("a", "b"):
        write_chat_tokenizer(tmp_path / name, seed=3)
        toks.append(AutoTokenizer.from_pretrained(tmp_path / name))
    assert toks[0].encode(text) == toks[1].encode(text)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
