"""gspo-train's pre-flight: every check on the run's inputs, before any heavy work.

Runs in every process (and once per node in the launch scripts, before torchrun starts), with no
process group, model or engine in existence: config keys and values, the model checkpoint
(complete on disk, as its metadata says), the layout against the model and the world size, batch
sizes, the tokenizer, every prompt row, the output directory (writable, room for a checkpoint,
not already holding a run unless resuming) and the checkpoint a resume would continue from. Each
problem is one ``GspoError`` line; gspo-train turns it into exit status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import torch

from gspo_megatron.checkpoint.atomic import check_free_space, check_writable_dir
from gspo_megatron.checkpoint.model import HF_SUBDIR, checkpoint_spec
from gspo_megatron.checkpoint.run_dir import (
    CHECKPOINTS,
    estimate_checkpoint_bytes,
    read_trainer_state,
    resume_point,
)
from gspo_megatron.config import Config
from gspo_megatron.config.resume import Change, resume_changes
from gspo_megatron.data import PromptSet, load_prompts
from gspo_megatron.distributed.parallel import check_layout
from gspo_megatron.errors import GspoError
from gspo_megatron.models import ModelSpec, check_same_shapes
from gspo_megatron.rewards.builtin import NEEDS_ANSWER
from gspo_megatron.rewards.runner import RewardConfig
from gspo_megatron.rollout.engines.routes import capture_unavailable
from gspo_megatron.rollout.machine import check_kv_caches, machine_envs
from gspo_megatron.run_lock import check_run_lock

if TYPE_CHECKING:  # transformers stays out of the import until the tokenizer is loaded
    from transformers import PreTrainedTokenizerBase


@dataclass
class Plan:
    """What the pre-flight established, for the Trainer."""

    cfg: Config
    spec: ModelSpec
    """The model, from model.ckpt's hf/config.json."""
    prompts: PromptSet
    """Every prompt row, tokenised and checked."""
    tokenizer: "PreTrainedTokenizerBase"
    """The checkpoint's tokenizer (decodes responses for the rewards)."""
    resume_from: Optional[Path]
    """The checkpoint to continue from (None: a fresh start)."""
    dp: int
    """Data-parallel ranks."""
    checkpoint_bytes: int
    """Estimated size of one training checkpoint (checked against free space before saves)."""
    capture_routes: bool = False
    """Whether the engine records its MoE routes (rollout/route_agreement, r3)."""
    eval_prompts: Optional[PromptSet] = None
    """data.eval_path's prompts, in file order, when validation is on (train.eval_every)."""
    resume_changes: List[Change] = field(default_factory=list)
    """The config keys a resume changes (``gspo_megatron.config.resume``), applied from its next step."""
    steps_done: int = 0
    """Steps the checkpoint resumed from has done (train.steps of them: the run is complete)."""


def preflight(
    cfg: Config, world_size: int, resume: bool = False, resume_from: Optional[Path] = None
) -> Plan:
    cfg.validate(world_size)
    world_size = cfg.rollout.trainer_ranks(world_size)  # separate rollout ranks do not train
    spec = checkpoint_spec(Path(cfg.model.ckpt))
    check_layout(cfg.parallel, spec, world_size)
    if cfg.loss.routing_replay != "none" and not spec.is_moe:
        raise GspoError(
            f"loss.routing_replay={cfg.loss.routing_replay}: {cfg.model.ckpt} is a dense model "
            f"(no routed experts to replay); use loss.routing_replay=none"
        )
    capture_routes = spec.is_moe and cfg.capture_routes(torch.cuda.is_available())
    why_not = capture_unavailable() if capture_routes else None
    if why_not is not None:
        if cfg.loss.routing_replay == "r3" or cfg.rollout.capture_routes == "always":
            setting = (
                "loss.routing_replay=r3"
                if cfg.loss.routing_replay == "r3"
                else "rollout.capture_routes=always"
            )
            raise GspoError(f"{setting} needs the engine's routes, but {why_not}")
        capture_routes = False  # auto: rollout/route_agreement is simply not measured
    layout = cfg.parallel
    dp = world_size // (layout.tp * layout.pp * layout.cp)
    samples = cfg.train.prompts_per_step * cfg.rollout.group_size
    if samples % (dp * cfg.loss.num_minibatches):
        raise GspoError(
            f"train.prompts_per_step x rollout.group_size = {samples} samples do not "
            f"split over {dp} data-parallel ranks x loss.num_minibatches="
            f"{cfg.loss.num_minibatches}"
        )
    if cfg.rollout.max_model_len > spec.max_position_embeddings:
        raise GspoError(
            f"rollout.max_prompt_tokens + rollout.max_new_tokens = "
            f"{cfg.rollout.max_model_len} exceeds the model's max_position_embeddings="
            f"{spec.max_position_embeddings}"
        )
    if not torch.cuda.is_available():  # (on GPU the engines' caches are device memory)
        check_kv_caches(cfg.rollout)
    if cfg.agent.enabled:
        machine_envs(cfg.agent)
    tokenizer = load_tokenizer(Path(cfg.model.ckpt) / HF_SUBDIR)
    needs_answer = reward_needing_answers(cfg.rewards, cfg.data.answer_field)
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        cfg.rollout.max_prompt_tokens,
        spec.vocab_size,
        require_answers=needs_answer,
    )
    if cfg.agent.enabled:
        check_agent(cfg, tokenizer, Path(cfg.model.ckpt) / HF_SUBDIR, prompts.prompts[0].fields)
    eval_prompts = None
    if cfg.train.eval_every:
        eval_prompts = load_prompts(
            replace(cfg.data, path=cfg.data.eval_path, shuffle=False),
            tokenizer,
            cfg.rollout.max_prompt_tokens,
            spec.vocab_size,
            require_answers=needs_answer,
        )
        if not eval_prompts.prompts:
            raise GspoError(
                f"data.eval_path={cfg.data.eval_path}: no prompt fits in "
                f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}"
            )
    out = Path(cfg.train.output_dir)
    check_writable_dir(out, "train.output_dir")
    check_run_lock(out)  # before resume_point: another run's checkpoints are not ours to resume
    start = resume_point(
        out / CHECKPOINTS, resume or resume_from is not None, resume_from, cfg.train.output_dir
    )
    changes = []
    if start is not None:  # the run's weights must fit the model being built
        check_same_shapes(spec, checkpoint_spec(start), f"{start} (vs model.ckpt={cfg.model.ckpt})")
        changes = resume_changes(cfg, start)
    steps_done = int(read_trainer_state(start).get("step", 0)) if start is not None else 0
    staleness, left = cfg.rollout.max_staleness, cfg.train.steps - steps_done
    if 0 < left <= staleness and _first_rank():
        print(
            f"note: rollout.max_staleness={staleness} reaches past the {left} step(s) this run "
            f"takes: every batch of it is sampled by the policy it starts from (batch j by "
            f"version max(j - {staleness}, {steps_done})); lower it for batches from newer ones",
            file=sys.stderr,
            flush=True,
        )
    checkpoint_bytes = estimate_checkpoint_bytes(
        spec, cfg.model.dtype, Path(cfg.model.ckpt) / HF_SUBDIR
    )
    check_free_space(out, checkpoint_bytes, "a training checkpoint (model + optimizer state)")
    return Plan(
        cfg,
        spec,
        prompts,
        tokenizer,
        start,
        dp,
        checkpoint_bytes,
        capture_routes,
        eval_prompts,
        changes,
        steps_done,
    )


