"""A small byte-level BPE tokenizer with a ChatML chat template, made locally (nothing is downloaded).

Multi-turn, tool-using tests and the demo need what a real chat tokenizer has and the word-level
``tiny_model.write_tokenizer`` lacks: a template in Qwen3's ChatML shape (tools in the system
turn, tool results folded into user turns), single-id special tokens, and BPE merges, so that
decoding ids and encoding the text again can give different ids ("token drift"). A trainer that
re-encodes a rollout's text instead of keeping its ids is wrong on such tokenizers; tests use
``drifting_ids`` to build a case that shows it.

The BPE is trained in well under a second on generated text that is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import List, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Special tokens are dropped by decode(skip_special_tokens=True); the tool markers are not, as in
# Qwen3, because a parser of the decoded text needs them. All are added tokens: never split.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_MARKERS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHAT_SPECIALS = SPECIAL_TOKENS + TOOL_MARKERS

# Qwen3's ChatML shape, without its reasoning (<think>) handling. Nothing is stripped or
# rewritten, so an assistant turn renders as the exact text the model produced and a
# conversation's rendering is a prefix of the rendering of any continuation of it.
CHAT_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' }}
    {%- for tool in tools %}
        {{- tool | tojson }}
        {{- '\n' }}
    {%- endfor %}
    {{- '</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not (tools and loop.first) %}
            {{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {#- Structured tool calls render as the text a model would write for them. #}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {#- A run of tool results shares one user turn. #}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".strip()

_WORDS = (
    "the a an of to in is it and that for on with as was at by this be are from or have not "
    "value key number result answer tool call function name arguments lookup add search query "
    "user assistant system please what which find compute sum total first second next last "
    "small large table list item record city weather today time data file open read write"
).split()
_SYLLABLES = "ka to mi ra ne so lu pe di fo ba re zu ti mo".split()


def _word(rng: random.Random) -> str:
    """Mostly common words, some made-up ones, so the merges are not all whole words."""
    if rng.random() < 0.8:
        return rng.choice(_WORDS)
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(3, 12))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ":"])


def _tool_call(rng: random.Random) -> tuple:
    """(text of a <tool_call> block, text of a matching tool result)."""
    kind = rng.randrange(3)
    if kind == 0:
        key, value = f"k{rng.randint(0, 99)}", rng.randint(0, 999)
        name, args, result = "lookup", {"key": key}, {"value": value}
    elif kind == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        name, args, result = "add", {"a": a, "b": b}, {"sum": a + b}
    else:
        query = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
        name, args, result = "search", {"query": query}, {"hits": rng.randint(0, 9)}
    call = json.dumps({"name": name, "arguments": args})
    return f"<tool_call>\n{call}\n</tool_call>", json.dumps(result)


def _conversation(rng: random.Random) -> str:
    """One rendered multi-turn conversation with a tool call, written out directly: the corpus
    only needs the text's shape, and rendering it through Jinja would make training slower."""
    call, result = _tool_call(rng)
    return (
        f"<|im_start|>user\n{_sentence(rng)}<|im_end|>\n"
        f"<|im_start|>assistant\n{call}<|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n"
        f"<|im_start|>assistant\n{_sentence(rng)}<|im_end|>\n"
    )


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}"


def training_corpus(seed: int = 0, lines: int = 3000) -> List[str]:
    """Generated lines of text (prose, numbers, arithmetic, tool calls, chat turns)."""
    rng = random.Random(seed)
    makers = (_sentence, _arithmetic, lambda r: _tool_call(r)[0], _conversation)
    return [rng.choice(makers)(rng) for _ in range(lines)]


# The added tokens are matched before BPE runs, so training on them would only spend merges on
# pieces ("<|", "im", ...) that encoding never produces; the corpus is split around them.
_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in CHAT_SPECIALS))


def write_chat_tokenizer(
    out: Path, vocab_size: int = 512, seed: int = 0, extra_lines: Sequence[str] = ()
) -> None:
    """Train the byte-level BPE and save it, with CHAT_TEMPLATE, as HF tokenizer files.
    ``extra_lines``: text of a task added to the corpus (its phrases get merges of their own).

    ``len(tokenizer) <= vocab_size``: the 256 byte tokens and the merges take the first ids,
    the CHAT_SPECIALS the last ``len(CHAT_SPECIALS)`` ids, in CHAT_SPECIALS' order.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe_size = vocab_size - len(CHAT_SPECIALS)
    if bpe_size < len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} < {len(alphabet) + len(CHAT_SPECIALS)}: "
            "the byte alphabet and the chat specials need that many ids"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        initial_alphabet=sorted(alphabet),  # sorted: the set's order is not the same every run
        special_tokens=[],
        show_progress=False,
    )
    lines = training_corpus(seed) + list(extra_lines)
    pieces = [p for line in lines for p in _SPECIALS_RE.split(line) if p]
    tok.train_from_iterator(pieces, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_MARKERS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


def drifting_ids(tokenizer) -> List[int]:
    """Two non-special token ids whose decoded text encodes to other ids.

    Found by splitting each token's text in two (lowest id first, then leftmost split): when
    both halves are single tokens, their pair decodes to the whole token's text, which BPE
    encodes as the one merged token. Deterministic for a given tokenizer.
    """
    added = set(tokenizer.get_added_vocab().values())
    for token_id in sorted(tokenizer.get_vocab().values()):
        if token_id in added:
            continue
        text = tokenizer.decode([token_id])
        for i in range(1, len(text)):
            ids = tokenizer.encode(text[:i], add_special_tokens=False)
            ids += tokenizer.encode(text[i:], add_special_tokens=False)
            if len(ids) != 2 or added.intersection(ids):
                continue
            if tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) != ids:
                return ids
    raise ValueError("no drifting pair of tokens found: the tokenizer has no usable merges")
