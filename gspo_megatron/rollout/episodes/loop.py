"""Multi-turn episodes: the model and an environment taking turns, every live episode together.

A step's episodes (``group_size`` per prompt) advance in lockstep: each turn is one batched
engine call over every live episode (its token prompt is the whole transcript so far; the
engine's prefix cache reuses the KV of what it saw last turn), then one concurrent round of the
environments' ``step`` calls (``EnvPool``: a process per episode), so a tool that takes 100 ms
costs about 100 ms per turn for the whole batch.

Placement under torchrun: an episode is served by engine ``index % num_engines``, and that
engine's first rank runs its environment; replies are shared with every rank after each round
(every rank holds every transcript, as every rank holds every completion of a single-turn
rollout), so the engine calls stay collective and identical everywhere.

An episode ends when the environment says done, after ``agent.max_turns`` turns, when its
tokens reach ``agent.max_episode_tokens`` (truncated, counted), or when its environment fails
(raises, hangs, exits, returns something that is not messages): then it scores 0 and is counted;
the run goes on. See ``transcript`` for how the ids are kept exact.

Partial rollouts (``rollout.partial``) stop every episode after its first
``rollout.partial_turns`` turns (``EpisodeRunner.start``) and continue the live ones under the
next policy version (``EpisodeRunner.resume``). What is in between is ``Suspended``: the
transcripts, the records and each episode's log of what its environment was sent and answered;
no process. The environments are rebuilt from that log, replaying the recorded calls on a new
instance of the class (in a process from the pool), and each reply must equal the one recorded:
an environment whose replies do not follow from its row and the calls it was sent fails that
episode (``replay``, counted) instead of silently continuing a conversation the environment no
longer agrees with. A run and its resume from a checkpoint therefore do exactly the same thing;
the price is the replayed calls (``perf/agent_replay_seconds``), one round per turn replayed for
the whole batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gspo_megatron.distributed.exchange import all_gather_objects
from gspo_megatron.errors import TrainingStopped
from gspo_megatron.rewards.registry import describe
from gspo_megatron.rollout.episodes.agent_config import AgentConfig
from gspo_megatron.rollout.episodes.tool_calls import parse_tool_calls
from gspo_megatron.rollout.episodes.transcript import ChatRenderer, Transcript

TurnRequest = Tuple[int, List[int], int, str]
"""(episode index, token prompt, max new tokens, seed key) for one engine call."""


@dataclass
class EpisodeRecord:
    """What an episode did, beside its ids (``Completion.agent``)."""

    messages: List[dict] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    malformed_calls: int = 0
    env_reward: float = 0.0
    failure: Optional[str] = None
    """None, or how the environment failed: error, timeout, exit, invalid, or replay (rebuilt
    for a partial rollout's next version, it answered otherwise than it had)."""
    failure_detail: str = ""
    truncated: bool = False
    cut_observations: int = 0
    closed_by_env: int = 0
    final_text: str = ""
    """The last assistant turn's text: what the reward functions score."""
    model_tokens: int = 0
    env_tokens: int = 0
    metadata: dict = field(default_factory=dict)


class SharedEnvs:
    """The environments of this rank's engine's episodes (on its first rank), with every
    reply shared with every rank."""

    def __init__(self, pool, num_engines: int = 1, engine_index: int = 0, lead: bool = True):
        self.pool, self.num_engines, self.engine_index = pool, num_engines, engine_index
        self.lead = lead

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _mine(self, keys) -> list:
        return [k for k in keys if k % self.num_engines == self.engine_index] if self.lead else []

    def reset(self, rows: Dict[int, dict]) -> Dict[int, object]:
        mine = self._mine(rows)
        return _share(self.pool.reset({k: rows[k] for k in mine}) if mine else {})

    def step(self, calls: Dict[int, Tuple[str, list]]) -> Dict[int, object]:
        mine = self._mine(calls)
        return _share(self.pool.step({k: calls[k] for k in mine}) if mine else {})

    def finish(self, keys: Sequence[int]) -> Dict[int, dict]:
        return _share({k: self.pool.finish(k) for k in self._mine(keys)})

    def release(self, keys: Sequence[int]) -> None:
        """End these live episodes without ``metadata()`` (their processes free for others):
        they go on later from a replay. Not collective: each rank releases its own."""
        mine = self._mine(keys)
        if mine:
            self.pool.release(mine)


def _share(local: dict) -> dict:
    merged: dict = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return merged


@dataclass
class _Live:
    index: int
    transcript: Optional[Transcript]
    record: EpisodeRecord
    done: bool = False
    stepped: bool = False
    """A model turn was sampled this turn: the environment answers it."""
    trailing: List[dict] = field(default_factory=list)
    log: List[tuple] = field(default_factory=list)
    """What the environment was sent and answered, in order: (row, (messages, tools)) for
    ``reset``, then ((text, calls), (messages, done, reward)) per ``step``; a suspended
    episode's environment is rebuilt from it."""


@dataclass
class Suspended:
    """Episodes stopped between two turns (``EpisodeRunner.start``): plain data, no process."""

    episodes: List[_Live]
    next_turn: int
    env_seconds: float
    seconds: float


class EpisodeRunner:
    """Runs groups of episodes; ``sample(requests)`` is the engine (collective: every rank
    passes the same requests and gets every completion)."""

    def __init__(
        self,
        cfg: AgentConfig,
        renderer: ChatRenderer,
        envs: SharedEnvs,
        sample: Callable[[List[TurnRequest]], Dict[int, object]],
        max_new_tokens: int,
        max_model_len: int,
        per_engine: int = 0,
    ):
        self.cfg, self.renderer, self.envs, self.sample = cfg, renderer, envs, sample
        self.greedy = False  # (agent_rollout sets it per call: evaluation may be greedy)
        self.per_turn = cfg.tokens_per_turn(max_new_tokens)
        self.budget = cfg.episode_tokens(max_model_len)
        self.per_engine = per_engine
        """Live episodes per engine's environments at most (``agent.max_parallel_envs``'s
        share; 0: all of a call's): a call's episodes run in waves, each over before the next
        opens."""

    def _waves(self, items: Sequence, index: Callable = lambda x: x) -> List[list]:
        """``items`` (episode indices, or episodes) in order, in waves that hold at most
        ``per_engine`` of each engine's episodes (engine ``index % num_engines``)."""
        if not self.per_engine:
            return [list(items)] if len(items) else []
        taken: Dict[int, int] = {}
        waves: List[list] = []
        for x in items:
            engine = index(x) % self.envs.num_engines
            k = taken.get(engine, 0) // self.per_engine
            taken[engine] = taken.get(engine, 0) + 1
            waves += [[] for _ in range(k + 1 - len(waves))]
            waves[k].append(x)
        return waves

    def run(
        self, rows: Sequence[dict], fallback_ids: Sequence[List[int]], seed_key: Callable
    ) -> Tuple[List[Transcript], List[EpisodeRecord]]:
        """One episode per row, all together. ``fallback_ids``: each row's prompt as the data
        set rendered it, the prompt of an episode whose environment failed to open;
        ``seed_key(index, turn)`` keys the engine's sampling seed of a turn."""
        t0 = time.perf_counter()
        self.env_seconds, self.replay_seconds, self.turn_seconds = 0.0, 0.0, []
        eps = []
        for wave in self._waves(range(len(rows))):
            opened = self._open(rows, fallback_ids, 0, wave)
            self._play(opened, 0, seed_key)
            self._finish(opened)
            eps += opened
        self.seconds = time.perf_counter() - t0
        return [e.transcript for e in eps], [e.record for e in eps]

    def start(
        self,
        rows: Sequence[dict],
        fallback_ids: Sequence[List[int]],
        seed_key: Callable,
        turns: int,
        version: int,
    ) -> Suspended:
        """``run``'s first ``turns`` turns under policy ``version``; the episodes over by then
        are finished, the others suspended (their processes freed: ``resume`` rebuilds them)."""
        t0 = time.perf_counter()
        self.env_seconds, self.replay_seconds, self.turn_seconds = 0.0, 0.0, []
        eps = []
        for wave in self._waves(range(len(rows))):
            opened = self._open(rows, fallback_ids, version, wave)
            self._play(opened, 0, seed_key, stop=turns)
            self._finish([e for e in opened if e.done])
            self.envs.release([e.index for e in opened if not e.done])
            eps += opened
        seconds = time.perf_counter() - t0
        return Suspended(eps, turns, self.env_seconds, seconds)

    def resume(
        self, state: Suspended, seed_key: Callable, version: int
    ) -> Tuple[List[Transcript], List[EpisodeRecord]]:
        """The suspended episodes of ``state`` to their end under policy ``version``: their
        environments rebuilt by replay, then the remaining turns (seeded as ``run`` would)."""
        t0 = time.perf_counter()
        self.env_seconds, self.replay_seconds, self.turn_seconds = 0.0, 0.0, []
        eps = state.episodes
        live = [e for e in eps if not e.done]
        for e in live:
            e.transcript.version = version
        for wave in self._waves(live, lambda e: e.index):
            t1 = time.perf_counter()
            self._replay(wave)
            self.replay_seconds += time.perf_counter() - t1
            self._play(wave, state.next_turn, seed_key)
            self._finish(wave)
        self.env_seconds += state.env_seconds
        self.seconds = time.perf_counter() - t0 + state.seconds
        return [e.transcript for e in eps], [e.record for e in eps]

    def _open(self, rows, fallback_ids, version: int, indices: Sequence[int]) -> List[_Live]:
        """Open the episodes of ``rows`` at ``indices``."""
        eps = [_Live(i, None, EpisodeRecord()) for i in indices]
        replies = self._timed(self.envs.reset, {i: dict(rows[i]) for i in indices})
        for e in eps:
            reply = replies[e.index]
            if reply.failure is not None:
                self._fail(e, reply.failure, reply.detail, fallback_ids[e.index])
                continue
            tools = getattr(reply, "tools", None)
            e.log.append((dict(rows[e.index]), (reply.messages, tools)))
            try:
                messages = self._cut(e, reply.messages)
                opening = self.renderer.opening(messages, tools)
            except Exception as err:  # the template or tokenizer on this episode's text
                self._unrenderable(e, "reset", "rendering its messages", err, fallback_ids[e.index])
                continue
            e.transcript = Transcript(opening, messages, tools, version=version)
            if len(e.transcript) + 1 >= self.budget:
                e.record.truncated = e.done = True
        return eps

    def _play(self, eps: List[_Live], first: int, seed_key: Callable, stop=None) -> None:
        """Turns ``first`` .. (``stop`` or agent.max_turns) - 1 of the live episodes."""
        for turn in range(first, self.cfg.max_turns if stop is None else stop):
            live = [e for e in eps if not e.done]
            if not live:
                break
            t1 = time.perf_counter()
            self._model_turn(live, turn, seed_key)
            t2, env_before = time.perf_counter(), self.env_seconds
            self._env_turn(live, turn)
            self.turn_seconds.append((t2 - t1, self.env_seconds - env_before))

    def _replay(self, eps: List[_Live]) -> None:
        """Rebuild the environments of ``eps`` from their logs: ``reset`` with the recorded
        row and every recorded ``step`` call again, a round per call for all of them; an episode
        whose environment fails or answers otherwise than it had is over (scored 0, counted)."""
        if not eps:
            return
        replies = self._timed(self.envs.reset, {e.index: dict(e.log[0][0]) for e in eps})
        ok = []
        for e in eps:
            reply = replies[e.index]
            if self._replayed(e, reply, 0, (reply.messages, getattr(reply, "tools", None))):
                ok.append(e)
        for k in range(1, max(len(e.log) for e in eps)):
            calls = {e.index: e.log[k][0] for e in ok if len(e.log) > k}
            if not calls:
                break
            replies = self._timed(self.envs.step, calls)
            ok = [e for e in ok if e.index not in calls or self._replayed_step(e, replies, k)]

    def _replayed_step(self, e: _Live, replies: dict, k: int) -> bool:
        reply = replies[e.index]
        return self._replayed(e, reply, k, (reply.messages, reply.done, reply.reward))

    def _replayed(self, e: _Live, reply, k: int, got: tuple) -> bool:
        """Whether the replayed call ``k`` of ``e`` answered as recorded (else ``e`` fails)."""
        if reply.failure is not None:
            self._fail(e, reply.failure, reply.detail)
            return False
        if _plain_json(got) != _plain_json(e.log[k][1]):
            what = "reset" if k == 0 else f"step {k}"
            self.envs.release([e.index])
            self._fail(
                e,
                "replay",
                f"rebuilt for the next policy version, the environment answered its {what} "
                f"otherwise than before: its replies must follow from its row and the calls "
                f"it is sent (partial rollouts replay them)",
            )
            return False
        return True

    def _model_turn(self, live: List[_Live], turn: int, seed_key: Callable) -> None:
        requests = []
        for e in live:
            room = self.budget - len(e.transcript) - 1  # the end-of-turn token may be appended
            if room < 1:
                e.record.truncated = e.done = True
                continue
            ids = e.transcript.prompt_ids + e.transcript.ids
            requests.append((e.index, ids, min(self.per_turn, room), seed_key(e.index, turn)))
        outs = self.sample(requests)
        asked = {r[0] for r in requests}
        for e in live:
            if e.index not in asked:
                continue
            out = outs[e.index]
            e.record.final_text = e.transcript.add_model_turn(
                self.renderer, out.token_ids, out.logprobs
            )
            e.record.turns += 1
            e.stepped = True
            if len(e.transcript) + 1 >= self.budget and out.finish_reason == "length":
                e.record.truncated = True

    def _env_turn(self, live: List[_Live], turn: int) -> None:
        calls = {}
        for e in live:
            if not e.stepped:
                continue
            e.stepped = False
            try:
                parsed = parse_tool_calls(e.record.final_text, self.cfg.max_tool_calls_per_turn)
            except Exception as err:  # (the parser bounds what it reads; belt and braces)
                self._unrenderable(e, f"turn {turn + 1}", "parsing the model's tool calls", err)
                continue
            e.record.tool_calls += sum(c.error is None for c in parsed)
            e.record.malformed_calls += sum(c.error is not None for c in parsed)
            calls[e.index] = (e.record.final_text, [c.as_dict() for c in parsed])
        if not calls:
            return
        replies = self._timed(self.envs.step, calls)
        last = turn == self.cfg.max_turns - 1
        for e in live:
            if e.index not in calls:
                continue
            reply = replies[e.index]
            if reply.failure is not None:
                self._fail(e, reply.failure, reply.detail)
                continue
            e.log.append((calls[e.index], (reply.messages, reply.done, reply.reward)))
            if reply.reward is not None and self.cfg.turn_rewards == "sum":
                e.record.env_reward += float(reply.reward)
            if reply.done or last or e.record.truncated:
                e.done = True
                e.trailing = list(reply.messages)  # recorded, never sampled after: no ids
                continue
            try:
                messages = self._cut(e, reply.messages)
                ids = e.transcript.environment_ids(self.renderer, messages)
            except Exception as err:  # the template or tokenizer on this episode's text
                self._unrenderable(e, f"step {turn + 1}", "rendering its messages", err)
                continue
            if len(e.transcript) + len(ids) + 1 >= self.budget:
                e.record.truncated = e.done = True  # no room left for a model turn after it
                continue
            e.transcript.add_environment(messages, ids)

    def _timed(self, fn, arg):
        t0 = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.env_seconds += time.perf_counter() - t0

    def _cut(self, e: _Live, messages: List[dict]) -> List[dict]:
        out = []
        for m in messages:
            content, cut = self.renderer.cut_observation(
                m["content"], self.cfg.max_observation_tokens
            )
            e.record.cut_observations += cut
            out.append({**m, "content": content})
        return out

    def _unrenderable(
        self, e: _Live, call: str, what: str, err: Exception, fallback: Optional[List[int]] = None
    ) -> None:
        """What an episode's text made the chat template, the tokenizer or the tool-call parser
        raise costs that episode only (every rank holds the same text and fails it alike); its
        environment's process is sound and serves a later episode."""
        self.envs.release([e.index])
        detail = f"{call}: {what} raised {describe(err)}"
        self._fail(e, "invalid", detail, fallback)

    def _fail(
        self, e: _Live, failure: str, detail: str, fallback: Optional[List[int]] = None
    ) -> None:
        e.done = True
        e.record.failure, e.record.failure_detail = failure, detail
        if e.transcript is None:  # failed before its opening: nothing sampled, nothing to learn
            e.transcript = Transcript(list(fallback or []), [])

    def _finish(self, eps: List[_Live]) -> None:
        alive = [e.index for e in eps if e.record.failure is None]
        metadata = self.envs.finish(alive)
        for e in eps:
            t, rec = e.transcript, e.record
            rec.metadata = metadata.get(e.index, {}) or {}
            rec.messages = list(t.messages) + e.trailing
            rec.closed_by_env = t.closed_by_env
            rec.model_tokens, rec.env_tokens = t.model_tokens, t.env_tokens
            if rec.failure is not None:
                rec.env_reward = 0.0


class FailureWatch:
    """What a run says about failed environments: the first failure once (the counts are in
    agent/env_errors and agent/env_timeouts), a warning for a step in which every episode
    failed, and a stop after ``agent.max_failed_steps`` such steps in a row."""

    def __init__(self, environment: str, limit: int, say: Callable[[str], None]):
        self.environment, self.limit, self.say = environment, limit, say
        self.shown, self.in_a_row = False, 0

    def observe(self, rollout, step: int, last_checkpoint: Callable[[], str]) -> None:
        """``rollout`` (a ``sampling.StepRollout``) is step ``step``'s batch (0-based)."""
        if rollout.first_env_failure is not None and not self.shown:
            self.shown = True
            self.say(
                f"environment {self.environment} failed (the episode scores 0, counted in "
                f"agent/env_errors or agent/env_timeouts; only the first failure is shown): "
                f"{rollout.first_env_failure}"
            )
        every = rollout.episodes > 0 and rollout.failed_episodes == rollout.episodes
        self.in_a_row = self.in_a_row + 1 if every else 0
        if not every:
            return
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"every episode of {self.in_a_row} steps in a row failed in its environment "
                f"(last in step {step + 1}: {rollout.first_env_failure}); {last_checkpoint()}. "
                f"Fix {self.environment}, or raise agent.max_failed_steps"
            )
        self.say(
            f"step {step + 1}: every one of its {rollout.episodes} episodes failed in its "
            f"environment, so it has nothing to learn from ({rollout.first_env_failure})"
        )


