"""Multi-turn, tool-using episodes (the ``agent:`` section of a config).

Off by default (``environment: ""``): gspo-train samples one response per prompt. With an
environment, every sample is an episode of up to ``max_turns`` assistant turns, the environment
answering each (``gspo_megatron.rollout.episodes.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gspo_megatron.errors import GspoError

TOOL_CALL_FORMATS = ("qwen3",)
TURN_REWARDS = ("sum", "ignore")


@dataclass(frozen=True)
class AgentConfig:
    """The environment and the limits of an episode."""

    environment: str = ""
    """The environment class, 'package.module:Class' (made per episode from the data row; see
    the README's "Multi-turn episodes with tools"); '' = single-turn sampling."""
    max_turns: int = 4
    """Assistant turns per episode at most; the episode ends after the last one."""
    max_tokens_per_turn: int = 0
    """New tokens per assistant turn at most (0 = rollout.max_new_tokens)."""
    max_episode_tokens: int = 0
    """Tokens of a whole episode at most, its opening prompt included (0 = the engine's
    rollout.max_prompt_tokens + rollout.max_new_tokens, which it may not exceed); an episode that
    reaches it is ended and counted in agent/truncated_episodes."""
    max_observation_tokens: int = 512
    """Tokens of one environment message's content at most; a longer one is cut and ends with
    ' [truncated]' (so the model sees that it was)."""
    max_tool_calls_per_turn: int = 4
    """Tool calls the environment receives from one turn; further calls become error entries."""
    tool_call_format: str = "qwen3"
    """How tool calls are written in the assistant text: qwen3 (<tool_call>{json}</tool_call>)."""
    step_timeout_s: float = 30.0
    """An environment's reset or step that takes longer ends its episode as failed (reward 0,
    agent/env_timeouts); the run goes on."""
    max_parallel_envs: int = 0
    """Live episodes (environment processes) on one machine at most (0: sized to the machine,
    32 per CPU up to 256 and what half its free memory holds); a step's episodes beyond it run
    in later waves, each over before the next opens."""
    env_memory_gib: float = 2.0
    """Memory an environment process may take beyond what it holds once the class is imported
    (0: no limit): going over it fails that episode with a line saying so, not the machine.
    Each process the environment starts has the same cap (README, "Limits")."""
    env_start_timeout_s: float = 120.0
    """A new environment process that has not imported the class within this long fails its
    episode (timeout); the pre-flight's trial construction gets as long. Raise it for modules
    that import slowly."""
    max_failed_steps: int = 3
    """Steps in a row in which every episode's environment failed before the run stops with the
    first failure's line (0: never). Such a step has nothing to learn from; one or two can be a
    passing outage of what the environment talks to, three in a row are a broken environment
    whose run would only spend compute."""
    env_special_tokens: bool = False
    """Parse the tokenizer's added tokens (<|im_end|>, <tool_call>, ...) in what environments
    return as those tokens. Off: environment text is plain text, so a tool result cannot close
    its turn or forge another one; turn it on only for an environment you trust to write the
    template's markers itself."""
    turn_rewards: str = "sum"
    """Per-turn rewards the environment returns: sum (added to the episode's reward from
    rewards.functions) or ignore."""

    @property
    def enabled(self) -> bool:
        return bool(self.environment)

    def validate(self, max_new_tokens: int, max_model_len: int) -> None:
        if not self.enabled:
            return
        if ":" not in self.environment:
            raise GspoError(
                f"agent.environment='{self.environment}': expected an import path "
                f"'package.module:Class'"
            )
        for name in ("max_turns", "max_observation_tokens", "max_tool_calls_per_turn"):
            if getattr(self, name) < 1:
                raise GspoError(f"agent.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_tokens_per_turn", "max_episode_tokens"):
            if getattr(self, name) < 0:
                raise GspoError(f"agent.{name}={getattr(self, name)} must be >= 0 (0 = default)")
        if self.max_episode_tokens > max_model_len:
            raise GspoError(
                f"agent.max_episode_tokens={self.max_episode_tokens} exceeds what the engine "
                f"holds (rollout.max_prompt_tokens + rollout.max_new_tokens = {max_model_len}): "
                f"raise those or lower it"
            )
        if self.tokens_per_turn(max_new_tokens) >= self.episode_tokens(max_model_len):
            raise GspoError(
                f"agent.max_tokens_per_turn={self.tokens_per_turn(max_new_tokens)} leaves no "
                f"room in an episode of {self.episode_tokens(max_model_len)} tokens "
                f"(agent.max_episode_tokens) for its prompt"
            )
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise GspoError(
                f"agent.tool_call_format='{self.tool_call_format}' (allowed: "
                f"{', '.join(TOOL_CALL_FORMATS)})"
            )
        if self.turn_rewards not in TURN_REWARDS:
            raise GspoError(
                f"agent.turn_rewards='{self.turn_rewards}' (allowed: {', '.join(TURN_REWARDS)})"
            )
        for name in ("step_timeout_s", "env_start_timeout_s"):
            if not getattr(self, name) > 0:
                raise GspoError(f"agent.{name}={getattr(self, name)} must be > 0")
        if self.max_parallel_envs < 0:
            raise GspoError(
                f"agent.max_parallel_envs={self.max_parallel_envs} must be >= 0 (0 = sized to "
                f"the machine)"
            )
        if not self.env_memory_gib >= 0:
            raise GspoError(
                f"agent.env_memory_gib={self.env_memory_gib} must be >= 0 (0 = no limit)"
            )
        if self.max_failed_steps < 0:
            raise GspoError(
                f"agent.max_failed_steps={self.max_failed_steps} must be >= 0 (0 = never stop)"
            )

    def tokens_per_turn(self, max_new_tokens: int) -> int:
        return self.max_tokens_per_turn or max_new_tokens

    def episode_tokens(self, max_model_len: int) -> int:
        return self.max_episode_tokens or max_model_len


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The token that closes an assistant turn in the chat template: ChatML's <|im_end|> where
    the vocabulary has it, else the tokenizer's EOS."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return vocab["<|im_end|>"]
    return tokenizer.eos_token_id
