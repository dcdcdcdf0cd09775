"""gspo-train: GSPO reinforcement learning of a Qwen3(-MoE) policy on megatron-core.

    gspo-train --config launch/configs/tiny_cpu.yaml [--resume] [section.key=value ...]
    torchrun --nproc-per-node 8 -m gspo_megatron.train --config ... [overrides]

Each step: weight sync into vLLM -> the step's prompts -> G responses each from the colocated
vLLM engines -> rewards -> group-normalised advantages -> pi_old log-probs ->
``loss.num_minibatches`` GSPO optimizer steps -> metrics -> a checkpoint every
``train.save_every`` steps. (The sync of step k+1 carries step k's update; doing it just before
sampling lets the engine sleep with its memory freed while the trainer works.)

Everything that can be wrong with the input (config keys and types, files, data fields, reward
functions, the layout against the model and the world size, an output directory holding another
run) is checked first, in every process, before torch.distributed or any model exists
(``gspo_megatron.preflight``; ``--check`` runs only that). During the run nothing non-finite
reaches the weights: rewards are finite by construction (``rewards.runner``), an optimizer step
with a non-finite loss or gradient is skipped (``update.train_step``), and
``train.max_skipped_steps`` of them in a row stop the run with the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gspo_megatron.checkpoint.atomic import atomic_write_text
from gspo_megatron.checkpoint.mcore_to_hf import convert_mcore_to_hf
from gspo_megatron.checkpoint.model import HF_SUBDIR, load_model_checkpoint
from gspo_megatron.checkpoint.optimizer_state import DP_RESHARDABLE, RESHARDABLE
from gspo_megatron.checkpoint.run_dir import (
    CHECKPOINTS,
    TrainState,
    last_complete_note,
    latest_checkpoint,
    set_aside_newer,
)
from gspo_megatron.checkpoint.training import load_checkpoint, save_checkpoint
from gspo_megatron.config import Config, load_config
from gspo_megatron.config.resume import config_text, record_config
from gspo_megatron.distributed.ddp import wrap_for_training
from gspo_megatron.distributed.parallel import init_distributed, world_size_from_env
from gspo_megatron.errors import GspoError, TrainingStopped, exit_on_error
from gspo_megatron.learner.optim import build_optimizer, build_scheduler
from gspo_megatron.learner.step_samples import (
    sampled_ages,
    staleness_metrics,
    step_samples,
    token_ages,
)
from gspo_megatron.loss.advantages import equal_reward_groups, reward_mean_std
from gspo_megatron.preflight import Plan, preflight
from gspo_megatron.procutil import exit_without_teardown
from gspo_megatron.progress import progress_bar
from gspo_megatron.rewards.runner import RewardRunner
from gspo_megatron.rollout.episodes.loop import FailureWatch
from gspo_megatron.rollout.separate.placement import enter_role, role_of
from gspo_megatron.rollout.source import (
    QUEUE_FILE,
    ColocatedSource,
    Producer,
    Schedule,
    SeparateSource,
    dump_queue,
    load_queue,
)
from gspo_megatron.run_lock import RunLock


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gspo-train", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config", type=Path, required=True, help="YAML config (launch/configs/*.yaml)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from train.output_dir's newest complete checkpoint (a fresh "
        "start if there is none)",
    )
    ap.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue from this checkpoint (e.g. an older one when the newest is "
        "damaged); newer checkpoints of the run are renamed *.abandoned",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="run the pre-flight checks only (config, files, data, layout for "
        "WORLD_SIZE ranks, output directory) and exit",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, values parsed as YAML (e.g. train.steps=20)",
    )
    return ap.parse_args(argv)


class SkipGuard:
    """Counts optimizer steps skipped in a row (non-finite loss or gradient norm) and stops the
    run at ``limit``: a run that keeps producing NaN must end, not spin on unchanged weights."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def update(self, skipped: Sequence[bool], step: int, last_checkpoint: str) -> None:
        for s in skipped:
            self.in_a_row = self.in_a_row + 1 if s else 0
            if self.in_a_row >= self.limit:
                raise TrainingStopped(
                    f"{self.in_a_row} optimizer steps in a row were skipped for a non-finite loss "
                    f"or gradient norm (last in step {step}); {last_checkpoint}. Lower optim.lr, "
                    f"check rewards and data, or raise train.max_skipped_steps"
                )


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _dtype(cfg: Config):
    """The trainer's parameters: model.dtype (auto: bf16 on GPU, fp32 on CPU)."""
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[cfg.model.dtype]