def agent_stats(records: Sequence[EpisodeRecord]) -> Dict[str, float]:
    """The ``agent/*`` metrics of a step's episodes: per-episode means of turns, tool calls and
    tokens; counts of malformed calls, failed environments and truncated episodes."""
    n = max(len(records), 1)
    return {
        "agent/turns_mean": sum(r.turns for r in records) / n,
        "agent/tool_calls": sum(r.tool_calls for r in records) / n,
        "agent/malformed_calls": float(sum(r.malformed_calls for r in records)),
        "agent/env_errors": float(sum(r.failure in ("error", "exit", "invalid") for r in records)),
        "agent/env_timeouts": float(sum(r.failure == "timeout" for r in records)),
        "agent/truncated_episodes": float(sum(r.truncated for r in records)),
        "agent/cut_observations": float(sum(r.cut_observations for r in records)),
        "agent/replay_mismatches": float(sum(r.failure == "replay" for r in records)),
        "agent/model_tokens": sum(r.model_tokens for r in records) / n,
        "agent/env_tokens": sum(r.env_tokens for r in records) / n,
    }


def agent_rollout(
    runner: EpisodeRunner,
    prompts: Sequence,
    group_size: int,
    step: int,
    round_: int = 0,
    stream: str = "",
    greedy: bool = False,
):
    """``group_size`` episodes per prompt (a ``data.Prompt``), as a RolloutBatch whose
    completions carry their mask, opening and ``EpisodeRecord``. Sampling seeds are keyed by
    (stream, step, round, prompt index, member, turn): any engine count samples the same."""
    rows, fallback = _rows(prompts, group_size)
    runner.greedy = greedy
    transcripts, records = runner.run(rows, fallback, _seed_key(group_size, stream, step, round_))
    return _batch(runner, transcripts, records, group_size, versions=False)


