"""The CPU layer: each patch does its job, stays inside megatron's modules, never runs on GPU."""

from __future__ import annotations

import pytest
import torch

from gspo_megatron.distributed import cpu_compat


@pytest.fixture(scope="module", autouse=True)
def applied():
    cpu_compat.apply()


def test_global_torch_is_untouched():
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")  # the proxy is per megatron module, not global
    assert torch.cuda.is_available() is False


def test_default_causal_mask_is_built_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))


def test_rotary_embedding_runs_on_cpu_and_matches_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000)
    emb = rope(6)  # [S, 1, 1, D]
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    freqs = torch.outer(torch.arange(6, dtype=torch.float32), inv)
    assert emb.device.type == "cpu"
    # The same fp32 products as the formula's (allclose's rtol 1e-5 leaves room for a fused
    # multiply-add in megatron's kernel): a device or layout mix-up is O(1) off.
    assert torch.allclose(emb[:, 0, 0], torch.cat([freqs, freqs], -1))


def test_rng_tracker_forks_and_restores_without_cuda():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-state", 123)
    before = torch.get_rng_state()
    with tracker.fork("test-state"):
        pass
    assert torch.equal(before, torch.get_rng_state())  # default CPU generator unaffected
    assert "test-state" in tracker.get_states()


def test_router_gemm_without_transformer_engine():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    # One fp32 matmul of 4-element dot products against another: within allclose's rtol 1e-5.
    assert torch.allclose(out, x @ w.t())


def test_refuses_to_run_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must never run on a GPU machine"):
        cpu_compat.apply()
    assert cpu_compat.apply_if_needed() is False


def test_expert_bias_counting_runs_eagerly():
    """Routers with an expert bias (GLM-4.5's) count tokens per expert in a function megatron
    compiles with torch.compile; on CPU it runs eagerly (no C++ compiled at run time) and counts
    what the routing map says."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.router import TopKRouter

    fn = TopKRouter._apply_expert_bias
    assert not hasattr(fn, "_torchdynamo_orig_callable")
    router = SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(4))
    routing_map = torch.tensor([[True, False, True, False], [True, True, False, False]])
    with torch.enable_grad():
        fn(router, routing_map)
    assert router.local_tokens_per_expert.tolist() == [2.0, 1.0, 1.0, 0.0]
