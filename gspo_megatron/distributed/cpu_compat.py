"""Run megatron-core on CPU with the gloo backend.

megatron-core has no CPU mode: a handful of call sites allocate on ``"cuda"``, ask for
``torch.cuda.current_device()``, synchronise CUDA or read the CUDA RNG. This module rewrites
exactly those sites, and only when CUDA is absent (``apply()`` refuses to run on a GPU machine),
so that the same model code trains on a laptop and in CI. Everything is scoped per module: the
global ``torch`` is never touched, each patched megatron module sees a thin proxy of ``torch``
instead.

Each patch names the reason it exists; ``tests/test_cpu_compat.py`` checks each one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Iterator

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.distrib_optimizer as distrib
import megatron.core.optimizer.optimizer as mcore_optimizer
import megatron.core.tensor_parallel.random as mrandom
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.transformer.moe.router as mrouter
import torch

_APPLIED = False

# megatron-core modules whose module-level ``torch`` is replaced by the CPU proxy, with why.
_PROXIED_MODULES = {
    # get_default_causal_mask() allocates on device="cuda".
    "megatron.core.transformer.utils": "causal mask allocated on cuda",
    # RotaryEmbedding moves inv_freq to torch.cuda.current_device().
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to cuda",
    # The router places its weight and aux-loss scalars on torch.cuda.current_device().
    "megatron.core.transformer.moe.router": "router tensors on cuda",
    # MoE aux-loss tracker allocates on "cuda"; unpermute records CUDA streams.
    "megatron.core.transformer.moe.moe_utils": "aux-loss tracker on cuda",
    # Schedules allocate the token counter on "cuda".
    "megatron.core.pipeline_parallel.schedules": "token counter on cuda",
    # p2p shape exchange allocates on the current CUDA device and calls torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.p2p_communication": "p2p buffers on cuda",
    # The model-parallel RNG tracker reads and writes the CUDA generator.
    "megatron.core.tensor_parallel.random": "CUDA RNG state",
    # The pipeline-parallel embedding/output tie all-reduce and grad sync place scalars on cuda.
    "megatron.core.distributed.finalize_model_grads": "grad-sync scalars on cuda",
    # The optimizer's grad-norm and found-inf scalars live on cuda.
    "megatron.core.optimizer.clip_grads": "grad-norm scalars on cuda",
    "megatron.core.optimizer.optimizer": "found-inf scalars on cuda",
    "megatron.core.optimizer.distrib_optimizer": "optimizer buffers on cuda",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on cuda",
    "megatron.core.distributed.distributed_data_parallel": "grad buffers on cuda",
    "megatron.core.transformer.module": "fp16 wrapper moves modules to cuda",
    # The CP slice of rotary embeddings builds a pinned index tensor and moves it to cuda.
    "megatron.core.models.common.embeddings.rope_utils": "pinned cp index moved to cuda",
    # GlobalMemoryBuffer (attention's matmul scratch, SP all-gather buffers) allocates on cuda.
    "megatron.core.utils": "scratch buffers on current cuda device",
    "megatron.core.tensor_parallel.layers": "weights and buffers on current cuda device",
    "megatron.core.tensor_parallel.mappings": "collective buffers on current cuda device",
    # Checkpoint saving stages tensors with non-blocking copies, then torch.cuda.synchronize().
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "checkpoint staging syncs cuda",
    # The save's finalisation all-reduces its failure flag as a tensor on the current cuda device.
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save-failure flag on cuda",
    "megatron.core.dist_checkpointing.strategies.async_utils": "save-liveness flag on cuda",
    # Tensors exchanged between ranks on load are staged on cuda.
    "megatron.core.dist_checkpointing.exchange_utils": "load exchange buffers on cuda",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True  # a bare int means a CUDA ordinal to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device_kwargs(kwargs: dict) -> dict:
    if _is_cuda_device(kwargs.get("device")):
        kwargs = dict(kwargs, device="cpu")
    if kwargs.get("pin_memory"):
        kwargs = dict(kwargs, pin_memory=False)  # pinning needs an accelerator
    return kwargs


class _Stream:
    """Stand-in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuRngStandIn:
    """Holds the generator that stands in for "the CUDA generator" of the RNG tracker.

    The tracker only needs somewhere to save, seed and restore states. On CPU nothing draws from
    this generator (dropout is off in this project and weights come from checkpoints), so the
    tracker's bookkeeping works without disturbing the default CPU generator.
    """

    def __init__(self) -> None:
        self.generator = torch.Generator()

    def get_rng_state(self, *args, **kwargs) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, *args, **kwargs) -> None:
        self.generator.set_state(state)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))


