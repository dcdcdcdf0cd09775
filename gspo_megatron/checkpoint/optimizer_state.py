"""The optimizer's part of a training checkpoint: megatron's distributed optimizer over torch's
Adam (no apex / TE, as on CPU), saved in a layout-free form, and the three things its save and
load need to be exact with torch's Adam.

``RESHARDABLE`` (megatron's ``fully_reshardable``) gathers each data-parallel group's shards at
save and stores every parameter's master weight and Adam moments in the parameter's own shape,
keyed like the model: a run resumes in any tensor / pipeline / expert / context / data-parallel
layout. ``DP_RESHARDABLE`` stores the flat per-rank buffers as they are (no gather, fully
parallel), which only a layout with the same model-parallel split can read back
(``train.reshardable_checkpoints: false``; the pre-flight refuses another layout in one line).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

RESHARDABLE = "fully_reshardable"
DP_RESHARDABLE = "dp_reshardable"


def optim_metadata(sharding_type: str) -> dict:
    """The ``metadata`` megatron's distributed optimizer takes to choose its saved format. A
    layout-free format also keys the state without megatron's ``chained_K.`` prefix: the number
    of chained optimizers (dense and expert parameters apart or not) depends on the layout."""
    return {
        "distrib_optim_sharding_type": sharding_type,
        "chained_optim_avoid_prefix": sharding_type == RESHARDABLE,
    }


def _distributed(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.is_stub_optimizer:
            yield opt


def materialise_optimizer_state(optimizer) -> None:
    """A fresh optimizer over torch's Adam has no state until its first step: the distributed
    optimizer's state_dict() then fails on the missing Adam 'step' (megatron asserts one step
    count), and the plain one saves no optimizer state at all, which a resume takes for a
    model-only checkpoint. This runs before a load (which overwrites all of it), and before a
    save that comes ahead of the first optimizer step (a run whose first steps had nothing to
    train on). Creates exactly what torch's Adam creates at its first step, without taking one:
    step 0, zero moments. The first real step then computes what it would have from no state
    (megatron's own placeholder, a zero-gradient step, would move the weights under weight decay
    and count a step)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state):
            continue
        if not isinstance(inner, torch.optim.Adam):
            if isinstance(opt, DistributedOptimizer):  # another optimizer class: megatron's own
                opt._init_optimizer_states_with_dummy_values()
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
                inner.state[p] = state


@contextlib.contextmanager
def keeping_adam_steps(optimizer) -> Iterator[None]:
    """megatron's fully_reshardable load copies every entry of torch Adam's per-parameter state
    from the checkpoint, which stores the step count once (with the param groups) and not per
    parameter: a KeyError on 'step' (its code expects apex / TE's Adam, which keeps no
    per-parameter step). During the load each parameter's own step, which megatron has just set
    from the loaded param groups, is carried through."""
    patched = []
    for opt in _distributed(optimizer):
        original = opt._set_main_param_and_optimizer_states

        def carry_step(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state[main].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step.clone()}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = carry_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again


def restore_adam_steps(optimizer) -> None:
    """torch's Adam keeps its step count per parameter; megatron's distributed optimizer saves it
    once per param group and restores it, but the dp_reshardable parameter state then copies the
    step of the placeholder state over it: Adam's bias correction would restart and the resumed
    run would drift from the uninterrupted one. Set the per-parameter steps from the (correctly
    loaded) group value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def _chained_parts(loaded: dict) -> list:
    """A loaded optimizer state and, for a chained optimizer, its per-optimizer entries (int
    keys)."""
    return [loaded] + [v for k, v in loaded.items() if isinstance(k, int)]


def _zero_step_counts(loaded: dict) -> dict:
    """megatron's plain (not distributed) optimizer saves Adam's shared step count only when it
    is non-zero (``if step:``): a state saved before any optimizer step (zero moments, from
    ``materialise_optimizer_state``) comes back without one, which torch's Adam cannot load
    (KeyError 'step'). Its step count is 0."""
    for part in _chained_parts(loaded):
        state = part.get("state") if isinstance(part, dict) else None
        if not isinstance(state, dict) or "common_step" in state:
            continue
        if any(isinstance(s, dict) and s and "step" not in s for s in state.values()):
            state["common_step"] = torch.tensor(0.0)
    return loaded


def fit_to_layout(optimizer, loaded: dict) -> dict:
    """The loaded optimizer state in the shape this layout's optimizer expects. megatron chains
    one distributed optimizer per parameter kind where the layout separates them (dense and
    expert parameters under expert parallelism), and the non-tensor part of its state (param
    groups, the format's name) is nested the same way: a checkpoint of one chain read into
    another puts it where nothing looks (``Expected 2 entries in state dict, but got 4``).
    The tensors were loaded by their model keys, into this layout's structure; the param groups
    are rebuilt from this optimizer's own (its hyper-parameters are the config's), with the
    saved step count, the only thing in them the checkpoint has to supply."""
    subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if not subs or not all(type(o).__name__ == "DistributedOptimizer" for o in subs):
        return _zero_step_counts(loaded)
    parts = [p for p in _chained_parts(loaded) if isinstance(p, dict)]
    steps = {
        g["step"]
        for p in parts
        if "optimizer" in p
        for g in p["optimizer"]["param_groups"]
        if g.get("step") is not None
    }
    if len(steps) > 1:
        raise ValueError(f"optimizer state with several step counts {sorted(steps)}")
    sharding = next(
        p["param_state_sharding_type"] for p in parts if "param_state_sharding_type" in p
    )
    states = (
        [loaded["param_state"]]
        if len(subs) == 1
        else [loaded[i]["param_state"] for i in range(len(subs))]
    )
    fitted = []
    for opt, param_state in zip(subs, states):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.optimizer.param_groups]
        for g in groups:
            if steps:
                g["step"] = next(iter(steps))
        fitted.append(
            {
                "optimizer": {"param_groups": groups},
                "param_state": param_state,
                "param_state_sharding_type": sharding,
            }
        )
    return fitted[0] if len(fitted) == 1 else dict(enumerate(fitted))