def engine_dtype(cfg: Config):
    """The rollout engines' precision: rollout.dtype (auto: the trainer's)."""
    return _dtype(cfg) if cfg.rollout.dtype == "auto" else DTYPES[cfg.rollout.dtype]


class Trainer:
    """The heavy half: process groups, model, optimizer, engine; then the loop."""

    def __init__(self, plan: Plan, role=None, link=None):
        """``role`` and ``link`` (``rollout.placement``): a training rank of a launch whose
        engines run on separate rollout ranks; None for colocated engines."""
        # The heavy modules (megatron, vLLM, TensorBoard) are imported here, not at the top: the
        # pre-flight, and gspo-train --check, must answer bad input without seconds of imports.
        from megatron.core import parallel_state as ps

        from gspo_megatron.checkpoint.async_save import AsyncSaver
        from gspo_megatron.learner.reference import build_reference
        from gspo_megatron.learner.route_change import RouteChangeMeter
        from gspo_megatron.learner.routing_replay import RoutingReplay
        from gspo_megatron.metrics import MetricsLogger
        from gspo_megatron.models import build_model
        from gspo_megatron.rollout.engines.engine import RolloutEngine
        from gspo_megatron.rollout.engines.weight_sync import WeightGatherer

        cfg = self.cfg = plan.cfg
        self.plan, self.spec = plan, plan.spec
        self.out = Path(cfg.train.output_dir)
        init_distributed(
            cfg.parallel, seed=cfg.train.seed, timeout_s=cfg.train.collective_timeout_s
        )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        dtype = _dtype(cfg)
        model = build_model(plan.spec, cfg.parallel, dtype, cfg.model.moe_aux_loss_coeff)
        load_model_checkpoint(model, Path(cfg.model.ckpt), plan.spec)
        self.model = wrap_for_training(
            model,
            cfg.optim.use_distributed_optimizer,
            cfg.optim.overlap_grad_reduce,
            cfg.optim.grad_bucket_elements,
        )
        # The KL penalty's reference: the initial policy, frozen (a resumed run rebuilds it
        # from the same checkpoint). Built only when the penalty is on.
        self.ref_model = (
            build_reference(plan.spec, cfg.parallel, dtype, Path(cfg.model.ckpt))
            if cfg.loss.kl_coef
            else None
        )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.optim, cfg.train.steps * cfg.loss.num_minibatches
        )
        self.hf_dir = Path(cfg.model.ckpt) / HF_SUBDIR
        self.engine = self.agent = None
        if role is None:
            # The engine starts from random weights and receives the trainer's: no second read
            # of the checkpoint, and a resumed run's engine gets the resumed weights the same way.
            self.engine = RolloutEngine(
                self.hf_dir,
                cfg.rollout,
                engine_dtype(cfg),
                dummy_weights=True,
                capture_routes=plan.capture_routes,
            )
            if cfg.agent.enabled:
                from gspo_megatron.rollout.episodes.loop import make_runner

                self.agent = make_runner(cfg.agent, cfg.rollout, plan.tokenizer, self.engine)
            note = self.engine.waves_note(cfg.train.prompts_per_step)
            if note:
                self._say(note)
        self.state = TrainState()
        if plan.resume_from is not None and self.rank == 0:
            for path in set_aside_newer(self.out / CHECKPOINTS, plan.resume_from):
                self._say(f"set aside {path} (newer than the checkpoint resumed from)")
        if plan.resume_from is not None:
            # After the engine start: vLLM reseeds the global generators, the checkpoint's RNG
            # state must win.
            self.state = load_checkpoint(
                plan.resume_from, self.model, self.optimizer, self.scheduler
            )
            self._say(f"resumed from {plan.resume_from} (step {self.state.step})")
        else:
            torch.manual_seed(cfg.train.seed + self.rank)
        self.route_meter = RouteChangeMeter(self.model) if plan.spec.is_moe else None
        if plan.spec.is_moe:  # route agreement with the engine, and replay when asked for
            RoutingReplay(self.model, cfg.loss.routing_replay)
        # What the engines hold: every sync and transfer casts to their precision.
        self.gatherer = WeightGatherer(
            self.model, plan.spec, cfg.rollout.sync_bucket_mb << 20, engine_dtype(cfg)
        )
        self.rewards = self.source = None
        self.first_transfer: Dict[str, float] = {}  # separate: the start's, logged with step 1
        queue = self._resumed_queue()
        rc = cfg.rollout
        schedule = Schedule(rc.max_staleness, cfg.train.steps, self.state.step, rc.partial)
        if role is None:
            # GPU: free the engine's memory until the first step's sync brings the weights in.
            self.engine.sleep()
            self.rewards = RewardRunner(cfg.rewards)
            producer = Producer(
                cfg, plan.prompts, plan.tokenizer, self.engine, self.agent, self.rewards
            )
            self.source = ColocatedSource(
                producer,
                self.engine,
                self.gatherer,
                schedule,
                queue,
                self._validate,
                cfg.train.eval_every,
            )
        else:
            self.source = SeparateSource(role, link, self.gatherer, cfg, schedule, queue)
            self.first_transfer = self.source.start(self.state.step)
        self.reward_error_shown = self.silent_groups_shown = False
        self.skips = SkipGuard(cfg.train.max_skipped_steps)
        self.failures = None
        if cfg.agent.enabled:
            self.failures = FailureWatch(
                cfg.agent.environment, cfg.agent.max_failed_steps, self._say
            )
        self.metrics = MetricsLogger(self.out, self.state.step)
        self.saver = AsyncSaver() if cfg.train.async_save else None
        self.config_text = config_text(cfg)
        for change in plan.resume_changes:
            self._say(f"resume: {change} (applies from step {self.state.step + 1})")
        if self.rank == 0:
            record_config(self.out, self.config_text, plan.resume_changes, self.state.step)

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    # -- one step ------------------------------------------------------------------------------

    def step(self, step: int) -> Tuple[Dict[str, float], List[bool]]:
        """One RL step; returns its metrics and, per optimizer step, whether it was skipped."""
        from gspo_megatron.learner.update import policy_update  # megatron: see __init__

        cfg, t0 = self.cfg, time.perf_counter()
        # This step's batch (colocated: the weights synced into the engines, validation, the
        # batches up to step + max_staleness sampled; separate: received from the rollout ranks).
        rollout, source_metrics = self.source.take(step)
        staleness = step - rollout.version  # of its oldest tokens
        stale = staleness > cfg.rollout.max_staleness  # only after a resume lowered the bound
        ages = token_ages(rollout, step)
        if not rollout.sampled_groups:
            raise GspoError(f"step {step + 1}: every prompt was skipped by the rollout engine")
        if self.failures is not None:
            self.failures.observe(rollout, step, lambda: last_complete_note(self.out / CHECKPOINTS))
        if rollout.first_error is not None and not self.reward_error_shown:
            # Once per run: reward/errors and reward/timeouts count them all; a broken reward
            # function must not drown the progress bar.
            self.reward_error_shown = True
            self._say(
                f"reward function failed (scored 0 and counted in reward/errors or "
                f"reward/timeouts; only the first failure is shown): {rollout.first_error}"
            )
        g_size = cfg.rollout.group_size
        made = step_samples(rollout, ages, g_size, cfg.rollout.max_token_age)
        samples, pairs, adv, silent = made.samples, made.pairs, made.advantages, made.silent_groups
        if silent and not self.silent_groups_shown:
            self.silent_groups_shown = True  # once per run; reward/zero_advantage_groups counts
            self._say(
                f"step {step + 1}: {silent} group(s) of different rewards got advantage 0 for "
                f"every response: their rewards differ by far less than the advantage's eps "
                f"(1e-6), so nothing is learned from them; scale the rewards up (counted in "
                f"reward/zero_advantage_groups)"
            )
        if cfg.train.save_rollouts and self.rank == 0:
            self._save_rollouts(step, pairs, made.rewards, adv)
        # Every data-parallel rank must get the same number of samples, splitting into the
        # minibatches; a prompt the engine skipped, or dynamic sampling ending short of
        # train.prompts_per_step, can break that: the remainder is dropped and counted.
        dropped = len(samples) % (self.dp * cfg.loss.num_minibatches)
        samples = samples[: len(samples) - dropped]
        dropped_stale = len(samples) if stale else 0
        if stale:
            samples = []
        t_rollout = time.perf_counter()
        update = None
        if samples:
            update = policy_update(
                self.model,
                self.optimizer,
                samples[self.dp_rank :: self.dp],
                cfg.loss,
                self.spec.vocab_size,
                scheduler=self.scheduler,
                moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
                route_meter=self.route_meter,
                ref_model=self.ref_model,
            )
        elif stale:
            self._say(
                f"step {step + 1}: its batch was sampled by the policy of step {rollout.version}, "
                f"{staleness} versions old, beyond rollout.max_staleness="
                f"{cfg.rollout.max_staleness}; not trained on (rollout/dropped_stale)"
            )
        else:  # dynamic sampling found too few informative groups: nothing to learn from
            self._say(
                f"step {step + 1}: no informative group to train on (every group's rewards were "
                f"equal); the update is skipped"
            )
        published = self.source.publish(step)  # separate: the next weights to the rollout ranks
        r = torch.tensor(rollout.sampled_rewards, dtype=torch.float64)
        mean, std = reward_mean_std(r)
        out = {
            "reward/mean": mean,
            "reward/std": std,
            "reward/zero_std_groups": float(equal_reward_groups(r, g_size).float().mean()),
            "reward/zero_advantage_groups": float(silent),
            **rollout.stats,
            **(update.metrics if update is not None else {"train/sequences": 0.0}),
            **source_metrics,
            **published,
            **self.plan.prompts.stats,
            "rollout/dropped_samples": float(dropped),
            "rollout/policy_version": float(rollout.version),
            **staleness_metrics(sampled_ages(rollout, ages), cfg.rollout),
            "rollout/dropped_stale": float(dropped_stale),
        }
        out.update(self.first_transfer)
        self.first_transfer = {}
        seconds = time.perf_counter() - t0
        out["perf/step_seconds"] = seconds
        out["perf/tokens_per_second"] = rollout.num_tokens / seconds
        out["perf/rollout_share"] = (t_rollout - t0) / seconds
        return out, update.skipped if update is not None else []

    def _validate(self) -> Dict[str, float]:
        """The held-out prompts on the engines, which hold the policy just synced (gspo-eval's
        sampling and seeds: gspo-eval on the same checkpoint gives these figures)."""
        from gspo_megatron.evaluate import groups_of, sample_and_score, summarize_rows

        cfg, t0 = self.cfg.train, time.perf_counter()
        rows = sample_and_score(
            groups_of(self.engine, self.agent),
            self.rewards.score_across_ranks,
            lambda ids: self.plan.tokenizer.decode(ids, skip_special_tokens=True),
            self.plan.eval_prompts.prompts,
            cfg.eval_k,
        )
        summary = summarize_rows(rows, cfg.eval_k, cfg.eval_pass_threshold)
        out = {f"eval/{k}": v for k, v in summary.items() if k != "samples_per_prompt"}
        out["perf/eval_seconds"] = time.perf_counter() - t0
        return out

    def _resumed_queue(self):
        """The batches a resumed run's checkpoint had sampled ahead (max_staleness > 0)."""
        if self.plan.resume_from is None:
            return {}
        path = Path(self.plan.resume_from) / QUEUE_FILE
        return load_queue(path.read_bytes()) if path.is_file() else {}

    def _save_rollouts(self, step: int, pairs, rewards, advantages) -> None:
        decode = self.plan.tokenizer.decode
        rows = [
            {
                "step": step + 1,
                "row": p.row,
                "prompt": p.text,
                "answer": p.answer,
                "response": decode(c.token_ids, skip_special_tokens=True),
                "reward": r,
                "advantage": a,
                **({} if c.agent is None else episode_row(c)),
                **({} if c.versions is None else partial_row(p, c)),
            }
            for (p, c), r, a in zip(pairs, rewards, advantages)
        ]
        (self.out / "rollouts").mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.out / "rollouts" / f"step_{step + 1:06d}.jsonl",
            "".join(json.dumps(row) + "\n" for row in rows),
        )

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        root = self.out / CHECKPOINTS
        with progress_bar(total=cfg.train.steps, desc="gspo", unit="step") as bar:
            bar.update(self.state.step)
            for step in range(self.state.step, cfg.train.steps):
                metrics, skipped = self.step(step)
                if self.saver is not None:  # the previous step's checkpoint, if written by now
                    self.saver.poll()
                self.state.step = step + 1
                self.metrics.log(self.state.step, metrics)
                self.skips.update(skipped, self.state.step, last_complete_note(root))
                bar.set_postfix(
                    reward=f"{metrics['reward/mean']:.3f}",
                    clip=f"{metrics.get('gspo/clip_fraction', 0):.3f}",
                )
                bar.update(1)
                last = self.state.step == cfg.train.steps
                if last or (cfg.train.save_every and self.state.step % cfg.train.save_every == 0):
                    save_checkpoint(
                        root,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        self.state,
                        self.hf_dir,
                        cfg.train.keep_checkpoints,
                        needed_bytes=self.plan.checkpoint_bytes,
                        saver=self.saver,
                        optimizer_format=(
                            RESHARDABLE if cfg.train.reshardable_checkpoints else DP_RESHARDABLE
                        ),
                        config_text=self.config_text,
                        extra_files=(
                            {QUEUE_FILE: dump_queue(self.source.queue)} if self.source.queue else {}
                        ),
                    )
        if self.saver is not None:
            self.saver.finish()
        if cfg.train.export_hf:
            self._export(root)

    def _export(self, root: Path) -> None:
        # Rank 0 converts alone, which for a large model takes longer than any collective
        # should (train.collective_timeout_s): the others wait on a group of their own. If rank
        # 0 fails, its closed connection ends their wait at once.
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        if self.rank == 0:
            convert_mcore_to_hf(
                latest_checkpoint(root), self.out / "hf", overwrite=True, show_progress=False
            )
            self._say(f"exported the final policy to {self.out / 'hf'}")
        dist.barrier(group=wait_group)

    def close(self, engine: bool = True) -> None:
        saver = getattr(self, "saver", None)
        if saver is not None and saver.in_flight:  # only when the run failed: never completed
            saver.abort()
        if getattr(self, "agent", None) is not None:
            self.agent.envs.close()
        for part in ("rewards", "metrics"):
            obj = getattr(self, part, None)  # (no reward runner here with separate rollouts)
            if obj is not None:
                obj.close()
        # vLLM's teardown destroys the shared process groups: last.
        if engine and getattr(self, "engine", None) is not None:
            self.engine.close()


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    # vLLM's per-step warnings (thread binding, rotary "weights" on every sync) drown the
    # progress bar; errors still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    plan = preflight(cfg, world_size_from_env(), args.resume, args.resume_from)
    if plan.resume_from is not None and plan.steps_done == cfg.train.steps:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"gspo-train: the run is complete: {plan.resume_from} is step {plan.steps_done} "
                f"of train.steps={cfg.train.steps}; nothing to do (raise train.steps to go on)",
                file=sys.stderr,
            )
        return
    if args.check:
        start = f"resume from {plan.resume_from}" if plan.resume_from else "a fresh start"
        for change in plan.resume_changes:
            print(f"resume: {change}", file=sys.stderr)
        print(
            f"gspo-train --check: {args.config} is ready for {world_size_from_env()} rank(s) "
            f"({len(plan.prompts.prompts)} prompts, {start})",
            file=sys.stderr,
        )
        return
    role = role_of(cfg.rollout)  # separate rollout ranks: which side this process is on
    if role is not None and role.kind == "rollout":
        return serve_rollouts(plan, role)
    lock = None
    if os.environ.get("RANK", "0") == "0":  # the process that writes the shared files
        lock = RunLock(Path(cfg.train.output_dir))
        lock.acquire()
    trainer = link = None
    try:
        if role is not None:
            link = enter_role(role, cfg.train.collective_timeout_s)
        trainer = Trainer(plan, role, link)
        trainer.run()
    except Exception as err:
        if trainer is not None:
            trainer.close(engine=False)  # the engine's teardown may wait on ranks that are gone
        if link is not None and trainer is None:  # the rollout ranks wait for our start
            link.ready(failure=f"the trainer: {' '.join(str(err).split())}"[:400])
        why = collective_failure(err, cfg.train.collective_timeout_s, role)
        if why is None:
            raise
        last = last_complete_note(Path(cfg.train.output_dir) / CHECKPOINTS)
        raise TrainingStopped(f"{why}; {last}") from None
    except BaseException:  # Ctrl-C or SIGTERM: every rank is stopping at once
        if trainer is not None:
            trainer.close(engine=False)
        raise
    else:
        trainer.close()
    finally:
        if lock is not None:
            lock.release()


