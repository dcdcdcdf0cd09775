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

So a transcript equals the template's rendering of the whole conversation, encoded, except
where the model's own ids differ from re-encoding their text. The template must be
prefix-stable (a conversation's rendering is a prefix of the rendering with more messages);
one that rewrites earlier turns (Qwen3's drops earlier turns' reasoning on a new user turn) is
refused with a message naming the turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from gspo_megatron.errors import GspoError

OBSERVATION_CUT = " [truncated]"


class ChatRenderer:
    """The chat template's ids for openings and environment messages."""

    def __init__(self, tokenizer, end_of_turn: int):
        if not getattr(tokenizer, "chat_template", None):
            raise GspoError(
                "multi-turn episodes need a chat template: the model's tokenizer has none "
                "(tokenizer_config.json 'chat_template')"
            )
        self.tok, self.eot = tokenizer, end_of_turn
        self.eot_text = tokenizer.decode([end_of_turn], skip_special_tokens=False)

    def render(self, messages: Sequence[dict], tools: Optional[list], prompt: bool) -> str:
        text = self.tok.apply_chat_template(
            list(messages), tools=tools or None, add_generation_prompt=prompt, tokenize=False
        )
        return text

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def opening(self, messages: Sequence[dict], tools: Optional[list]) -> List[int]:
        return self.encode(self.render(messages, tools, prompt=True))

    def environment(
        self, conversation: Sequence[dict], new: Sequence[dict], tools: Optional[list]
    ) -> List[int]:
        """Ids of ``new`` (and the next generation prompt) after ``conversation``, which ends with
        an assistant turn whose end-of-turn token is already in the transcript."""
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
        return self.encode(before[cut + len(self.eot_text) :] + after[len(before) :])

    def cut_observation(self, content: str, limit: int) -> tuple:
        """``content`` within ``limit`` tokens (marked when cut), and whether it was cut."""
        ids = self.encode(content)
        if len(ids) <= limit:
            return content, False
        return self.tok.decode(ids[:limit], skip_special_tokens=False) + OBSERVATION_CUT, True


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
