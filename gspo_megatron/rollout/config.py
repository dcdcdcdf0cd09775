"""What the rollout engine samples and how it is placed (the ``rollout:`` section of a config)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gspo_megatron.errors import GspoError

ENGINE_DTYPES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class RolloutConfig:
    """vLLM sampling and placement. One engine per ``engine_tp`` consecutive training ranks."""

    group_size: int = 8
    """G: responses sampled per prompt; advantages are normalised within each group (so
    training needs >= 2)."""
    temperature: float = 1.0
    """Sampling temperature. The trainer scores the untempered policy, so keep 1.0 unless you
    accept that pi_old (and the logprob diff metric) then differ from what was sampled."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 = off."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped and counted (rollout/skipped_overlong), never sent to vLLM."""
    max_new_tokens: int = 1024
    """Response budget; generation also stops at the tokenizer's EOS."""
    engine_tp: int = 1
    """Tensor-parallel size of each vLLM engine; the world size must be a multiple of it."""
    dtype: str = "auto"
    """The engine's own precision: auto (the trainer's, model.dtype), bf16 or fp32. Every weight
    sync and transfer casts to it. A bf16 engine beside an fp32 trainer is how GPU clusters run
    (vLLM in bf16): its log-probs and MoE routes then differ from the trainer's, the mismatch
    GSPO's sequence ratio is built for (rollout/logprob_abs_diff_*, rollout/token_log_rho_*,
    rollout/route_agreement)."""
    gpu_memory_utilization: float = 0.5
    """GPU only: fraction of GPU memory vLLM may hold (weights + KV cache) while awake."""
    kv_cache_gib: float = 1.0
    """CPU only: KV cache size in GiB (vLLM's CPU backend reserves it from host memory)."""
    enforce_eager: bool = False
    """Skip CUDA graphs (always eager on CPU)."""
    enable_prefix_caching: bool = True
    """Share the prompt's KV cache across the G samples; reset after every weight sync."""
    sleep_during_training: bool = True
    """GPU only: free vLLM's weights and KV cache while the trainer runs, take them back for
    rollouts (vLLM sleep mode level 2; the weights come back through the weight sync)."""
    sync_bucket_mb: int = 512
    """Weight sync moves tensors in all-gather buckets of at most this many MiB."""
    capture_routes: str = "auto"
    """MoE: record the experts each layer routes every token to while sampling (for
    rollout/route_agreement and loss.routing_replay=r3): always, never, or auto (on CPU, where it
    is free, and whenever r3 needs it). It turns prefix caching off; on GPU it also runs vLLM's V1
    model runner without CUDA graphs, which costs sampling speed."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (advantage 0: no gradient) and sample more
    prompts until train.prompts_per_step informative groups are collected (DAPO)."""
    max_sampling_rounds: int = 3
    """dynamic_sampling: sampling rounds per step at most; after the last the step trains on the
    informative groups it has."""
    seed: int = 0
    """Base of the per-prompt sampling seeds (a seed depends on step and prompt index only, so a
    rollout does not depend on which engine served it)."""
    placement: str = "colocated"
    """Where the engines run: colocated (in every training process, a step strictly sync ->
    sample -> train) or separate (on the last rollout.num_ranks ranks of the launch, which run
    vLLM only and keep sampling while the trainer trains; ``rollout.placement``)."""
    num_ranks: int = 0
    """placement=separate: ranks of the launch that run the engines (the last ones; engine_tp
    must divide them); the others train."""
    start_timeout_s: float = 1800.0
    """placement=separate: how long each side waits at start for the other (the rollout ranks'
    vLLM engines, the trainer's model and checkpoint) before the first weight transfer;
    afterwards train.collective_timeout_s bounds every wait."""
    max_staleness: int = 0
    """s: the batch of step k is sampled by the policy after step k - s (or the first), so
    the rollouts of the next s steps are made while this one trains; 0 = on-policy. With s > 0
    use loss.rollout_correction (the engine's log-probs are the behaviour policy)."""
    partial: bool = False
    """max_staleness >= 1: a weight transfer interrupts generation and the responses still
    running continue under the new weights from where they stopped (partial rollouts): a batch
    is started by the policy max_staleness versions behind and finished by the next one, each
    token tagged with the version that sampled it. Where the interruption falls is fixed by
    ``partial_tokens``, not by timing, so runs and resumes stay exact."""
    partial_tokens: int = 0
    """partial: response tokens sampled before the transfer interrupts (0 = half of
    max_new_tokens)."""
    partial_turns: int = 0
    """partial with multi-turn episodes (agent.environment): the turns of every episode sampled
    before the transfer interrupts, the rest under the next version (0 = half of
    agent.max_turns, at least 1). The environments are rebuilt by replaying their calls."""
    max_token_age: int = -1
    """Mask out of the loss every response token sampled by a policy more than this many
    versions behind the step that trains on it (it still conditions the tokens after it);
    -1 = off. With partial rollouts, e.g. max_staleness=2 and max_token_age=1 trains only on
    what the newer policy sampled."""

    def validate(self, world_size: int) -> None:
        """Every value, and the placement against the launch's ``world_size`` ranks."""
        self.validate_values()
        if self.placement == "colocated" and self.num_ranks:
            raise GspoError(
                f"rollout.num_ranks={self.num_ranks} with rollout.placement=colocated: the "
                f"engines run in every training rank; use placement=separate or num_ranks=0"
            )
        engine_ranks = self.num_ranks if self.placement == "separate" else world_size
        if self.placement == "separate" and world_size < 2:
            raise GspoError(
                f"rollout.placement=separate needs a launch of at least 2 ranks (some train, "
                f"rollout.num_ranks={self.num_ranks} sample), not {world_size}: start gspo-train "
                f"with torchrun --nproc-per-node >= 2, or use rollout.placement=colocated"
            )
        if self.placement == "separate" and not 1 <= self.num_ranks < world_size:
            raise GspoError(
                f"rollout.num_ranks={self.num_ranks}: placement=separate needs between 1 and "
                f"{world_size - 1} rollout ranks of the {world_size} launched (some must train)"
            )
        if engine_ranks % self.engine_tp:
            where = "rollout.num_ranks" if self.placement == "separate" else "the world size"
            raise GspoError(
                f"rollout.engine_tp={self.engine_tp}: must divide {where} {engine_ranks}"
            )

    def trainer_ranks(self, world_size: int) -> int:
        """Ranks of a ``world_size`` launch that train."""
        return world_size - self.num_ranks if self.placement == "separate" else world_size

    def validate_values(self) -> None:
        """Every value on its own (an engine checks these: its world is the placement's)."""

        def bad(field: str, why: str) -> GspoError:
            return GspoError(f"rollout.{field}={getattr(self, field)!r}: {why}")

        if self.group_size < 1:
            raise bad("group_size", "must be >= 1 (GSPO needs >= 2 to have advantages)")
        if self.group_size > max_samples_per_prompt():
            raise bad(
                "group_size",
                f"vLLM samples at most {max_samples_per_prompt()} responses per prompt "
                f"(VLLM_MAX_N_SEQUENCES)",
            )
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        for name in ("max_prompt_tokens", "max_new_tokens", "sync_bucket_mb"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.engine_tp < 1:
            raise bad("engine_tp", "must be >= 1")
        if self.dtype not in ENGINE_DTYPES:
            raise bad("dtype", f"allowed: {', '.join(ENGINE_DTYPES)}")
        if self.placement not in ("colocated", "separate"):
            raise bad("placement", "allowed: colocated, separate")
        if not self.start_timeout_s > 0:
            raise bad("start_timeout_s", "must be > 0")
        if self.num_ranks < 0:
            raise bad("num_ranks", "must be >= 0 (0 with placement=colocated)")
        if self.max_staleness < 0:
            raise bad("max_staleness", "must be >= 0 (0 = every batch from the newest policy)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if not self.kv_cache_gib > 0:
            raise bad("kv_cache_gib", "must be > 0")
        if self.max_sampling_rounds < 1:
            raise bad("max_sampling_rounds", "must be >= 1 (1 = no extra rounds)")
        if self.capture_routes not in ("auto", "always", "never"):
            raise bad("capture_routes", "allowed: auto, always, never")
        if self.max_token_age < -1:
            raise bad("max_token_age", "must be >= 0, or -1 (off)")
        if self.partial_tokens < 0 or self.partial_tokens >= self.max_new_tokens:
            raise bad(
                "partial_tokens",
                f"must be in [1, rollout.max_new_tokens={self.max_new_tokens}) (0 = half of it)",
            )
        if self.partial and self.max_staleness < 1:
            raise GspoError(
                "rollout.partial=true with rollout.max_staleness=0: no transfer lands while a "
                "batch is sampled (each batch uses the weights it trains from); use "
                "max_staleness >= 1 or partial=false"
            )
        if self.partial_turns < 0:
            raise bad("partial_turns", "must be >= 0 (0 = half of agent.max_turns)")
        if self.partial and self.max_new_tokens < 2:
            raise bad("max_new_tokens", "rollout.partial needs >= 2 (a head and a tail)")

    @property
    def max_model_len(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens

    def head_turns(self, max_turns: int) -> int:
        """partial with episodes: the turns of an episode sampled before the interruption."""
        return self.partial_turns or max(max_turns // 2, 1)

    @property
    def head_tokens(self) -> int:
        """partial: the tokens of a response sampled before the interruption."""
        return self.partial_tokens or self.max_new_tokens // 2


def max_samples_per_prompt() -> int:
    """The most responses vLLM samples for one prompt (SamplingParams.n): its
    VLLM_MAX_N_SEQUENCES, read the way vllm.envs reads it (default 16384 in vLLM 0.32), without
    importing vLLM (seconds) into the checks that must answer at once. A larger n would fail
    only after the engine has loaded the model."""
    return int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