def cli() -> None:
    """gspo-train: ``main``, then a quick exit after a finished run."""
    main()
    exit_without_teardown()


def partial_row(p, c) -> dict:
    """A partial rollout's response for train.save_rollouts: its ids, each token's behaviour
    log-prob and the policy version that sampled it."""
    return {
        "prompt_ids": p.ids if c.prompt_ids is None else c.prompt_ids,
        "ids": c.token_ids,
        "logprobs": c.logprobs,
        "versions": c.versions,
    }


def episode_row(c) -> dict:
    """A multi-turn episode's record for train.save_rollouts: its messages, its ids (opening,
    then the rest) with their mask, and what happened."""
    rec = c.agent
    return {
        "messages": rec.messages,
        "prompt_ids": c.prompt_ids,
        "ids": c.token_ids,
        "mask": c.loss_mask,
        "turns": rec.turns,
        "tool_calls": rec.tool_calls,
        "malformed_calls": rec.malformed_calls,
        "env_reward": rec.env_reward,
        "failure": rec.failure,
        "failure_detail": rec.failure_detail,
        "truncated": rec.truncated,
        "metadata": rec.metadata,
    }


def serve_rollouts(plan: Plan, role) -> None:
    """A rollout rank of ``rollout.placement: separate``: vLLM engines only, until the run's last
    batch is sent; a trainer that ends first (or dies) ends this rank too, in one line."""
    from gspo_megatron.rollout.separate.link import LinkError
    from gspo_megatron.rollout.separate.placement import LinkStartError
    from gspo_megatron.rollout.separate.rollout_rank import serve

    cfg = plan.cfg
    try:
        serve(plan, role, enter_role(role, cfg.train.collective_timeout_s), engine_dtype(cfg))
    except LinkStartError as err:
        raise TrainingStopped(f"rollout rank {role.launch_rank}: {err}") from None
    except LinkError as err:
        raise TrainingStopped(
            f"rollout rank {role.launch_rank}: the trainer (ranks 0..{role.trainers - 1} of the "
            f"launch) stopped answering ({err}); its own output says why"
        ) from None