def start_episodes(
    runner: EpisodeRunner, prompts: Sequence, group_size: int, step: int, turns: int, version: int
) -> Suspended:
    """Partial rollouts: ``agent_rollout``'s episodes of step ``step`` for their first
    ``turns`` turns, sampled by policy ``version``."""
    rows, fallback = _rows(prompts, group_size)
    runner.greedy = False
    return runner.start(rows, fallback, _seed_key(group_size, "", step, 0), turns, version)


def finish_episodes(
    runner: EpisodeRunner, state: Suspended, group_size: int, step: int, version: int
):
    """The episodes ``start_episodes`` suspended, to their end under policy ``version``: the
    RolloutBatch ``agent_rollout`` would give, with every token's version."""
    runner.greedy = False
    transcripts, records = runner.resume(state, _seed_key(group_size, "", step, 0), version)
    batch = _batch(runner, transcripts, records, group_size, versions=True)
    batch.extra["perf/agent_replay_seconds"] = runner.replay_seconds
    return batch


def _rows(prompts: Sequence, group_size: int) -> Tuple[List[dict], List[List[int]]]:
    rows, fallback = [], []
    for p in prompts:
        for _ in range(group_size):
            rows.append(dict(p.fields or {}))
            fallback.append(list(p.ids))
    return rows, fallback


