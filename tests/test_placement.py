"""rollout.placement: the settings refused in one line, the ranks' roles, the link's transfers.

The link is exercised on real gloo process groups over an in-memory store, one thread per
rank: a weight transfer delivers every tensor bit for bit in its own dtype and shape, in
buckets no larger than asked (one larger tensor alone), with its header; a batch object
arrives whole; a peer that never sends ends the wait at the group's timeout as a LinkError."""

from __future__ import annotations

import datetime
import json
import re
import threading

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, run_cli

from gspo_megatron.config import load_config
from gspo_megatron.errors import GspoError
from gspo_megatron.rollout.config import RolloutConfig
from gspo_megatron.rollout.separate import link
from gspo_megatron.rollout.separate.placement import LinkGroups, role_of
from gspo_megatron.rollout.source import Schedule, version_of
from gspo_megatron.testing.hf_reference import read_hf_tensors


@pytest.mark.parametrize(
    "settings, world, message",
    [
        ({"placement": "separate", "num_ranks": 0}, 4, "rollout.num_ranks=0: placement=separate"),
        ({"placement": "separate", "num_ranks": 4}, 4, "between 1 and 3 rollout ranks"),
        ({"placement": "separate", "num_ranks": 3, "engine_tp": 2}, 4, "must divide rollout."),
        ({"num_ranks": 2}, 4, "rollout.num_ranks=2 with rollout.placement=colocated"),
        ({"placement": "apart"}, 4, "rollout.placement='apart': allowed: colocated, separate"),
        ({"max_staleness": -1}, 4, "rollout.max_staleness=-1: must be >= 0 (0 = every batch"),
        ({"num_ranks": -1}, 4, "rollout.num_ranks=-1: must be >= 0 (0 with placement=colocated)"),
        (
            {"placement": "separate", "num_ranks": 1},
            1,
            "rollout.placement=separate needs a launch of at least 2 ranks (some train, "
            "rollout.num_ranks=1 sample), not 1: start gspo-train with torchrun",
        ),
        ({"partial": True}, 4, "rollout.partial=true with rollout.max_staleness=0: no transfer"),
        ({"partial_tokens": 8, "max_new_tokens": 8}, 4, "rollout.partial_tokens=8: must be in"),
        ({"max_token_age": -2}, 4, "rollout.max_token_age=-2: must be >= 0, or -1 (off)"),
        ({"partial_turns": -1}, 4, "rollout.partial_turns=-1: must be >= 0"),
        ({"dtype": "fp16"}, 4, "rollout.dtype='fp16': allowed: auto, bf16, fp32"),
    ],
)
def test_bad_placement_is_one_line(settings, world, message):
    with pytest.raises(GspoError, match=re.escape(message)) as err:
        RolloutConfig(**settings).validate(world)
    assert "\n" not in str(err.value)


def test_separate_placement_refuses_what_it_cannot_serve(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "w1", "answer": "1"}\n')
    (tmp_path / "ckpt").mkdir()
    base = [f"model.ckpt={tmp_path / 'ckpt'}", f"data.path={data}", f"data.eval_path={data}"]
    base += ["rollout.placement=separate", "rollout.num_ranks=1"]
    with pytest.raises(GspoError, match="train.eval_every=5: validation runs on colocated"):
        load_config(None, base + ["train.eval_every=5"]).validate(world_size=3)
    load_config(None, base).validate(world_size=3)  # fine without validation
    # What a partial rollout cannot continue across a transfer (either placement).
    partial = base[:3] + ["rollout.partial=true", "rollout.max_staleness=1"]
    for extra, message in (
        (
            ["agent.environment=episode_envs:Countdown", "agent.max_turns=1"],
            "agent.max_turns=1: an episode is interrupted between two turns",
        ),
        (
            ["agent.environment=episode_envs:Countdown", "rollout.partial_turns=4"],
            "rollout.partial_turns=4: must be below agent.max_turns=4",
        ),
        (["rollout.dynamic_sampling=true"], "needs the previous round's rewards"),
        (["loss.routing_replay=r3"], "routes from two engine calls"),
    ):
        with pytest.raises(GspoError, match=message) as err:
            load_config(None, partial + extra).validate(world_size=2)
        assert "\n" not in str(err.value)
    load_config(None, partial).validate(world_size=2)
    episodes = load_config(None, partial + ["agent.environment=episode_envs:Countdown"])
    episodes.validate(world_size=2)  # episodes continue across a transfer between turns
    assert episodes.rollout.head_turns(episodes.agent.max_turns) == 2  # half of 4
    # The layout is checked against the training ranks only.
    from gspo_megatron.rollout.config import RolloutConfig as R

    assert R(placement="separate", num_ranks=1).trainer_ranks(3) == 2
    assert R().trainer_ranks(3) == 3


