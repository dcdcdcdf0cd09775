"""Multi-turn episodes end to end but for the engine: the real environment processes
(``EnvPool``), the real transcript and tool-call parsing, with a scripted sampler standing in
for vLLM (its turns are fixed texts, so every expected id is known; test_agent_rollout runs the
real engine). Checks the episode's ids and mask against the chat template, the tool
environment, the limits and the failure accounting."""

from __future__ import annotations

import pytest
from episode_envs import LookupWithSchemas
from transformers import AutoTokenizer

from gspo_megatron.data import Prompt
from gspo_megatron.rollout.episodes.agent_config import AgentConfig, end_of_turn_id
from gspo_megatron.rollout.episodes.env_pool import EnvLimits, EnvPool
from gspo_megatron.rollout.episodes.loop import EpisodeRunner, SharedEnvs, agent_rollout
from gspo_megatron.rollout.sampling import episode_rewards
from gspo_megatron.rollout.types import Completion
from gspo_megatron.tasks.agent_demo import value_reward
from gspo_megatron.testing.chat_tokenizer import write_chat_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok")
    write_chat_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


class ScriptedSampler:
    """Turn t of every episode samples ``script(index, t)`` (a text) and then <|im_end|>,
    cut to the request's max tokens like an engine (finish 'length')."""

    def __init__(self, tok, script):
        self.tok, self.script, self.eot = tok, script, end_of_turn_id(tok)
        self.requests = []

    def __call__(self, requests):
        self.requests.append(requests)
        out = {}
        for index, _prompt, max_tokens, key in requests:
            turn = int(key.rsplit("/t", 1)[1])
            ids = self.tok.encode(self.script(index, turn), add_special_tokens=False) + [self.eot]
            stop = len(ids) <= max_tokens
            ids = ids[:max_tokens]
            out[index] = Completion(ids, [-0.1] * len(ids), "stop" if stop else "length")
        return out


def runner(tok, env, script, limits=None, per_engine=0, **cfg):
    cfg = AgentConfig(environment=env, **{"step_timeout_s": 5.0, **cfg})
    from gspo_megatron.rollout.episodes.transcript import ChatRenderer

    pool = EnvPool(env, cfg.step_timeout_s, limits=limits or EnvLimits())
    sampler = ScriptedSampler(tok, script)
    renderer = ChatRenderer(tok, end_of_turn_id(tok))
    r = EpisodeRunner(cfg, renderer, SharedEnvs(pool), sampler, 64, 1024, per_engine)
    return r, sampler, pool


CALL = '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'