def _seed_key(group_size: int, stream: str, step: int, round_: int) -> Callable:
    def seed_key(index: int, turn: int) -> str:
        i, member = divmod(index, group_size)
        return f"{stream}/{step}/{round_}/{i}/{member}/t{turn}"

    return seed_key


def _batch(runner: EpisodeRunner, transcripts, records, group_size: int, versions: bool):
    from gspo_megatron.rollout.types import Completion, RolloutBatch

    comps = [
        Completion(
            list(t.ids),
            list(t.logprobs),
            "length" if rec.truncated else "stop",
            loss_mask=list(t.mask),
            prompt_ids=list(t.prompt_ids),
            agent=rec,
            versions=list(t.versions) if versions else None,
        )
        for t, rec in zip(transcripts, records)
    ]
    groups = [comps[k : k + group_size] for k in range(0, len(comps), group_size)]
    extra = agent_stats(records)
    extra["perf/agent_env_seconds"] = runner.env_seconds
    return RolloutBatch(groups, seconds=runner.seconds, extra=extra)


def _plain_json(value) -> str:
    """A reply as JSON text (tuples and lists alike), to compare a replay with the record."""
    return json.dumps(value, sort_keys=True)


def make_runner(cfg: AgentConfig, rollout, tokenizer, engine) -> EpisodeRunner:
    """The runner of a colocated ``engine`` (``RolloutEngine``): each engine's first rank holds
    the environment processes of the episodes that engine samples."""
    from gspo_megatron.rollout.episodes.agent_config import end_of_turn_id
    from gspo_megatron.rollout.episodes.env_pool import EnvPool
    from gspo_megatron.rollout.machine import envs_per_engine

    lead = engine.rank % rollout.engine_tp == 0
    limits = env_limits(cfg, rollout, tokenizer)
    pool = None
    if lead:
        pool = EnvPool(cfg.environment, cfg.step_timeout_s, cfg.env_start_timeout_s, limits)
    envs = SharedEnvs(pool, engine.num_engines, engine.engine_index, lead)
    # Every rank must cut the same waves (the engine calls are collective): the smallest share.
    per_engine = min(all_gather_objects(envs_per_engine(cfg, rollout)))
    eot = end_of_turn_id(tokenizer)
    runner = EpisodeRunner(
        cfg,
        ChatRenderer(tokenizer, eot, cfg.env_special_tokens),
        envs,
        lambda requests: engine.sample_turns(requests, eot, greedy=runner.greedy),
        rollout.max_new_tokens,
        rollout.max_model_len,
        per_engine,
    )
    return runner


def env_limits(cfg: AgentConfig, rollout, tokenizer):
    """What one environment reply may hold (``EnvLimits``): a message longer in characters than
    any text of ``agent.max_observation_tokens`` tokens is cut to such a length in the
    environment's process (the trainer's token cut then marks it), and a reply whose text could
    fill the episode several times over fails its episode. Without a character bound for the
    tokenizer (``data.max_token_chars``), nothing is cut there."""
    from gspo_megatron.data import chars_for_tokens, max_token_chars
    from gspo_megatron.rollout.episodes.env_pool import EnvLimits

    token_chars = max_token_chars(tokenizer)
    budget = cfg.episode_tokens(rollout.max_model_len)
    return EnvLimits(
        chars_for_tokens(cfg.max_observation_tokens + 1, token_chars),
        chars_for_tokens(budget + 1, token_chars),
        cfg.env_memory_gib,
    )