def _make_cuda_namespace(rng: _CpuRngStandIn) -> types.SimpleNamespace:
    real = torch.cuda

    def _stream_ctx(*args, **kwargs):
        return _Stream()

    ns = types.SimpleNamespace(
        current_device=lambda: "cpu",
        is_available=lambda: False,
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        Stream=_Stream,
        Event=_Stream,
        current_stream=lambda *a, **k: _Stream(),
        stream=_stream_ctx,
        get_rng_state=rng.get_rng_state,
        set_rng_state=rng.set_rng_state,
        manual_seed=rng.manual_seed,
        manual_seed_all=rng.manual_seed,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
        random=types.SimpleNamespace(get_rng_state=rng.get_rng_state),
    )
    # Anything not listed falls back to the real module (types, flags, helpers).
    for name in dir(real):
        if not name.startswith("__") and not hasattr(ns, name):
            setattr(ns, name, getattr(real, name))
    return ns


class _CpuTorch(types.ModuleType):
    """A ``torch`` look-alike for one megatron module: factory functions that ask for a CUDA
    device get the CPU instead, and ``torch.cuda`` is the CPU stand-in above."""

    _FACTORIES = (
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "as_tensor",
    )

    def __init__(self, cuda_ns: types.SimpleNamespace) -> None:
        super().__init__("torch")
        self.cuda = cuda_ns
        for name in self._FACTORIES:
            real_fn = getattr(torch, name)
            setattr(self, name, self._cpu_factory(real_fn))

    @staticmethod
    def _cpu_factory(real_fn):
        def factory(*args, **kwargs):
            return real_fn(*args, **_cpu_device_kwargs(kwargs))

        factory.__name__ = real_fn.__name__
        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_cuda_methods():
    """``Tensor.cuda`` / ``Module.cuda`` become the identity (megatron calls them on buffers).

    The only global replacement: on a machine without CUDA these can only raise, so mapping them
    to the identity cannot change the meaning of any working program.
    """
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _patch_rng_helpers(rng: _CpuRngStandIn) -> None:
    # _get/_set_cuda_rng_state go through torch.cuda.default_generators and _lazy_call.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: rng.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: rng.set_rng_state(state)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, ``tensor.type()`` names CPU tensors as their CUDA counterparts.

    megatron's optimizers sort parameters by ``param.type() == 'torch.cuda.FloatTensor'`` (and
    the Half/BFloat16 variants) and assert it in gradient clipping. Scoped to those calls only.
    """
    real = torch.Tensor.type

    def named_as_cuda(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if (
            not args
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            return "torch.cuda." + out[len("torch.") :]
        return out

    torch.Tensor.type = named_as_cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = real  # type: ignore[method-assign]


def _scoped(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_optimizer_type_checks() -> None:
    distrib.DistributedOptimizer.__init__ = _scoped(distrib.DistributedOptimizer.__init__)
    mcore_optimizer.Float16OptimizerWithFloat16Params.__init__ = _scoped(
        mcore_optimizer.Float16OptimizerWithFloat16Params.__init__
    )
    wrapped = _scoped(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    mcore_optimizer.clip_grad_by_total_norm_fp32 = wrapped


def _patch_missing_te_gemm() -> None:
    # router_gating_linear tests `te_general_gemm is not None`, but the name is only bound when
    # Transformer Engine imports; without TE the test raises NameError.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_compiled_expert_bias() -> None:
    # TopKRouter._apply_expert_bias (routers with an expert bias: GLM-4.5's) is wrapped in
    # torch.compile (megatron's jit_fuser). On CPU inductor compiles C++ for it at the first
    # call: that needs a compiler, costs seconds, and fails under ATEN_CPU_CAPABILITY=default
    # (measured with torch 2.13: the generated code names at::vec, which it does not declare
    # there). Eager, it is one sum over the routing map.
    fn = mrouter.TopKRouter._apply_expert_bias
    mrouter.TopKRouter._apply_expert_bias = getattr(fn, "_torchdynamo_orig_callable", fn)


def apply() -> None:
    """Make megatron-core run on CPU. Refuses on a machine with CUDA: there it must not run."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "gspo_megatron.distributed.cpu_compat.apply() called on a machine with CUDA; "
            "the CPU compatibility layer must never run on a GPU machine"
        )

    rng = _CpuRngStandIn()
    proxy = _CpuTorch(_make_cuda_namespace(rng))
    for module_name in _PROXIED_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    _patch_rng_helpers(rng)
    _patch_missing_te_gemm()
    _patch_optimizer_type_checks()
    _patch_compiled_expert_bias()
    _patch_cuda_methods()
    _APPLIED = True


def apply_if_needed() -> bool:
    """Apply the CPU layer when CUDA is absent. Returns whether it is active."""
    if torch.cuda.is_available():
        _patch_missing_te_gemm()  # a megatron bug that also bites GPU machines without TE
        return False
    apply()
    return True
