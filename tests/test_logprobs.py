"""Chunked log-probs and entropy: forward and backward exact against fp64 log_softmax."""

from __future__ import annotations

import pytest
import torch

from gspo_megatron.learner.logprobs import vocab_parallel_logprobs


def reference(logits, targets, vocab_size):
    x = logits[..., :vocab_size].double()
    logp_all = torch.log_softmax(x, -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# The chunked fp32 log-softmax against fp64: logits of size ~10 over 100 classes, rounded in fp32
# (eps 1.2e-7) through a log-sum-exp: ~1e-6 at worst; 1e-5 allowed. bfloat16 logits are upcast
# to fp32 before any arithmetic, so the same bound holds against the fp64 of those same logits.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_backward_match_fp64(dtype, tol, chunk, inplace):
    g = torch.Generator().manual_seed(0)
    B, S, V, Vp = 3, 7, 100, 128  # 28 padding columns that must not count
    base = (torch.randn(B, S, Vp, generator=g) * 4).to(dtype)
    targets = torch.randint(0, V, (B, S), generator=g)
    w_lp, w_ent = torch.randn(B, S, generator=g), torch.randn(B, S, generator=g)

    x = base.clone().requires_grad_(True)
    logits = x * 1.0  # a non-leaf, as the model's output is (in-place backward overwrites it)
    logp, ent = vocab_parallel_logprobs(
        logits, targets, V, chunk_size=chunk, inplace_backward=inplace
    )
    ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()

    y = base.double().requires_grad_(True)
    r_logp, r_ent = reference(y, targets, V)
    ((r_logp * w_lp.double()).sum() + (r_ent * w_ent.double()).sum()).backward()

    assert logp.dtype == torch.float32 and logp.shape == (B, S)
    assert torch.allclose(logp.double(), r_logp, atol=tol, rtol=0)
    assert torch.allclose(ent.double(), r_ent, atol=tol, rtol=0)
    # The gradient is rounded to the logits' dtype once: compare within that rounding.
    eps = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(x.grad.double(), y.grad, atol=eps, rtol=eps)
    assert (x.grad[..., V:] == 0).all()


def test_forward_does_not_modify_logits_and_no_grad_path():
    logits = torch.randn(4, 50)
    before = logits.clone()
    with torch.no_grad():
        logp, _ = vocab_parallel_logprobs(logits, torch.arange(4), 50, chunk_size=3)
    assert torch.equal(logits, before)
    # fp32 against fp32 in another summation order (chunks of 3): allclose's rtol 1e-5.
    assert torch.allclose(logp, torch.log_softmax(before, -1)[torch.arange(4), torch.arange(4)])


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4]], requires_grad=True)
    logp, ent = vocab_parallel_logprobs(logits, torch.tensor([1, 0]), 3)
    (logp.sum() + ent.sum()).backward()
    assert (
        torch.isfinite(logp).all()
        and torch.isfinite(ent).all()
        and torch.isfinite(logits.grad).all()
    )
