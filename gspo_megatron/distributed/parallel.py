"""Parallel layout: validation against a model, and start-up of torch.distributed + megatron.

A ``ParallelLayout`` says how many ways each dimension is split. ``check_layout`` rejects a
layout that does not divide the model (heads, query groups, experts, layers, vocabulary) or the
world size, with one line naming the quantity and the divisor, before any process group or
model exists. ``init_distributed`` then brings up torch.distributed (nccl on GPU, gloo on CPU)
and megatron-core's ``parallel_state``.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from gspo_megatron.errors import GspoError

if TYPE_CHECKING:  # the models build on this module's layouts, not the other way round
    from gspo_megatron.models import ModelSpec


@dataclass(frozen=True)
class ParallelLayout:
    """How the model and the batch are split over ranks (data parallel is what is left)."""

    tp: int = 1
    """Tensor parallel: attention heads, MLP columns and the vocabulary are split."""
    pp: int = 1
    """Pipeline parallel: layers are split into stages."""
    ep: int = 1
    """Expert parallel: routed experts are split."""
    etp: Optional[int] = None
    """Expert tensor parallel: each expert's weights are split; None means the same as tp
    (megatron's default)."""
    cp: int = 1
    """Context parallel: each sequence is split."""
    pp_layers: Optional[tuple] = None
    """Decoder layers per pipeline stage, e.g. (3, 5); None splits evenly."""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


def _divides(what: str, total: int, by: int, dim: str) -> None:
    if total % by != 0:
        raise GspoError(
            f"layout does not fit the model: {what}={total} is not divisible by {dim}={by}"
        )


def check_layout(layout: ParallelLayout, spec: ModelSpec, world_size: int) -> None:
    """Reject a layout that cannot run this model on this many ranks, naming the reason."""
    for name in ("tp", "pp", "ep", "etp", "cp"):
        value = layout.expert_tp if name == "etp" else getattr(layout, name)
        if not isinstance(value, int) or value < 1:
            raise GspoError(f"layout: {name}={value!r} must be a positive integer")
    model_ranks = layout.tp * layout.pp * layout.cp
    if world_size % model_ranks != 0:
        raise GspoError(
            f"layout does not fit the world size: TP{layout.tp} x PP{layout.pp} x "
            f"CP{layout.cp} = {model_ranks} ranks do not divide world size {world_size}"
        )
    etp = layout.expert_tp
    expert_ranks = layout.ep * etp * layout.pp
    if world_size % expert_ranks != 0:
        raise GspoError(
            f"layout does not fit the world size: EP{layout.ep} x ETP{etp} x "
            f"PP{layout.pp} = {expert_ranks} ranks do not divide world size {world_size}"
        )
    # The model's family says which of its sizes each parallel dimension splits.
    for what, total, by, dim in spec.layout_divisions(layout):
        _divides(what, total, by, dim)
    if spec.is_moe:
        if layout.ep == 1 and etp != layout.tp:
            # With EP=1 megatron treats expert weights as dense parameters and reduces their
            # gradients over data parallelism only; experts replicated over TP ranks that saw
            # different tokens would then get partial gradients.
            raise GspoError(f"layout: with ep=1, etp must equal tp (got etp={etp}, tp={layout.tp})")
    elif layout.ep > 1 or (layout.etp is not None and layout.etp != layout.tp):
        raise GspoError(
            f"layout: EP{layout.ep}/ETP{etp} needs a MoE model; "
            f"{spec.architecture} has no experts (use ep=1, etp unset)"
        )
    if layout.pp_layers is not None:
        if len(layout.pp_layers) != layout.pp or any(n < 1 for n in layout.pp_layers):
            raise GspoError(
                f"layout: pp_layers={list(layout.pp_layers)} must list {layout.pp} "
                f"positive layer counts, one per pipeline stage"
            )
        if sum(layout.pp_layers) != spec.num_layers:
            raise GspoError(
                f"layout: pp_layers={list(layout.pp_layers)} sums to "
                f"{sum(layout.pp_layers)}, the model has {spec.num_layers} layers"
            )
    else:
        _divides("num_hidden_layers", spec.num_layers, layout.pp, "PP")


def parse_pp_layers(text: Optional[str]) -> Optional[tuple]:
    """'3,5' -> (3, 5); empty -> None."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise GspoError(
            f"--pp-layers '{text}': expected comma-separated layer counts, e.g. 3,5"
        ) from None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(layout: ParallelLayout, seed: int = 1234, timeout_s: float = 1800.0) -> None:
    """Start torch.distributed from the torchrun environment and megatron's parallel_state.

    Single-process runs without torchrun get a one-rank group on a free local port, so the same
    code path serves `python -m` and `torchrun`. ``timeout_s`` bounds every collective, in the
    world group and in megatron's groups alike (megatron would otherwise give its own groups
    30 minutes): a hung or dead rank ends the run after that long.
    """
    # Here, not at the top: the pre-flight checks layouts through this module without megatron.
    from megatron.core import parallel_state, tensor_parallel

    from gspo_megatron.distributed import cpu_compat, cpu_perf

    use_cuda = torch.cuda.is_available()
    cpu_compat.apply_if_needed()
    cpu_perf.apply()
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {}
        if "RANK" not in os.environ:  # not under torchrun: a private one-rank group
            kwargs = dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    # As megatron's trainers do: the default generators get the same seed on every rank of a
    # pipeline stage, so weights created outside the model-parallel RNG tracker (replicated
    # norms and routers, CPU-initialised master weights that each TP rank slices) agree across
    # tensor- and data-parallel replicas (megatron DDP does not broadcast initial weights).
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now, chosen below the kernel's
    ephemeral range: a port the kernel hands out itself (``bind(0)``) is one it also hands to
    other processes' outgoing connections (gloo's, vLLM's), and between our check and the
    launcher's listen one took it (EADDRINUSE in the suite, under two test workers)."""
    low = _ephemeral_low()
    # Its own generator: the module's is seeded alike on every rank (init_distributed).
    candidates = random.Random().sample(range(10000, low), 64) if low > 10064 else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, its default, elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