def collective_failure(err: BaseException, timeout_s: float, role=None) -> Optional[str]:
    """One line for a collective that failed because of another rank (gloo and NCCL report
    these as RuntimeErrors carrying the transport's text), else None. ``role``: a training
    rank with separate rollout ranks, whose link failures name those ranks."""
    from gspo_megatron.rollout.separate.link import LinkError
    from gspo_megatron.rollout.separate.placement import LinkStartError

    if isinstance(err, LinkStartError):
        return str(err)
    if isinstance(err, LinkError) and role is not None:
        ranks = f"{role.trainers}..{role.launch_world - 1}"
        if "Timed out" in str(err) or "timeout" in str(err).lower():
            return (
                f"the rollout ranks ({ranks} of the launch) did not answer for "
                f"train.collective_timeout_s={timeout_s:g} s ({err}): one hung, or is much "
                f"slower (raise the timeout if that is expected)"
            )
        return (
            f"the rollout ranks ({ranks} of the launch) stopped: one died or lost its "
            f"connection ({err}); its own output says why"
        )
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if "Timed out" in text or "timeout" in text.lower():
        return (
            f"a collective waited longer than train.collective_timeout_s={timeout_s:g} s: "
            f"another rank hung (or is much slower; raise the timeout if that is expected)"
        )
    if isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text:
        return (
            f"a collective failed because another rank died or lost its connection (its own "
            f"output says why): {text.strip().splitlines()[0][:200]}"
        )
    return None


if __name__ == "__main__":
    cli()
