"""Policy losses against fp64 references written directly from the formulas in docs/gspo.md."""

from __future__ import annotations

import pytest
import torch

from gspo_megatron.loss import LOG_RATIO_CLAMP, group_advantages, policy_loss


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def ref_objective(lp, old, adv, mask, variant, low, high, clamp=LOG_RATIO_CLAMP):
    """Per-sequence J_i with plain Python loops; returns the loss (mean over non-empty rows)."""
    total, count = 0.0, 0
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not toks:
            continue
        count += 1
        a = adv[i]
        if variant in ("gspo", "gspo_token"):
            log_s = sum(lp[i, t] - old[i, t] for t in toks) / len(toks)
            s = torch.exp(torch.clamp(log_s, -clamp, clamp))
            total = total + torch.minimum(s * a, torch.clamp(s, 1 - low, 1 + high) * a)
        else:
            acc = 0.0
            for t in toks:
                w = torch.exp(torch.clamp(lp[i, t] - old[i, t], -clamp, clamp))
                acc = acc + torch.minimum(w * a, torch.clamp(w, 1 - low, 1 + high) * a)
            total = total + acc / len(toks)
    return -total / max(count, 1)


def _batch(seed=0, B=6, T=7, spread=0.3, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + spread * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = lengths or [T, 1, 0, 3, T - 1, 2][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return lp, old, adv, mask


REFERENCE_CASES = [
    ("gspo", 3e-4, 4e-4),
    ("gspo", 0.05, 0.1),
    ("gspo_token", 0.05, 0.1),
    ("grpo", 0.2, 0.27),
]


def test_every_objective_has_a_reference_case():
    """A variant added to the registry without a reference case here fails this test."""
    from gspo_megatron.loss import OBJECTIVES

    assert {case[0] for case in REFERENCE_CASES} == set(OBJECTIVES)


@pytest.mark.parametrize("variant,low,high", REFERENCE_CASES)
def test_value_and_gradient_match_reference(variant, low, high):
    lp, old, adv, mask = _batch(spread=0.1)
    x = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(x, old, adv, mask, variant=variant, clip_low=low, clip_high=high)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    ref = ref_objective(y, old, adv, mask, variant, low, high)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert metrics["num_sequences"] == 5  # the empty row is not counted


def test_gspo_token_equals_gspo_in_value_and_gradient():
    lp, old, adv, mask = _batch(seed=3, spread=0.05)
    out = {}
    for variant in ("gspo", "gspo_token"):
        x = lp.clone().requires_grad_(True)
        loss, m = policy_loss(x, old, adv, mask, variant=variant, clip_low=0.01, clip_high=0.012)
        loss.backward()
        out[variant] = (loss.detach(), x.grad, m["clip_fraction"])
    assert 0 < out["gspo"][2] < 1  # some sequences clipped, some not: both branches exercised
    for a, b in zip(out["gspo"], out["gspo_token"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_gspo_gradient_is_uniform_over_tokens_and_scaled_by_length():
    """Unclipped: d loss / d logp_t = -s_i A_i / |y_i| / num_sequences for every token of i."""
    lp, old, adv, mask = _batch(seed=1, spread=0.0)  # s_i = 1: inside any clip range
    x = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, variant="gspo")
    loss.backward()
    n = mask.sum(1)
    for i in range(lp.shape[0]):
        if n[i]:
            expected = -adv[i] / n[i] / 5
            assert torch.allclose(x.grad[i][mask[i]], expected.expand(int(n[i])))
        assert (x.grad[i][~mask[i]] == 0).all()


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
@pytest.mark.parametrize("side", ["low", "high"])
def test_clip_boundaries(adv_sign, side):
    """One token per sequence so log s is set exactly; ratios just inside and outside each bound."""
    low, high = 3e-4, 4e-4
    bound = 1 - low if side == "low" else 1 + high
    ratios = torch.tensor([bound * (1 - 1e-5), bound * (1 + 1e-5)])
    old = torch.zeros(2, 1)
    lp = torch.log(ratios)[:, None]
    adv = torch.full((2,), adv_sign)
    mask = torch.ones(2, 1, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, variant="gspo", clip_low=low, clip_high=high)
    loss.backward()
    # PPO's rule: clipping binds (gradient 0) when the ratio is past the bound in the direction
    # the advantage pushes: above 1+high for A>0, below 1-low for A<0.
    outside = 0 if side == "low" else 1
    binds = (side == "high") == (adv_sign > 0)
    for k in range(2):
        clipped_here = binds and k == outside
        if clipped_here:
            assert x.grad[k, 0] == 0
        else:
            assert torch.allclose(x.grad[k, 0], -ratios[k] * adv[k] / 2)
    assert m["clip_fraction"] == (0.5 if binds else 0.0)
    ref = ref_objective(lp, old, adv, mask, "gspo", low, high)
    assert torch.allclose(loss, ref)


def test_length_one_responses():
    lp, old, adv, mask = _batch(seed=2, lengths=[1, 1, 1, 1, 1, 1], spread=0.0001)
    for variant, lo, hi in (("gspo", 3e-4, 4e-4), ("grpo", 0.2, 0.27)):
        loss, _ = policy_loss(lp, old, adv, mask, variant=variant, clip_low=lo, clip_high=hi)
        assert torch.allclose(loss, ref_objective(lp, old, adv, mask, variant, lo, hi))


def test_empty_rows_add_nothing_and_all_empty_is_zero():
    lp, old, adv, mask = _batch()
    keep = mask.any(1)
    full, _ = policy_loss(lp, old, adv, mask)
    only, _ = policy_loss(lp[keep], old[keep], adv[keep], mask[keep])
    assert torch.allclose(full, only)
    x = lp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, torch.zeros_like(mask))
    loss.backward()
    assert loss == 0 and torch.isfinite(x.grad).all() and (x.grad == 0).all()
    assert all(torch.isfinite(v).all() for v in m.values())


@pytest.mark.parametrize("variant", ["gspo", "gspo_token", "grpo"])
def test_extreme_log_ratios_are_clamped_finite(variant):
    lp = torch.tensor([[0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
    old = torch.tensor([[-500.0, -800.0, -300.0], [-1.1, -2.0, -0.9]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, variant=variant, clip_low=0.2, clip_high=0.27)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    expected = 0.5 if variant != "grpo" else 3 / 6  # one of 2 sequences / 3 of 6 tokens
    assert m["clamp_fraction"] == expected
    ref = ref_objective(lp, old, adv, mask, variant, 0.2, 0.27)
    assert torch.allclose(loss, ref)


def test_num_sequences_normalises_across_microbatches():
    lp, old, adv, mask = _batch(seed=5)
    full, _ = policy_loss(lp, old, adv, mask)
    parts = sum(
        policy_loss(lp[s], old[s], adv[s], mask[s], num_sequences=5)[0]
        for s in (slice(0, 2), slice(2, 6))
    )
    assert torch.allclose(full, parts)


def test_kl_penalty_k3():
    lp, old, adv, mask = _batch(seed=6)
    ref_lp = lp + 0.2 * torch.randn_like(lp)
    base, _ = policy_loss(lp, old, adv, mask)
    with_kl, m = policy_loss(lp, old, adv, mask, ref_logprobs=ref_lp, kl_coef=0.1)
    d = ref_lp - lp
    k3 = torch.exp(d) - d - 1
    per_seq = [(k3[i][mask[i]]).mean() for i in range(6) if mask[i].any()]
    expected_kl = sum(per_seq) / len(per_seq)
    assert torch.allclose(with_kl - base, 0.1 * expected_kl)
    assert torch.allclose(m["ref_kl"], expected_kl)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4)
    g = r[:4]
    assert torch.allclose(a[:4], ((g - g.mean()) / (g.std() + 1e-6)).float())
    assert (a[4:] == 0).all() and torch.isfinite(a).all()
    assert torch.allclose(group_advantages(r, 4, scale_by_std=False)[:4], (g - g.mean()).float())
    assert (group_advantages(torch.tensor([0.3, 0.9]), 1) == 0).all()


def test_token_log_ratio_spread_is_the_std_over_response_tokens():
    lp, old, adv, mask = _batch(seed=4, lengths=[7, 3, 0, 5, 1, 6])
    _, m = policy_loss(lp, old, adv, mask, variant="grpo", clip_low=0.2, clip_high=0.27)
    deltas = (lp - old)[mask.bool()]
    assert m["token_log_ratio_std"] == pytest.approx(deltas.std(unbiased=False).item(), rel=1e-9)
