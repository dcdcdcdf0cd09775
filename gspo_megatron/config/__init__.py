"""The trainer's configuration: one typed section per component, loaded from YAML with dotted
overrides (``gspo_megatron.config.io``) and validated once at start-up, before anything heavy.

Sections owned elsewhere are reused as they are: ``parallel`` (ParallelLayout), ``rollout``
(RolloutConfig), ``loss`` (PolicyLossConfig), ``optim`` (OptimConfig), ``data`` (DataConfig),
``rewards`` (RewardConfig).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from gspo_megatron.config.io import load
from gspo_megatron.data import DataConfig
from gspo_megatron.distributed.parallel import ParallelLayout
from gspo_megatron.errors import GspoError
from gspo_megatron.learner.optim import OptimConfig
from gspo_megatron.loss import PolicyLossConfig
from gspo_megatron.rewards.runner import RewardConfig
from gspo_megatron.rollout.config import RolloutConfig, max_samples_per_prompt
from gspo_megatron.rollout.episodes.agent_config import AgentConfig


@dataclass(frozen=True)
class ModelConfig:
    """The policy to train."""

    ckpt: str = ""
    """megatron-core checkpoint to start from (``gspo-convert hf-to-mcore`` output)."""
    dtype: str = "auto"
    """Parameter dtype: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    moe_aux_loss_coeff: float = 0.0
    """MoE load-balancing loss weight (0 = off, as in the paper's RL phase)."""

    def validate(self) -> None:
        if not self.ckpt:
            raise GspoError(
                "model.ckpt is empty: give a megatron checkpoint (gspo-convert hf-to-mcore)"
            )
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise GspoError(f"model.dtype='{self.dtype}' (allowed: auto, bf16, fp32)")
        if self.moe_aux_loss_coeff < 0:
            raise GspoError(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: how many steps, how big, where outputs go."""

    steps: int = 100
    """RL steps (rollout -> update -> sync)."""
    prompts_per_step: int = 32
    """Prompts per step; each gets rollout.group_size responses."""
    output_dir: str = "outputs/run"
    """Checkpoints, TensorBoard events and the resolved config go here."""
    save_every: int = 50
    """Checkpoint every K steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted after a new one is complete)."""
    async_save: bool = False
    """Write checkpoints in the background: the step after a save goes on while a forked process
    writes the files (tensors are staged to host memory first); the checkpoint is named complete
    (renamed from its temporary name, `latest` updated) only once every rank's files are written,
    so a crash mid-write leaves the previous one in force. One save in flight at a time."""
    reshardable_checkpoints: bool = True
    """Save the optimizer state in a layout-free form (megatron's fully_reshardable: gathered
    over each data-parallel group at save), so that --resume may change parallel.* and the
    number of ranks; false stores each rank's flat shard as it is (dp_reshardable: no gather,
    faster saves at scale), and a resume may then change only the number of data-parallel
    ranks."""
    seed: int = 1234
    """Seed of the model-parallel RNG and of anything else random in the trainer."""
    save_rollouts: bool = False
    """Write every step's trained samples (prompt, answer, response, reward, advantage) to
    <output_dir>/rollouts/step_N.jsonl, to read what the policy produces."""
    export_hf: bool = False
    """At the end, also write the final policy as an HF model to <output_dir>/hf."""
    max_skipped_steps: int = 3
    """Optimizer steps skipped in a row (non-finite loss or gradient norm) that stop the run."""
    eval_every: int = 0
    """Validation every K steps (0 = off): data.eval_path's prompts sampled on the colocated
    engines right after the step's weight sync (the policy after the updates so far), scored by
    the rewards, logged as eval/* (mean reward, pass@1 .. pass@eval_k); gspo-eval's sampling
    and seeds, so gspo-eval on the same checkpoint gives the same figures."""
    eval_k: int = 4
    """Samples per held-out prompt in validation (pass@k up to it)."""
    eval_pass_threshold: float = 1.0
    """A validation sample passes (pass@k) at a reward >= this."""
    collective_timeout_s: float = 1800.0
    """A collective that waits longer (a hung or dead rank) ends the run; it must exceed the
    longest legitimate wait (the slowest engine's rollout, a checkpoint write)."""

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "keep_checkpoints", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise GspoError(f"train.{name}={getattr(self, name)} must be >= 1")
        if not self.output_dir.strip():
            raise GspoError("train.output_dir is empty: name a directory for checkpoints and logs")
        if self.save_every < 0:
            raise GspoError(
                f"train.save_every={self.save_every} must be >= 0 (0 = only at the end)"
            )
        if not self.collective_timeout_s > 0:
            raise GspoError(f"train.collective_timeout_s={self.collective_timeout_s} must be > 0")
        if self.eval_every < 0 or self.eval_k < 1:
            raise GspoError(
                f"train.eval_every={self.eval_every} must be >= 0 (0 = off) and "
                f"train.eval_k={self.eval_k} >= 1"
            )
        if not math.isfinite(self.eval_pass_threshold):
            raise GspoError(f"train.eval_pass_threshold={self.eval_pass_threshold}: not finite")


@dataclass(frozen=True)
class Config:
    """The whole run; see the README's config reference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: int) -> None:
        """Every section's own checks, then the ones that span sections."""
        self.model.validate()
        self.data.validate()
        # An environment's per-turn rewards may be the whole signal (agent.turn_rewards: sum).
        self.rewards.validate(allow_empty=self.agent.enabled and self.agent.turn_rewards == "sum")
        self.rollout.validate(world_size)
        self.agent.validate(self.rollout.max_new_tokens, self.rollout.max_model_len)
        self.loss.validate()
        self.optim.validate()
        self.train.validate()
        if not Path(self.model.ckpt).is_dir():
            raise GspoError(f"model.ckpt={self.model.ckpt}: no such checkpoint directory")
        if not Path(self.data.path).is_file():
            raise GspoError(f"data.path={self.data.path}: no such data file")
        if self.train.eval_every and not self.data.eval_path:
            raise GspoError(
                f"train.eval_every={self.train.eval_every} needs held-out prompts: set "
                f"data.eval_path (or train.eval_every=0)"
            )
        if self.train.eval_k > max_samples_per_prompt():
            raise GspoError(
                f"train.eval_k={self.train.eval_k}: vLLM samples at most "
                f"{max_samples_per_prompt()} responses per prompt (VLLM_MAX_N_SEQUENCES)"
            )
        if self.train.eval_every and not Path(self.data.eval_path).is_file():
            raise GspoError(f"data.eval_path={self.data.eval_path}: no such data file")
        # Settings that run but cannot learn: every group's advantages would be 0.
        if self.rollout.group_size < 2:
            raise GspoError(
                f"rollout.group_size={self.rollout.group_size}: advantages are "
                f"normalised within a group, so a group of 1 has advantage 0 and "
                f"nothing is learned; use >= 2 (paper-style runs: 8-16)"
            )
        if self.rollout.temperature == 0:
            raise GspoError(
                "rollout.temperature=0 is greedy decoding: the group's responses are "
                "identical and every advantage is 0; use a temperature > 0 (1.0)"
            )
        env_rewards = self.agent.enabled and self.agent.turn_rewards == "sum"
        if not env_rewards and not any(f.weight for f in self.rewards.functions):
            raise GspoError(
                "rewards.functions: every weight is 0, so every reward and advantage "
                "is 0; give at least one function a non-zero weight"
            )
        if self.loss.routing_replay == "r3" and self.rollout.capture_routes == "never":
            raise GspoError(
                "loss.routing_replay=r3 replays the engine's routes, but "
                "rollout.capture_routes=never does not record them; use auto or always"
            )
        if self.agent.enabled and self.loss.routing_replay == "r3":
            # Each turn's engine call re-reads the transcript as its prompt (from the prefix
            # cache): the routes the engine used for a token are spread over the turn that
            # sampled it and the turns that re-read it, which no placement here reassembles.
            raise GspoError(
                "loss.routing_replay=r3 replays the engine's routes, which multi-turn episodes "
                "(agent.environment) do not assemble across turns; use loss.routing_replay=r2 "
                "(pi_old's routes, any number of turns) or none"
            )
        if self.rollout.partial:
            # What a partial rollout cannot do yet, each in one line before any model.
            turns, head = self.agent.max_turns, self.rollout.partial_turns
            if self.agent.enabled and turns < 2:
                raise GspoError(
                    f"rollout.partial=true with agent.max_turns={turns}: an episode is "
                    f"interrupted between two turns, and one turn has no such point; raise "
                    f"agent.max_turns or use rollout.partial=false"
                )
            if self.agent.enabled and head >= turns:
                raise GspoError(
                    f"rollout.partial_turns={head}: must be below agent.max_turns={turns} "
                    f"(the turns before the interruption; 0 = half of them)"
                )
            if self.rollout.dynamic_sampling:
                raise GspoError(
                    "rollout.partial=true with rollout.dynamic_sampling=true: a sampling round "
                    "needs the previous round's rewards, which an interrupted batch does not "
                    "have yet; turn one of them off"
                )
            if self.loss.routing_replay == "r3":
                raise GspoError(
                    "loss.routing_replay=r3 with rollout.partial=true: a response continued "
                    "under new weights has its routes from two engine calls, which are not "
                    "reassembled; use loss.routing_replay=r2 or none"
                )
        if self.rollout.placement == "separate" and self.train.eval_every:
            raise GspoError(
                f"train.eval_every={self.train.eval_every}: validation runs on colocated engines, "
                f"and rollout.placement=separate has none in the training ranks; use "
                f"train.eval_every=0 and gspo-eval on the checkpoints"
            )
        if self.loss.per_token and self.model.moe_aux_loss_coeff:
            # The aux loss is scaled for a per-sequence normaliser (update.scale_moe_aux_loss).
            raise GspoError(
                f"loss.variant={self.loss.variant} normalises by tokens, which "
                f"model.moe_aux_loss_coeff={self.model.moe_aux_loss_coeff} is not scaled "
                f"for; use model.moe_aux_loss_coeff=0 (the paper's RL setting) or a "
                f"per-sequence variant"
            )
        budget = self.loss.max_tokens_per_microbatch
        if budget and budget < self.rollout.max_model_len:
            raise GspoError(
                f"loss.max_tokens_per_microbatch={budget} is less than a sample can be "
                f"(rollout.max_prompt_tokens + rollout.max_new_tokens = "
                f"{self.rollout.max_model_len}); raise it or use 0"
            )
        if budget and self.model.moe_aux_loss_coeff:
            raise GspoError(
                f"loss.max_tokens_per_microbatch={budget} packs a varying number of sequences "
                f"per micro-batch, which model.moe_aux_loss_coeff is not scaled for; use "
                f"model.moe_aux_loss_coeff=0 (the paper's RL setting) or padded micro-batches"
            )
        samples = self.train.prompts_per_step * self.rollout.group_size
        if samples % self.loss.num_minibatches:
            raise GspoError(
                f"train.prompts_per_step x rollout.group_size = {samples} samples do not "
                f"split into loss.num_minibatches={self.loss.num_minibatches}"
            )

    def capture_routes(self, on_gpu: bool) -> bool:
        """Whether the engine records its routes (MoE models): rollout.capture_routes=always, or auto
        where it costs nothing (CPU: the engine runs eagerly anyway) or r3 needs it."""
        setting = self.rollout.capture_routes
        if self.agent.enabled or self.rollout.partial:
            return False  # a turn's / a continuation's routes cover one engine call (see r3)
        return setting == "always" or (
            setting == "auto" and (not on_gpu or self.loss.routing_replay == "r3")
        )


def load_config(path: Optional[Path], overrides: Sequence[str] = ()) -> Config:
    return load(Config, path, overrides)