def test_roles_of_a_launch():
    cfg = RolloutConfig(placement="separate", num_ranks=2, engine_tp=2)
    roles = [role_of(cfg, {"RANK": str(r), "WORLD_SIZE": "5"}) for r in range(5)]
    assert [r.kind for r in roles] == ["trainer"] * 3 + ["rollout"] * 2
    assert [(r.rank, r.world) for r in roles] == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2)]
    assert [r.link_rank for r in roles] == [0, None, None, 1, 2]
    assert {r.link_size for r in roles} == {3}
    assert role_of(RolloutConfig(), {"RANK": "0", "WORLD_SIZE": "1"}) is None
    with pytest.raises(GspoError, match="needs a torchrun launch"):
        role_of(cfg, {})


def test_the_schedule_of_versions():
    assert [version_of(j, 1, 0) for j in range(5)] == [0, 0, 1, 2, 3]
    assert [version_of(j, 0, 0) for j in range(3)] == [0, 1, 2]
    assert [version_of(j, 2, 4) for j in range(6, 9)] == [4, 5, 6]  # resumed at step 4


def _work(schedule: Schedule, versions) -> list:
    """What each version does, as both placements do it: finish what the one before left in
    flight, then start (or make whole) the batches it samples."""
    out, inflight, next_index = [], [], schedule.start
    for v in versions:
        done = [("tail", j) for j in inflight]
        inflight = []
        for j, whole in schedule.heads(v, next_index):
            done.append(("whole" if whole else "head", j))
            inflight += [] if whole else [j]
            next_index = j + 1
        out.append(done)
    return out


def test_the_schedule_of_partial_rollouts():
    # s = 1: batch k started by k - 1 and finished by k; batch 0 by version 0 alone. The last
    # version (3 of a 4-step run) starts batch 4 as a longer run would: the final checkpoint
    # carries it.
    assert _work(Schedule(1, 4, 0, partial=True), range(4)) == [
        [("whole", 0), ("head", 1)],
        [("tail", 1), ("head", 2)],
        [("tail", 2), ("head", 3)],
        [("tail", 3), ("head", 4)],
    ]
    # s = 2: the tails are made while the batch before trains (full overlap); batches 5 and 6
    # of a longer run are started by versions 3 and 4 of this 5-step one.
    assert _work(Schedule(2, 5, 0, partial=True), range(5)) == [
        [("whole", 0), ("head", 1), ("head", 2)],
        [("tail", 1), ("tail", 2), ("head", 3)],
        [("tail", 3), ("head", 4)],
        [("tail", 4), ("head", 5)],
        [("tail", 5), ("head", 6)],
    ]
    # Without partial rollouts each version makes its batches whole (the bounded staleness),
    # the last one that of the step after the run's end.
    assert _work(Schedule(1, 3, 0), range(3)) == [
        [("whole", 0), ("whole", 1)],
        [("whole", 2)],
        [("whole", 3)],
    ]
    # No version past the run's last has work: the trainer sends none.
    assert not Schedule(1, 3, 0).has_work(3, 4, ["batch 4 in flight"])
    # Resumed at step 2 (s = 1): batch 2 in flight comes back with the first transfer.
    resumed = Schedule(1, 4, 2, partial=True)
    assert resumed.heads(2, 3) == [(3, False)] and resumed.has_work(3, 4, ["batch 3"])
    assert not resumed.has_work(4, 4, [])


def test_token_ages_the_mask_and_the_staleness_metrics():
    from gspo_megatron.learner.step_samples import (
        age_mask,
        sampled_ages,
        staleness_metrics,
        token_ages,
    )
    from gspo_megatron.rollout.config import RolloutConfig as R
    from gspo_megatron.rollout.sampling import StepRollout
    from gspo_megatron.rollout.types import Completion

    spans = Completion([1, 2, 3, 4], [0.0] * 4, "stop", versions=[2, 2, 3, 3])
    short = Completion([5], [0.0], "stop", versions=[2])
    rollout = StepRollout(groups=[[spans, short]], version=2)
    ages = token_ages(rollout, 4)
    assert ages == [[2, 2, 1, 1], [2]]
    assert age_mask(None, ages[0], -1) is None  # off
    assert age_mask(None, ages[0], 1) == [0, 0, 1, 1]
    assert age_mask([1, 0, 1, 1], ages[0], 2) == [1, 0, 1, 1]  # an environment span stays out
    got = staleness_metrics(ages, R(max_token_age=1))
    assert got == {
        "rollout/staleness_mean": 8 / 5,
        "rollout/staleness_max": 2.0,
        "rollout/partial_fraction": 0.5,
        "rollout/masked_old_tokens": 3 / 5,
    }
    # A batch without per-token versions: all of them the batch's.
    plain = StepRollout(groups=[[Completion([1, 2], [0.0, 0.0], "stop")]], version=3)
    assert token_ages(plain, 4) == [[1, 1]]
    # An episode: its environment's tokens (mask 0) are in the ages, not in the metrics.
    episode = Completion([1, 2, 3], [0.0] * 3, "stop", loss_mask=[1, 0, 1], versions=[2, 3, 3])
    both = StepRollout(groups=[[episode, short]], version=2)
    ages = token_ages(both, 4)
    assert ages == [[2, 1, 1], [2]] and sampled_ages(both, ages) == [[2, 1], [2]]