def test_tool_episode_ids_mask_and_reward(tok):
    """The demo's lookup episode (the tool's schema rendered in the system turn) with a policy that calls the tool right, then answers with
    what it read: ids equal the template's rendering of the conversation (with the tools in the
    system turn), mask 1 on the model's two turns only, the final answer rewarded."""
    rows = [
        {"prompt": f"What is stored under k{i}?", "key": f"k{i}", "answer": v}
        for i, v in ((3, "teal"), (8, "gold"))
    ]
    prompts = [Prompt(r["prompt"], [1], r["answer"], i, r) for i, r in enumerate(rows)]

    def script(index, turn):
        row = rows[index // 2]
        if turn == 0:
            return CALL
        return row["answer"] if index % 2 == 0 else "red"

    r, sampler, pool = runner(tok, "episode_envs:LookupWithSchemas", script)
    with pool:
        batch = agent_rollout(r, prompts, 2, step=0)
    comps = [c for g in batch.groups for c in g]
    assert len(comps) == 4 and [len(reqs) for reqs in sampler.requests] == [4, 4]
    specs = LookupWithSchemas(rows[0]).tool_specs()
    assert specs[0]["function"]["name"] == "lookup"
    eot = end_of_turn_id(tok)
    for k, c in enumerate(comps):
        row = rows[k // 2]
        rec = c.agent
        assert rec.failure is None and rec.turns == 2 and rec.tool_calls == 1
        final = row["answer"] if k % 2 == 0 else "red"
        assert rec.final_text == final
        conversation = LookupWithSchemas(row).reset() + [
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": row["answer"]},
            {"role": "assistant", "content": final},
        ]
        assert rec.messages == conversation
        text = tok.apply_chat_template(conversation, tools=specs, tokenize=False)
        assert c.prompt_ids + c.token_ids == tok.encode(text[:-1], add_special_tokens=False)
        turn1 = tok.encode(CALL, add_special_tokens=False) + [eot]
        turn2 = tok.encode(final, add_special_tokens=False) + [eot]
        between = len(c.token_ids) - len(turn1) - len(turn2)
        assert c.loss_mask == [1] * len(turn1) + [0] * between + [1] * len(turn2)
        assert [x for x, m in zip(c.logprobs, c.loss_mask) if not m] == [0.0] * between
        # The second turn's request is the whole transcript so far, as a token prompt.
        (second,) = [q for q in sampler.requests[1] if q[0] == k]
        assert second[1] == c.prompt_ids + c.token_ids[: len(turn1) + between]
    rewards = [
        value_reward("", c.agent.final_text, rows[k // 2]["answer"]) for k, c in enumerate(comps)
    ]
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    assert batch.extra["agent/turns_mean"] == 2.0 and batch.extra["agent/tool_calls"] == 1.0
    assert batch.extra["agent/env_tokens"] > 0 and batch.extra["agent/malformed_calls"] == 0


def test_malformed_calls_become_error_observations_and_are_counted(tok):
    rows = [{"prompt": "What is stored under k1?", "key": "k1", "answer": "red"}]
    prompts = [Prompt(rows[0]["prompt"], [1], "red", 0, rows[0])]
    texts = ['<tool_call>{"name": "lookup", "arguments": [1]}</tool_call>', "red"]
    r, _, pool = runner(tok, "gspo_megatron.tasks.agent_demo:LookupEnv", lambda i, t: texts[t])
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    rec = batch.groups[0][0].agent
    assert rec.malformed_calls == 1 and rec.tool_calls == 0 and rec.turns == 2
    assert rec.messages[3]["role"] == "tool"
    assert rec.messages[3]["content"].startswith('error: the "arguments" of lookup must be')
    assert batch.extra["agent/malformed_calls"] == 1.0


@pytest.mark.parametrize(
    "mode,failure",
    [
        ("raise", "error"),
        ("hang", "timeout"),
        ("exit", "exit"),
        ("garbage", "invalid"),
        ("unrenderable", "invalid"),
    ],
)
def test_an_environment_that_fails_costs_its_episode_only(tok, mode, failure):
    """One episode's environment fails at its second step; the other finishes its three turns.
    The failed one keeps what it sampled (mask and all), scores 0 whatever the rewards say, and
    is counted; the run goes on."""
    rows = [
        {"prompt": "a", "turns": 3},
        {"prompt": "b", "turns": 3, "fail_at": 2, "mode": mode},
    ]
    prompts = [Prompt(r["prompt"], [1], None, i, r) for i, r in enumerate(rows)]
    r, _, pool = runner(tok, "episode_envs:Scripted", lambda i, t: f"turn {t}", step_timeout_s=1.0)
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    ok, bad = batch.groups[0][0], batch.groups[1][0]
    assert ok.agent.failure is None and ok.agent.turns == 3
    assert ok.agent.env_reward == pytest.approx(0.75)
    assert ok.agent.metadata == {"turns_seen": 3}
    assert bad.agent.failure == failure and bad.agent.turns == 2 and bad.agent.metadata == {}
    assert sum(bad.loss_mask) > 0 and len(bad.loss_mask) == len(bad.token_ids)
    assert episode_rewards([0.5, 0.5], [ok, bad]) == [1.25, 0.0]
    key = "agent/env_timeouts" if failure == "timeout" else "agent/env_errors"
    assert batch.extra[key] == 1.0
    if mode == "unrenderable":
        assert bad.agent.failure_detail.startswith(
            "step 2: rendering its messages raised GspoError: environment text holds a "
            "character of U+F0000"
        )


def test_a_degenerate_tool_call_is_an_error_observation(tok):
    """A turn of 300 nested brackets in a tool call (a policy under RL can degenerate into it;
    at 1,000 json raises RecursionError) is a malformed call answered with an error."""
    rows = [{"prompt": "What is stored under k1?", "key": "k1", "answer": "red"}]
    prompts = [Prompt(rows[0]["prompt"], [1], "red", 0, rows[0])]
    texts = ["<tool_call>" + "[" * 300 + "</tool_call>", "red"]
    r, _, pool = runner(
        tok,
        "gspo_megatron.tasks.agent_demo:LookupEnv",
        lambda i, t: texts[t],
        max_tokens_per_turn=600,
    )
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    rec = batch.groups[0][0].agent
    assert rec.failure is None and rec.malformed_calls == 1 and rec.turns == 2
    assert rec.messages[3]["content"] == "error: the tool call nests deeper than 64 levels"


def test_a_flood_of_text_is_bounded_in_the_environments_process(tok, monkeypatch):
    """A 50 MB observation is cut to a bound derived from agent.max_observation_tokens before it
    leaves the environment's process, so the trainer tokenizes no more than that bound (then
    cuts it to the token limit, marked); a reply of 200,000 messages fails its episode there."""
    from gspo_megatron.rollout.config import RolloutConfig
    from gspo_megatron.rollout.episodes.loop import env_limits
    from gspo_megatron.rollout.episodes.transcript import ChatRenderer

    rows = [{"prompt": "a", "flood": "one"}, {"prompt": "b", "flood": "many"}]
    prompts = [Prompt(r["prompt"], [1], None, i, r) for i, r in enumerate(rows)]
    agent = AgentConfig(environment="episode_envs:Floods", max_observation_tokens=50)
    limits = env_limits(agent, RolloutConfig(max_prompt_tokens=512, max_new_tokens=64), tok)
    assert limits.message_chars < 20_000 and limits.reply_chars < 400_000
    seen = []
    for name in ("encode", "encode_text"):
        original = getattr(ChatRenderer, name)

        def spy(self, text, _original=original):
            seen.append(len(text))
            return _original(self, text)

        monkeypatch.setattr(ChatRenderer, name, spy)
    r, _, pool = runner(
        tok, "episode_envs:Floods", lambda i, t: "ok", limits, max_observation_tokens=50
    )
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    one, many = batch.groups[0][0].agent, batch.groups[1][0].agent
    assert one.failure is None and one.cut_observations == 1 and one.env_reward == 1.0
    assert one.messages[2]["content"].endswith(" [truncated]")
    kept = one.messages[2]["content"].removesuffix(" [truncated]")
    assert len(tok.encode(kept, add_special_tokens=False)) == 50
    assert max(seen) <= limits.message_chars
    assert many.failure == "invalid" and many.failure_detail.startswith(
        "step returned 20,800,000 characters of text"
    )


def test_the_episode_token_limit_truncates_and_is_counted(tok):
    """Turns of ~10 tokens against an episode of at most 40: the episode stops within it,
    truncated and counted; its last turn closed by the environment's end-of-turn token."""
    rows = [{"prompt": "a", "turns": 100}]
    prompts = [Prompt("a", [1], None, 0, rows[0])]
    r, _, pool = runner(
        tok,
        "episode_envs:Scripted",
        lambda i, t: "one two three four five six seven eight",
        max_episode_tokens=40,
        max_turns=10,
    )
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    c = batch.groups[0][0]
    assert len(c.prompt_ids) + len(c.token_ids) <= 40
    assert c.agent.truncated and c.finish_reason == "length"
    assert batch.extra["agent/truncated_episodes"] == 1.0
    assert c.token_ids[-1] == end_of_turn_id(tok)


def test_turn_limit_and_long_observations(tok):
    rows = [{"prompt": "a"}]
    prompts = [Prompt("a", [1], None, 0, rows[0])]
    r, _, pool = runner(
        tok, "episode_envs:Chatty", lambda i, t: "ok", max_turns=3, max_observation_tokens=20
    )
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    rec = batch.groups[0][0].agent
    assert rec.turns == 3 and not rec.truncated
    assert rec.cut_observations == 2  # the third turn's observation is never rendered
    observations = [m["content"] for m in rec.messages[1:] if m["role"] == "user"]
    # The last turn's answer is recorded as the environment gave it (never rendered, no ids).
    assert len(observations) == 3
    assert all(o.endswith(" [truncated]") for o in observations[:2])
    assert not observations[2].endswith(" [truncated]")


def test_the_readme_environment_runs_as_documented(tok, tmp_path, monkeypatch):
    """The README's example environment, as printed there, in the pool: wrong guesses get
    hints, the right one ends the episode with its reward."""
    import re
    import sys

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Multi-turn episodes with tools") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "readme_game.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("readme_game", None)
    rows = [{"prompt": "guess", "answer": "42"}]
    prompts = [Prompt("guess", [1], "42", 0, rows[0])]
    guesses = ["50", "a lot", "40", "42"]
    r, _, pool = runner(tok, "readme_game:GuessTheNumber", lambda i, t: guesses[t], max_turns=8)
    with pool:
        batch = agent_rollout(r, prompts, 1, step=0)
    rec = batch.groups[0][0].agent
    assert rec.turns == 4 and rec.env_reward == 1.0 and rec.failure is None
    hints = [m["content"] for m in rec.messages if m["role"] == "user"][1:]
    assert hints == ["Lower.", "A number, please.", "Higher."]


def _comparable(batch):
    """What an episode batch trains on and reports, but timings: ids, masks, log-probs,
    rewards from the environment, records (messages, metadata, counts)."""
    out = []
    for g in batch.groups:
        for c in g:
            rec = dict(vars(c.agent))
            out.append((c.prompt_ids, c.token_ids, c.loss_mask, c.logprobs, c.finish_reason, rec))
    return out


def test_an_episode_interrupted_between_turns_continues_as_if_never_interrupted(tok):
    """Partial rollouts of episodes: the first turn under version 4, then (through a pickle, as
    a checkpoint holds it, and in a fresh pool, as after a resume) the rest under version 5. With
    a sampler that does not depend on the version, every id, mask, log-prob and record equals
    the uninterrupted episode's; each token is tagged with the version of its turn; the
    environments were rebuilt by replaying their calls (the demo's lookup environment, tools
    rendered). An episode over within the first turn is finished there, with its metadata."""
    import pickle

    from gspo_megatron.rollout.episodes.loop import finish_episodes, start_episodes

    rows = [
        {"prompt": f"What is stored under k{i}?", "key": f"k{i}", "answer": v}
        for i, v in ((3, "teal"), (8, "gold"), (5, "red"))
    ]
    prompts = [Prompt(r["prompt"], [1], r["answer"], i, r) for i, r in enumerate(rows)]

    def script(index, turn):
        if index in (2, 3) and turn == 0:
            return "gold"  # answers at once: the episode is over after its first turn
        return CALL if turn == 0 else rows[index // 2]["answer"]

    env = "episode_envs:LookupWithSchemas"
    r, whole_sampler, pool = runner(tok, env, script, max_turns=3)
    with pool:
        whole = agent_rollout(r, prompts, 2, step=7)
    r, split_sampler, pool = runner(tok, env, script, max_turns=3)
    with pool:
        state = start_episodes(r, prompts, 2, 7, turns=1, version=4)
    state = pickle.loads(pickle.dumps(state))
    r2, resumed_sampler, pool = runner(tok, env, script, max_turns=3)
    with pool:
        split = finish_episodes(r2, state, 2, 7, version=5)
    assert _comparable(split) == _comparable(whole)
    # The same engine calls, split between the two halves: the first turn before, the rest after.
    assert split_sampler.requests + resumed_sampler.requests == whole_sampler.requests
    comps = [c for g in split.groups for c in g]
    for k, c in enumerate(comps):
        first = len(tok.encode(script(k, 0), add_special_tokens=False)) + 1  # with <|im_end|>
        if k in (2, 3):  # episodes of prompt 1: over after one turn, all of it version 4
            assert c.versions == [4] * len(c.token_ids) and c.agent.turns == 1
            assert c.agent.metadata == whole.groups[1][k - 2].agent.metadata
            continue
        assert c.agent.turns == 2 and c.versions[:first] == [4] * first
        # The tool's reply came in the first half; the second turn was sampled by version 5.
        later = [(v, m) for v, m in zip(c.versions[first:], c.loss_mask[first:])]
        assert {v for v, m in later if m} == {5} and {v for v, m in later if not m} == {4}
        assert c.agent.failure is None
    assert split.extra["agent/replay_mismatches"] == 0
    assert split.extra["perf/agent_replay_seconds"] > 0
    assert whole.groups[0][0].versions is None  # only partial rollouts tag versions


def test_an_environment_that_answers_otherwise_on_replay_fails_its_episode(tok):
    """An environment whose opening is drawn from the OS (``episode_envs.Drifting``) cannot be
    rebuilt by replay: the interrupted episodes fail as ``replay`` (scored 0, counted) with
    what they sampled before kept and nothing sampled after."""
    from gspo_megatron.rollout.episodes.loop import finish_episodes, start_episodes

    rows = [{"prompt": "q", "turns": 3}]
    prompts = [Prompt("q", [1], None, 0, rows[0])]
    r, _, pool = runner(tok, "episode_envs:Drifting", lambda i, t: f"turn {t}", max_turns=3)
    with pool:
        state = start_episodes(r, prompts, 2, 0, turns=1, version=0)
        batch = finish_episodes(r, state, 2, 0, version=1)
    for c in batch.groups[0]:
        assert c.agent.failure == "replay" and c.agent.turns == 1, c.agent
        assert "answered its reset otherwise than before" in c.agent.failure_detail
        assert "\n" not in c.agent.failure_detail
        assert set(c.versions) == {0}  # nothing sampled after the failed replay
    assert batch.extra["agent/replay_mismatches"] == 2.0
    assert episode_rewards([1.0, 1.0], batch.groups[0]) == [0.0, 0.0]


def test_episodes_beyond_the_cap_wait_for_a_wave(tok):
    """agent.max_parallel_envs' share of 2 per engine: 6 episodes (3 prompts x 2) run in waves
    with never more than 2 environments live, and give exactly the episodes all 6 at once give;
    so do partial rollouts (start, then resume), whose replay runs in waves too."""
    from gspo_megatron.rollout.episodes.loop import finish_episodes, start_episodes

    rows = [
        {"prompt": f"What is stored under k{i}?", "key": f"k{i}", "answer": v}
        for i, v in ((3, "teal"), (8, "gold"), (5, "red"))
    ]
    prompts = [Prompt(r["prompt"], [1], r["answer"], i, r) for i, r in enumerate(rows)]

    def script(index, turn):
        return CALL if turn == 0 else rows[index // 2]["answer"]

    env = "episode_envs:LookupWithSchemas"
    r, _, pool = runner(tok, env, script, max_turns=3)
    with pool:
        whole = agent_rollout(r, prompts, 2, step=7)
    live = []
    r, sampler, pool = runner(tok, env, script, per_engine=2, max_turns=3)
    inner = r.sample
    r.sample = lambda requests: live.append(len(pool._episodes)) or inner(requests)
    with pool:
        waves = agent_rollout(r, prompts, 2, step=7)
        state = start_episodes(r, prompts, 2, 7, turns=1, version=4)
        split = finish_episodes(r, state, 2, 7, version=5)
    assert _comparable(waves) == _comparable(whole) and _comparable(split) == _comparable(whole)
    assert max(live) == 2 and len(sampler.requests) == 3 * 2 * 2
    assert max(len(r) for r in sampler.requests) == 2


def test_waves_hold_at_most_the_share_of_each_engine():
    """With 2 engines (episode i on engine i % 2) and 2 per engine, a wave holds at most 2 of
    each engine's episodes, in order, whatever the mix of a resumed batch's live ones."""
    envs = SharedEnvs(None, num_engines=2)
    r = EpisodeRunner(AgentConfig(environment="m:C"), None, envs, None, 64, 1024, per_engine=2)
    assert r._waves(range(7)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert r._waves([0, 2, 4, 6, 1, 8]) == [[0, 2, 1], [4, 6], [8]]
    assert EpisodeRunner(AgentConfig(environment="m:C"), None, envs, None, 64, 1024)._waves(
        [5, 3]
    ) == [[5, 3]]