def load_tokenizer(hf_dir: Path):
    """The checkpoint's tokenizer, refused when it cannot be what the model was trained with."""
    from transformers import AutoTokenizer  # only here: the other checks answer faster without it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as err:
        raise GspoError(
            f"{hf_dir}: no usable tokenizer in the checkpoint's hf/ directory "
            f"(convert from an HF directory that has one) [{err}]"
        ) from None
    # transformers builds an empty tokenizer (a vocabulary of one token) from a config.json
    # alone instead of failing: every prompt would then encode to nothing.
    if len(tokenizer) < 2:
        raise GspoError(
            f"{hf_dir}: no usable tokenizer (a vocabulary of {len(tokenizer)} token; "
            f"tokenizer.json or vocab.json + merges.txt are missing): convert from an "
            f"HF directory that has its tokenizer files, or copy them into {hf_dir}"
        )
    return tokenizer


def check_agent(cfg: Config, tokenizer, hf_dir: Path, first_row: Optional[dict] = None) -> None:
    """Multi-turn episodes: the environment class imports, has the contract's methods and is
    made from the first data row (tried in a child process); the tokenizer has a prefix-stable
    chat template, the end-of-turn token and the tool-call tags."""
    from gspo_megatron.rollout.episodes.agent_config import end_of_turn_id
    from gspo_megatron.rollout.episodes.env_pool import check_environment
    from gspo_megatron.rollout.episodes.tool_calls import CLOSE, OPEN
    from gspo_megatron.rollout.episodes.transcript import ChatRenderer

    say = (lambda line: print(line, file=sys.stderr, flush=True)) if _first_rank() else None
    check_environment(cfg.agent.environment, first_row, cfg.agent.env_start_timeout_s, say)
    eot = end_of_turn_id(tokenizer)
    if eot is None:
        raise GspoError(
            f"{hf_dir}: the tokenizer has no end-of-turn token (<|im_end|> or an EOS) to end "
            f"assistant turns with (agent.environment)"
        )
    vocab = tokenizer.get_vocab()
    if cfg.agent.tool_call_format == "qwen3" and not (OPEN in vocab and CLOSE in vocab):
        raise GspoError(
            f"{hf_dir}: agent.tool_call_format=qwen3 writes tool calls between {OPEN} and "
            f"{CLOSE}, which this tokenizer has no tokens for (not a Qwen3 chat tokenizer)"
        )
    renderer = ChatRenderer(tokenizer, eot)
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    try:
        renderer.opening(probe[:1], None)
        renderer.environment(probe, [{"role": "tool", "content": "3"}], None)
    except GspoError as err:
        raise GspoError(f"{hf_dir}: {err}") from None
    except Exception as err:  # the template's own Jinja errors
        raise GspoError(
            f"{hf_dir}: the chat template fails on a user/assistant/tool conversation "
            f"({type(err).__name__}: {err})"
        ) from None


def reward_needing_answers(
    rewards: RewardConfig,
    answer_field: str,
    where: str = "rewards.functions",
    setting: str = "data.answer_field",
) -> str:
    """The first built-in reward that compares with the reference answer ('' if none): every
    call would fail without one, so an empty answer field is refused (``where`` names the
    rewards and ``setting`` the field as the user gave them: config keys, or gspo-eval's flags)."""
    needing = [f.name for f in rewards.functions if f.name in NEEDS_ANSWER and f.weight]
    if needing and not answer_field:
        raise GspoError(
            f"{where}: {needing[0]} compares with a reference answer but {setting} is empty; "
            f"name the answer column"
        )
    return needing[0] if needing else ""


def _first_rank() -> bool:
    """Whether this process speaks for the run (rank 0, or no launch at all)."""
    return os.environ.get("RANK", "0") == "0"
