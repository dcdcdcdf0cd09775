"""Dynamic sampling's choice of groups (``gspo_megatron.rollout.sampling``), on synthetic rewards.

The engine and the reward functions are the trainer's (tests/test_train.py runs them with
dynamic sampling on, killed and resumed); here the group-selection rules are checked on inputs
chosen so that each rule decides the outcome: a rollout function that returns fixed responses
per prompt and a score that is a plain formula of the prompt."""

from __future__ import annotations

import pytest

from gspo_megatron.data import Prompt, PromptSet
from gspo_megatron.rollout.sampling import StepRollout, draw_more, merge_reward_stats, sample_step
from gspo_megatron.rollout.types import Completion, RolloutBatch

G = 4


def _set(n=40):
    return PromptSet([Prompt(f"p{i}", [i + 1], str(i), i) for i in range(n)])


def _generate(prompts, round_):
    """G responses per prompt: token ids (prompt id, j); the round shows in the logprobs."""
    return RolloutBatch(
        [
            [Completion([p.ids[0], j], [float(round_)] * 2, "stop") for j in range(G)]
            for p in prompts
        ]
    )


def _score(flat_rows):
    """Reward j / G for response j, except 1.0 for every response to a prompt in flat_rows."""

    def score(texts):
        rewards = []
        for _prompt, response, answer in texts:
            row, j = int(answer), int(response.split()[1])
            rewards.append(1.0 if row in flat_rows else j / G)
        return rewards, {"reward/errors": 0.0, "reward/fn": sum(rewards) / len(rewards)}, None

    return score


def _decode(ids):
    return " ".join(map(str, ids))


def _run(flat_rows, dynamic=True, rounds=3, per_step=8, step=0, prompts=None):
    return sample_step(
        _generate,
        _score(flat_rows),
        _decode,
        prompts or _set(),
        step,
        per_step,
        data_seed=7,
        shuffle=True,
        dynamic=dynamic,
        max_rounds=rounds,
    )


def test_flat_groups_never_reach_the_loss_and_extra_rounds_fill_the_step():
    first = _set().batch(0, 8, 7, True)
    flat = {p.row for p in first[:5]}  # 5 of the step's 8 prompts carry no signal
    out = _run(flat)
    assert len(out.groups) == 8 and out.rounds >= 2
    assert not {p.row for p in out.prompts} & flat
    assert out.filtered_groups == 5 and out.sampled_groups >= 8 + 5
    assert [p.row for p in out.prompts[:3]] == [p.row for p in first[5:]]  # round 0's come first
    assert all(len(set(r)) > 1 for r in out.rewards)
    assert len(out.sampled_rewards) == out.sampled_groups * G  # every round's rewards count
    assert len({p.row for p in out.prompts}) == 8  # no prompt twice in a step
    assert out.stats["rollout/sampling_rounds"] == out.rounds
    assert out.stats["reward/filtered_groups"] == 5


def test_rounds_exhausted_the_step_keeps_what_it_has():
    prompts = _set()
    flat = {p.row for p in prompts.prompts[:34]}  # only rows 34..39 are informative
    out = _run(flat, rounds=2, prompts=prompts)
    assert out.rounds == 2 and 0 < len(out.groups) < 8
    assert all(p.row >= 34 for p in out.prompts)


def test_off_keeps_every_group_and_samples_once():
    first = _set().batch(0, 8, 7, True)
    out = _run({p.row for p in first[:5]}, dynamic=False)
    assert [p.row for p in out.prompts] == [p.row for p in first]
    assert out.rounds == 1 and out.filtered_groups == 0
    assert "rollout/sampling_rounds" not in out.stats


def test_extra_prompts_depend_on_seed_step_and_round_only():
    prompts = _set()
    a = draw_more(prompts, {0, 1, 2}, 5, seed=7, step=3, round_=1)
    assert [p.row for p in a] == [p.row for p in draw_more(_set(), {0, 1, 2}, 5, 7, 3, 1)]
    assert not {p.row for p in a} & {0, 1, 2}
    others = [draw_more(prompts, {0, 1, 2}, 5, *key) for key in ((8, 3, 1), (7, 4, 1), (7, 3, 2))]
    assert all([p.row for p in o] != [p.row for p in a] for o in others)
    assert len(draw_more(prompts, set(range(38)), 5, 7, 3, 1)) == 2  # the set runs out


def test_round_reward_metrics_merge_weighted_by_responses():
    merged = merge_reward_stats(
        [
            ({"reward/errors": 1.0, "reward/fn": 0.5, "perf/reward_seconds": 2.0}, 30),
            ({"reward/errors": 2.0, "reward/fn": 0.1, "perf/reward_seconds": 1.0}, 10),
        ]
    )
    assert merged["reward/errors"] == 3.0 and merged["perf/reward_seconds"] == 3.0
    # A weighted mean of float means (rel 1e-6, pytest.approx's default).
    assert merged["reward/fn"] == pytest.approx((0.5 * 30 + 0.1 * 10) / 40)


def test_rollout_types_import_no_engine_and_keep_their_old_names():
    """Reading rollouts (sampling, episodes, the link) imports no torch, numpy or vLLM; and
    checkpoints that pickled queued rollouts under a module's earlier name (the engine module's,
    before rollout/types.py) still load."""
    import pickle
    import subprocess
    import sys

    from gspo_megatron.rollout.source import load_queue

    code = (
        "import sys, gspo_megatron.rollout.types; "
        "print(sorted(m for m in ('torch', 'numpy', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    c = Completion([1, 2], [-0.5, -0.25], "stop")
    old = pickle.dumps(c, protocol=0).replace(
        b"gspo_megatron.rollout.types", b"gspo_megatron.rollout" + b".engine"
    )
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(old)  # the module is gone ...
    # A queue as dump_queue writes it, the class under its old module (protocol 0: text, so the
    # name can be replaced in place).
    data = pickle.dumps([StepRollout(groups=[[c]], index=3)], protocol=0).replace(
        b"gspo_megatron.rollout.types", b"gspo_megatron.rollout" + b".engine"
    )
    loaded = load_queue(data)  # ... and a checkpoint's queue still loads
    assert loaded[3].groups == [[c]] and isinstance(loaded[3].groups[0][0], Completion)
    assert RolloutBatch.__module__ == "gspo_megatron.rollout.types"
