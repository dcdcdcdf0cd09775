"""The CPU speed-ups compute what they replace: megatron's distributed optimizer on one rank
(``gspo_megatron.distributed.cpu_perf``), torch's fused AdamW kernel (``optim.fuse_adam_on_cpu``), and
object exchanges on a world of one (``gspo_megatron.distributed.exchange``)."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist

from gspo_megatron.learner.optim import fuse_adam_on_cpu


def test_a_one_rank_collective_is_skipped_only_where_its_result_is_already_in_place():
    from gspo_megatron.distributed.cpu_perf import _skip_on_one_rank
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    calls = []
    skipping = _skip_on_one_rank(lambda out, inp, group=None, async_op=False: calls.append(1))
    buf = torch.arange(8.0)
    assert skipping(buf.view(1, -1)[0], buf, group=dist.group.WORLD) is None and calls == []
    # Not the same memory (a copy into another tensor): the collective still runs.
    skipping(torch.empty(8), buf, group=dist.group.WORLD)
    assert calls == [1]


def test_a_world_of_one_exchanges_objects_without_gloo(monkeypatch):
    """One rank: the object comes back as it is, and torch.distributed is not called (gloo
    would copy its pickle on gloo's own thread, which starts a second OpenMP pool and leaves
    libgomp sleeping at every barrier for the rest of the run: gspo_megatron.distributed.exchange)."""
    from gspo_megatron.distributed.exchange import all_gather_objects
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())

    def refuse(*args, **kwargs):
        raise AssertionError("an object exchange through gloo on a world of one")

    monkeypatch.setattr(dist, "all_gather_object", refuse)
    big = {i: list(range(64)) for i in range(1000)}  # its pickle: far more than 32768 bytes
    assert [id(x) for x in all_gather_objects(big)] == [id(big)]


def test_one_rank_object_collectives_hand_back_copies_without_gloo(monkeypatch):
    """megatron's checkpoint save calls torch's all_gather_object and gather_object on a world
    of one too: they hand back a copy of the object (as the exchange would) and run no gloo
    collective (gspo_megatron.distributed.cpu_perf)."""
    import torch.distributed.distributed_c10d as c10d

    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())

    def refuse(*args, **kwargs):
        raise AssertionError("a gloo collective for an object on a world of one")

    monkeypatch.setattr(c10d, "all_gather", refuse)
    monkeypatch.setattr(c10d, "gather", refuse)
    obj = {"shards": [list(range(50)) for _ in range(100)], "name": "step_3"}
    gathered = [None]
    dist.all_gather_object(gathered, obj)
    assert gathered == [obj] and gathered[0] is not obj
    gathered = [None]
    dist.gather_object(obj, gathered, dst=0)
    assert gathered == [obj] and gathered[0] is not obj
    with pytest.raises(ValueError, match="gather_list"):
        dist.gather_object(obj, None, dst=0)


# One process, two OpenMP threads, a world of one: the thread count before and after a large
# object collective through the stand-in, then through torch's own (the control: gloo's copy
# on its thread starts an OpenMP pool there, one more thread for good).
_THREADS_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from gspo_megatron.distributed import cpu_perf
torch.set_num_threads(2)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % int(sys.argv[1]), rank=0, world_size=1)
cpu_perf.apply()
big = list(range(200000))  # a pickle of ~1 MB
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
dist.all_gather_object([None], big)
dist.gather_object(big, [None], dst=0)
ours = threads()
dist.all_gather_object.__wrapped__([None], big)
print(before, ours, threads())
"""


def test_one_rank_object_collectives_start_no_openmp_pool_on_gloos_thread(tmp_path):
    import subprocess
    import sys

    from gspo_megatron.distributed.parallel import free_port

    run = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    before, ours, torchs = map(int, run.stdout.split()[-3:])
    assert ours == before, "the one-rank stand-ins started a thread"
    assert torchs == before + 1, "control: torch's own collective should start gloo's pool"


def _one_process_update(ckpt, distributed: bool, steps: int = 2):
    from gspo_megatron.checkpoint.model import checkpoint_spec, load_model_checkpoint
    from gspo_megatron.distributed.ddp import wrap_for_training
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.learner.batch import Sample
    from gspo_megatron.learner.optim import OptimConfig, build_optimizer, torch_optimizers
    from gspo_megatron.learner.update import build_minibatches, train_step
    from gspo_megatron.loss import PolicyLossConfig
    from gspo_megatron.models import build_model

    init_distributed(ParallelLayout())
    spec = checkpoint_spec(ckpt)
    model = build_model(spec, ParallelLayout())
    load_model_checkpoint(model, ckpt, spec)
    ddp = wrap_for_training(model, use_distributed_optimizer=distributed)
    optimizer = build_optimizer(
        ddp, OptimConfig(lr=1e-2, weight_decay=0.01, use_distributed_optimizer=distributed)
    )
    rng = random.Random(0)
    samples = []
    for _ in range(8):
        prompt = [rng.randrange(spec.vocab_size) for _ in range(5)]
        response = [rng.randrange(spec.vocab_size) for _ in range(7)]
        logp = [-3 * rng.random() for _ in response]
        samples.append(Sample(prompt, response, rng.gauss(0, 1), logp))
    cfg = PolicyLossConfig(num_minibatches=1, old_logprobs="rollout", micro_batch_size=4)
    [mbs], seq_len = build_minibatches(samples, cfg)
    for _ in range(steps):
        out = train_step(ddp, optimizer, mbs, cfg, spec.vocab_size, seq_len)
        assert out["train/update_successful"] == 1.0
    fused = [g["fused"] for inner in torch_optimizers(optimizer) for g in inner.param_groups]
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}, fused


def test_the_distributed_optimizer_on_one_rank_steps_like_the_plain_one(tiny_moe):
    """With nothing to exchange, megatron's distributed optimizer (its self-collectives skipped)
    and its plain one end at the same weights, bit for bit, both through the fused kernel."""
    sharded, fused_sharded = _one_process_update(tiny_moe.ckpt, distributed=True)
    plain, fused_plain = _one_process_update(tiny_moe.ckpt, distributed=False)
    assert all(fused_sharded) and all(fused_plain)
    assert sharded.keys() == plain.keys()
    for key, value in plain.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.equal(sharded[key], value), key


def _steps(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_fused_adam_on_cpu_is_torchs_fused_kernel_also_after_a_state_load(decoupled):
    """The hook makes torch's default AdamW step as ``fused=True`` does (the reference), every
    step, even after load_state_dict brings back parameter groups saved unfused."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(300, 7, generator=gen), torch.randn(11, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(6)]
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))

    ref = [p.clone().requires_grad_() for p in init]
    _steps(cls(ref, fused=True, **kw), ref, grads)

    ours = [p.clone().requires_grad_() for p in init]
    opt = cls(ours, **kw)
    fuse_adam_on_cpu(opt)
    _steps(opt, ours, grads[:3])
    # A checkpoint of the same run saved by an unfused optimizer: its groups say fused=None.
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["fused"], group["foreach"] = None, None
    opt.load_state_dict(state)
    _steps(opt, ours, grads[3:])
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)

    unfused = [p.clone().requires_grad_() for p in init]
    _steps(cls(unfused, foreach=False, **kw), unfused, grads)
    # What the fused kernel changes: rounding, a few float32 ulps of weights of order 1 after
    # 6 steps (the update itself is about lr = 1e-2, so this is 1e-5 of it).
    for a, b in zip(ours, unfused):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