def test_step_samples_follow_the_groups_with_their_advantages():
    """A step's rollouts -> samples: one per response in group order, each with its group's
    normalised advantage ((r - mean) / (sample std + 1e-6), computed here in fp64), the
    episode's opening as its prompt, the engine's log-probs, and the age-masked loss mask."""
    from gspo_megatron.data import Prompt
    from gspo_megatron.learner.step_samples import step_samples, token_ages
    from gspo_megatron.rollout.sampling import StepRollout
    from gspo_megatron.rollout.types import Completion

    prompts = [Prompt("a", [7, 8], None, 0), Prompt("b", [9], None, 1)]
    groups = [
        [Completion([1, 2], [-0.5, -0.25], "stop"), Completion([3], [-1.0], "stop")],
        [
            Completion([4, 5, 6], [-0.1] * 3, "stop", prompt_ids=[9, 10], versions=[1, 2, 2]),
            Completion([6], [-0.2], "length", versions=[2]),
        ],
    ]
    rewards = [[1.0, 0.0], [0.5, 0.5]]  # the second group: equal rewards, advantage 0
    rollout = StepRollout(prompts=prompts, groups=groups, rewards=rewards, version=2)
    made = step_samples(rollout, token_ages(rollout, 3), 2, max_token_age=1)
    sd = (0.5**2 * 2 / 1) ** 0.5  # sample std of (1, 0)
    want = [0.5 / (sd + 1e-6), -0.5 / (sd + 1e-6), 0.0, 0.0]
    assert made.advantages == pytest.approx(want, rel=1e-6)  # stored as fp32
    assert made.rewards == [1.0, 0.0, 0.5, 0.5] and made.silent_groups == 0
    assert [s.prompt_ids for s in made.samples] == [[7, 8], [7, 8], [9, 10], [9]]
    assert [s.response_ids for s in made.samples] == [[1, 2], [3], [4, 5, 6], [6]]
    assert made.samples[0].old_logprobs == [-0.5, -0.25]  # the engine's
    # max_token_age 1 at step 3: the token sampled by version 1 (age 2) is masked out.
    assert [s.response_mask for s in made.samples] == [[1, 1], [1], [0, 1, 1], [1]]
    assert [c for _, c in made.pairs] == [c for g in groups for c in g]


def _groups(n: int, timeout_s: float = 30.0):
    store = dist.HashStore()
    timeout = datetime.timedelta(seconds=timeout_s)
    out = [None] * n

    def make(r):
        out[r] = LinkGroups(dist.ProcessGroupGloo(store, r, n, timeout), None)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _run(fns):
    results, errors = [None] * len(fns), []

    def call(i):
        try:
            results[i] = fns[i]()
        except Exception as err:  # reported below, with the rank
            errors.append((i, err))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_weights_arrive_bit_for_bit_in_buckets():
    gen = torch.Generator().manual_seed(0)
    named = [
        ("a", torch.randn(3, 5, generator=gen)),
        ("b", torch.randn(7, generator=gen)),
        ("big", torch.randn(64, 4, generator=gen)),  # more than a bucket: alone
        ("half", torch.randn(4, 2, generator=gen).to(torch.bfloat16)),  # another dtype
        ("c", torch.randn(2, 2, 2, generator=gen)),
    ]
    groups = _groups(3)
    header = {"version": 7, "next_index": 9, "steps": 12, "staleness": 1}
    bucket_bytes = 30 * 4
    manifests = []
    real_bcast = link.bcast_object

    def spy(pg, obj, root, me, what):
        got = real_bcast(pg, obj, root, me, what)
        if me == 1 and isinstance(got, list):
            manifests.append([n for n, _, _ in got])
        return got

    def receiver(r):
        def run():
            h = link.receive_header(groups[r], r)
            stats = link.TransferStats()
            return h, [(n, t.clone()) for n, t in link.receive_weights(groups[r], r, stats)], stats

        return run

    link.bcast_object = spy
    try:
        results, errors = _run(
            [
                lambda: link.send_weights(groups[0], 0, iter(named), header, bucket_bytes),
                receiver(1),
                receiver(2),
            ]
        )
    finally:
        link.bcast_object = real_bcast
    assert not errors, errors
    sent = results[0]
    assert sent.version == 7 and sent.bytes == sum(t.numel() * t.element_size() for _, t in named)
    for h, got, stats in results[1:]:
        assert h == header
        assert [n for n, _ in got] == [n for n, _ in named]
        for (n, want), (_, t) in zip(named, got):
            assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want), n
        assert stats.bytes == sent.bytes
    assert manifests == [["a", "b"], ["big"], ["half"], ["c"]]


