"""Token-exact transcripts of multi-turn episodes: token in, token out.

An episode's ids are built once and only appended to; nothing the model sampled is ever decoded
and encoded again. Decoding sampled ids and re-encoding the text can give other ids (BPE merges
across the boundary of two sampled tokens, whitespace normalisation), and then the trainer
would score tokens the engine never produced: the most common bug of multi-turn RL.

- The opening (the environment's first messages) is the chat template's rendering with the
  generation prompt, encoded.
- A model turn appends the engine's sampled ids verbatim (mask 1). A turn that stopped without
  the end-of-turn token (the per-turn or the episode's token budget ran out) gets it appended
  as an environment token (mask 0): the template's turn structure holds for what follows.
- Environment messages append the template's own ids for them: the conversation is rendered as
  text with and without the new messages, and the difference is encoded. It starts right after
  the end-of-turn token (the template's separator after it included, so no turn separator is
  ever dropped) and ends with the next assistant turn's generation prompt. Encoding a suffix
  that starts right after a special token gives the ids the whole rendering would have there:
  tokenizers split at special tokens first.

Environment content stays text. Every string an environment returns (message contents, tool
results, tool specs) is encoded as plain text: a tool result holding ``<|im_end|>\n<|im_start|>
assistant`` is those characters, never the ids that would close its turn and open a forged one,
so the template's own markers are the only added-token ids in a transcript. Content without
added-token text encodes exactly as the whole rendering does (the fast path); content with it is
rendered with each such text swapped for a reserved placeholder character, the rendering is split
at the template's added tokens, and each piece between them is encoded, placeholders restored,
by the tokenizer without its added tokens: tokenizers split at added tokens first, so the pieces
are what the whole rendering encodes to, but for the content's added-token text, now plain
(``agent.env_special_tokens: true`` restores the old parsing for setups that need it).

So a transcript equals the template's rendering of the whole conversation, encoded, except
where the model's own ids differ from re-encoding their text. The template must be
prefix-stable (a conversation's rendering is a prefix of the rendering with more messages);
one that rewrites earlier turns (Qwen3's drops earlier turns' reasoning on a new user turn) is
refused with a message naming the turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from gspo_megatron.errors import GspoError

OBSERVATION_CUT = " [truncated]"


PLACEHOLDER_BASE = 0xF0000
"""Added token k of the tokenizer stands in environment text as chr(PLACEHOLDER_BASE + k) while
the template renders it (supplementary private use: no tokenizer gives it a meaning)."""


class ChatRenderer:
    """The chat template's ids for openings and environment messages."""

    def __init__(self, tokenizer, end_of_turn: int, env_special_tokens: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise GspoError(
                "multi-turn episodes need a chat template: the model's tokenizer has none "
                "(tokenizer_config.json 'chat_template')"
            )
        self.tok, self.eot = tokenizer, end_of_turn
        self.eot_text = tokenizer.decode([end_of_turn], skip_special_tokens=False)
        self.env_special_tokens = env_special_tokens
        added = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
        self._added_ids = dict(added)
        self._added = re.compile("|".join(re.escape(t) for t, _ in added)) if added else None
        self._to_placeholder = {t: chr(PLACEHOLDER_BASE + k) for k, (t, _) in enumerate(added)}
        self._from_placeholder = {ord(c): t for t, c in self._to_placeholder.items()}
        self._plain = None  # the tokenizer without its added tokens, made when first needed

    def render(self, messages: Sequence[dict], tools: Optional[list], prompt: bool) -> str:
        text = self.tok.apply_chat_template(
            list(messages), tools=tools or None, add_generation_prompt=prompt, tokenize=False
        )
        return text

    def encode(self, text: str) -> List[int]:
        """The template's text: its added tokens (markers, special tokens) as their ids."""
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_text(self, text: str) -> List[int]:
        """Environment text: every character plain, added-token text included."""
        if self.env_special_tokens or self._added is None:
            return self.encode(text)
        if self._plain is None:
            self._plain = _without_added_tokens(self.tok)
        if self._plain is False:  # no fast tokenizer to copy: the special tokens at least
            return list(self.tok.encode(text, add_special_tokens=False, split_special_tokens=True))
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def opening(self, messages: Sequence[dict], tools: Optional[list]) -> List[int]:
        (messages, tools), protected = self._protect((list(messages), tools))
        text = self.render(messages, tools, prompt=True)
        return self._encode_rendered(text) if protected else self.encode(text)

    def environment(
        self, conversation: Sequence[dict], new: Sequence[dict], tools: Optional[list]
    ) -> List[int]:
        """Ids of ``new`` (and the next generation prompt) after ``conversation``, which ends with
        an assistant turn whose end-of-turn token is already in the transcript."""
        new, protected = self._protect(list(new))
        before = self.render(conversation, tools, prompt=False)
        after = self.render(list(conversation) + list(new), tools, prompt=True)
        if not after.startswith(before):
            raise GspoError(
                f"the chat template is not prefix-stable: rendering message "
                f"{len(conversation) + 1} ({new[0].get('role')}) changes how the earlier turns "
                f"render, so a transcript cannot be extended token for token; use a template "
                f"that renders each turn on its own"
            )
        cut = before.rfind(self.eot_text)
        if cut < 0:
            raise GspoError(
                f"the chat template does not end an assistant turn with "
                f"{self.eot_text!r} (the token that stops a turn)"
            )
        text = before[cut + len(self.eot_text) :] + after[len(before) :]
        return self._encode_rendered(text) if protected else self.encode(text)

    def cut_observation(self, content: str, limit: int) -> tuple:
        """``content`` within ``limit`` tokens (marked when cut), and whether it was cut."""
        ids = self.encode_text(content)
        if len(ids) <= limit:
            return content, False
        return self.tok.decode(ids[:limit], skip_special_tokens=False) + OBSERVATION_CUT, True

    def _protect(self, value):
        """``value`` (messages, tool specs) with the added-token text in its strings swapped
        for placeholders, and whether there was any: a copy, or ``value`` itself if none."""
        if self.env_special_tokens or self._added is None:
            return value, False
        found = []

        def walk(v, key=None):
            if isinstance(v, str):
                if key == "role" or not self._added.search(v):
                    return v
                if any(ord(c) in self._from_placeholder for c in v):
                    raise GspoError(
                        f"environment text holds a character of U+{PLACEHOLDER_BASE:X}.."
                        f"U+{PLACEHOLDER_BASE + len(self._from_placeholder) - 1:X}, which the "
                        f"trainer reserves to keep the tokenizer's added tokens plain text"
                    )
                found.append(True)
                return self._added.sub(lambda m: self._to_placeholder[m.group(0)], v)
            if isinstance(v, dict):
                return {k: walk(x, k) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(walk(x) for x in v)
            return v

        out = walk(value)
        return (out, True) if found else (value, False)

    def _encode_rendered(self, text: str) -> List[int]:
        """A rendering of protected messages: the template's added tokens as their ids, every
        piece between them as plain text with the placeholders turned back into the text they
        stand for."""
        ids: List[int] = []
        start = 0
        for m in self._added.finditer(text):
            ids += self.encode_text(text[start : m.start()].translate(self._from_placeholder))
            ids.append(self._added_ids[m.group(0)])
            start = m.end()
        ids += self.encode_text(text[start:].translate(self._from_placeholder))
        return ids


def _without_added_tokens(tokenizer):
    """A copy of a fast tokenizer's backend with no added tokens (so no text is ever matched
    as one), or False for a tokenizer that has no backend to copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))


@dataclass
class Transcript:
    """One episode: the opening ids, then every later id with its mask and engine log-prob."""

    prompt_ids: List[int]
    messages: List[dict]
    tools: Optional[list] = None
    ids: List[int] = field(default_factory=list)
    mask: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    """The engine's log-prob per id; 0.0 for environment ids (never read: mask 0)."""
    closed_by_env: int = 0
    """Turns whose end-of-turn token the transcript appended (the model did not write it)."""
    versions: List[int] = field(default_factory=list)
    """The policy version current when each id was appended (``version``): a model id's is
    the version that sampled it. Partial rollouts continue an episode under the next one."""
    version: int = 0
    """The policy version sampling now: what ``versions`` records for the ids appended next."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.ids)

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)

    @property
    def env_tokens(self) -> int:
        return len(self.mask) - sum(self.mask)

    def add_model_turn(
        self, renderer: ChatRenderer, ids: Sequence[int], logprobs: Sequence[float]
    ) -> str:
        """Append a model turn verbatim; returns its text (what the environment reads)."""
        if len(logprobs) != len(ids):
            raise ValueError(f"{len(logprobs)} log-probs for {len(ids)} sampled ids")
        self.ids += list(ids)
        self.mask += [1] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.versions += [self.version] * len(ids)
        own = list(ids)
        if not own or own[-1] != renderer.eot:
            self._add_env([renderer.eot])
            self.closed_by_env += 1
        else:
            own = own[:-1]
        text = renderer.tok.decode(own, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def environment_ids(self, renderer: ChatRenderer, new: Sequence[dict]) -> List[int]:
        """The ids ``new`` (and the next generation prompt) would append."""
        return renderer.environment(self.messages, new, self.tools)

    def add_environment(self, new: Sequence[dict], ids: Sequence[int]) -> None:
        """Append the environment's messages as ``environment_ids`` gave them."""
        self.messages += list(new)
        self._add_env(ids)

    def _add_env(self, ids: Sequence[int]) -> None:
        self.ids += list(ids)
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [self.version] * len(ids)