def test_a_batch_arrives_whole_and_silence_is_a_link_error():
    groups = _groups(2, timeout_s=1.0)
    batch = {"index": 3, "ids": list(range(100)), "t": torch.arange(5.0)}
    results, errors = _run(
        [
            lambda: link.recv_object(groups[0].cpu, 1, "waiting for a batch"),
            lambda: link.send_object(groups[1].cpu, batch, 0, "sending a batch"),
        ]
    )
    assert not errors, errors
    got = results[0]
    assert got["ids"] == batch["ids"] and torch.equal(got["t"], batch["t"])
    t0 = __import__("time").perf_counter()
    with pytest.raises(link.LinkError, match="waiting for a batch: .*[Tt]imed out"):
        link.recv_object(groups[0].cpu, 1, "waiting for a batch")
    assert __import__("time").perf_counter() - t0 < 10


def test_after_every_transfer_the_engine_holds_the_trainers_weights(vllm_moe, tmp_path):
    """Trainer in TP2, PP2 and EP2 (one launch: 2 training ranks + 1 rollout rank), weights
    moved off the checkpoint by seeded noise: before the transfer the engine scores its samples
    visibly otherwise, after it within fp32 rounding of the trainer's own forward."""
    out = tmp_path / "report.json"
    worker = str(REPO / "tests/workers/transfer_worker.py")
    args = [worker, "--ckpt", str(vllm_moe.ckpt), "--hf-dir", str(vllm_moe.hf_dir)]
    run_cli(args + ["--out", str(out)], nproc=3)
    report = json.loads(out.read_text())
    hf_bytes = sum(t.numel() * t.element_size() for t in read_hf_tensors(vllm_moe.hf_dir).values())
    for layout in ("tp2", "pp2", "ep2"):
        r = report[layout]
        assert r["bytes"] == hf_bytes, layout
        assert r["before"]["rollout/logprob_abs_diff_mean"] > 1e-3, (layout, r)
        assert r["after"]["rollout/logprob_diff_tokens"] > 40, (layout, r)
        # Both sides fp32, other kernels (vLLM's CPU attention and fused experts against
        # megatron's): measured ~2e-7 mean, ~1.5e-6 max per token (test_agent_rollout); the
        # issue's bound 1e-5 per token leaves a margin of about 6x on the max.
        assert r["after"]["rollout/logprob_abs_diff_max"] <= 1e-5, (layout, r)


def test_the_start_up_hand_shake_says_why_a_side_could_not_start():
    """Each side waits for the other's start (engines, model) under rollout.start_timeout_s,
    not the collective timeout; a side that failed to start ends the other's wait at once."""
    from gspo_megatron.rollout.separate.placement import LinkStartError, Role

    store = dist.HashStore()
    cfg = RolloutConfig(placement="separate", num_ranks=2)
    roles = [role_of(cfg, {"RANK": str(r), "WORLD_SIZE": "4"}) for r in range(4)]
    sides = [LinkGroups(None, None, store, role) for role in roles]
    assert isinstance(roles[0], Role) and roles[1].link_rank is None
    sides[2].ready()
    t0 = __import__("time").perf_counter()
    with pytest.raises(LinkStartError, match=r"did not start within rollout.start_timeout_s=0.5 s"):
        sides[0].wait_for_peers(0.5)  # link rank 2 (the second rollout rank) is silent
    assert __import__("time").perf_counter() - t0 < 5
    sides[3].ready(failure="rollout rank 3: vLLM cannot fit the KV cache")
    for trainer in sides[:2]:  # the training rank outside the link reads the same keys
        with pytest.raises(
            LinkStartError, match="link rank 2 could not start: rollout rank 3: vLLM"
        ):
            trainer.wait_for_peers(60)
    sides[0].ready()
    sides[2].wait_for_peers(1)  # the trainer's first rank has started
