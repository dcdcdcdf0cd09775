"""Policy losses against fp64 references written directly from the formulas in docs/gspo.md.

Tolerances: everything runs in float64 (the fixture below), the loss and its reference adding
the same <= 42 token terms of size <= ~3 in different orders, so they agree to ~1e-15
(``FP64_ATOL``'s derivation); rtol 1e-12 for values and 1e-10 for gradients (which pass through
exp and division once more) leave 1000x of that. A definition got wrong is off by >= 1e-3. The
default allclose (rtol 1e-5, atol 1e-8) is used where a quantity is compared with its own
formula in another arrangement (a sum of micro-batches, a closed form), far above fp64 rounding
and far below any mistake in a count or a normaliser (>= 1/6 here)."""

from __future__ import annotations

import pytest
import torch

from gspo_megatron.loss import LOG_RATIO_CLAMP, PolicyLossConfig, group_advantages, policy_loss

_CALL = ("ref_logprobs", "rollout_logprobs", "num_sequences", "num_tokens")


def loss_of(lp, old, adv, mask, **kw):
    """policy_loss with the ``loss:`` settings among ``kw`` made into its PolicyLossConfig."""
    call = {k: kw.pop(k) for k in _CALL if k in kw}
    return policy_loss(lp, old, adv, mask, PolicyLossConfig(**kw), **call)


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def ref_objective(
    lp,
    old,
    adv,
    mask,
    variant,
    low,
    high,
    clamp=LOG_RATIO_CLAMP,
    tau_pos=1.0,
    tau_neg=1.05,
    correction="none",
    roll=None,
    cap=2.0,
    c_low=0.5,
    c_high=2.0,
):
    """The loss with plain Python loops over sequences and tokens, from the definitions:
    -(1/N) sum_i c_i J_i, N the non-empty sequences (cispo: the response tokens), c_i the
    sequence correction (mis; tis for gspo) and c_t the token correction inside J_i (tis,
    icepop). Gradients flow through ``lp`` where the definitions say (sg[...] = detach)."""

    def ratio(x):
        return torch.exp(torch.clamp(x, -clamp, clamp))

    token_terms = variant != "gspo"
    total, count, tokens = 0.0, 0, 0
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not toks:
            continue
        count, tokens = count + 1, tokens + len(toks)
        a = adv[i]
        c_seq, c_tok = 1.0, {t: 1.0 for t in toks}
        if correction != "none":
            rho_i = ratio(sum(old[i, t] - roll[i, t] for t in toks) / len(toks))
            for t in toks:
                rho_t = ratio(old[i, t] - roll[i, t])
                if correction == "tis" and token_terms:
                    c_tok[t] = torch.clamp(rho_t, max=cap)
                elif correction == "icepop":
                    c_tok[t] = float(c_low <= rho_t <= c_high)
            if correction == "tis" and not token_terms:
                c_seq = torch.clamp(rho_i, max=cap)
            elif correction == "mis":
                c_seq = float(c_low <= rho_i <= c_high)
        log_s = sum(lp[i, t] - old[i, t] for t in toks) / len(toks)
        s = ratio(log_s)
        if variant == "gspo":
            j = torch.minimum(s * a, torch.clamp(s, 1 - low, 1 + high) * a)
        else:
            acc = 0.0
            for t in toks:
                w = ratio(lp[i, t] - old[i, t])
                if variant == "gspo_token":
                    st = s.detach() * torch.exp(lp[i, t] - lp[i, t].detach())
                    term = torch.minimum(st * a, torch.clamp(st, 1 - low, 1 + high) * a)
                elif variant == "grpo":
                    term = torch.minimum(w * a, torch.clamp(w, 1 - low, 1 + high) * a)
                elif variant == "sapo":
                    tau = tau_neg if a < 0 else tau_pos
                    term = torch.sigmoid(tau * (w - 1)) * 4 / tau * a
                else:  # cispo
                    term = torch.clamp(w, max=1 + high).detach() * a * lp[i, t]
                acc = acc + c_tok[t] * term
            j = acc if variant == "cispo" else acc / len(toks)
        total = total + c_seq * j
    return -total / max(tokens if variant == "cispo" else count, 1)


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
    ("sapo", 0.2, 0.27),
    ("cispo", 0.2, 0.1),
]


def test_every_objective_has_a_reference_case():
    """A variant added to the registry without a reference case here fails this test."""
    from gspo_megatron.loss import OBJECTIVES

    assert {case[0] for case in REFERENCE_CASES} == set(OBJECTIVES)


@pytest.mark.parametrize("variant,low,high", REFERENCE_CASES)
def test_value_and_gradient_match_reference(variant, low, high):
    lp, old, adv, mask = _batch(spread=0.1)
    x = lp.clone().requires_grad_(True)
    loss, metrics = loss_of(x, old, adv, mask, variant=variant, clip_low=low, clip_high=high)
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
        loss, m = loss_of(x, old, adv, mask, variant=variant, clip_low=0.01, clip_high=0.012)
        loss.backward()
        out[variant] = (loss.detach(), x.grad, m["clip_fraction"])
    assert 0 < out["gspo"][2] < 1  # some sequences clipped, some not: both branches exercised
    for a, b in zip(out["gspo"], out["gspo_token"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_gspo_gradient_is_uniform_over_tokens_and_scaled_by_length():
    """Unclipped: d loss / d logp_t = -s_i A_i / |y_i| / num_sequences for every token of i."""
    lp, old, adv, mask = _batch(seed=1, spread=0.0)  # s_i = 1: inside any clip range
    x = lp.clone().requires_grad_(True)
    loss, _ = loss_of(x, old, adv, mask, variant="gspo")
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
    loss, m = loss_of(x, old, adv, mask, variant="gspo", clip_low=low, clip_high=high)
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
        loss, _ = loss_of(lp, old, adv, mask, variant=variant, clip_low=lo, clip_high=hi)
        assert torch.allclose(loss, ref_objective(lp, old, adv, mask, variant, lo, hi))


def test_empty_rows_add_nothing_and_all_empty_is_zero():
    lp, old, adv, mask = _batch()
    keep = mask.any(1)
    full, _ = loss_of(lp, old, adv, mask)
    only, _ = loss_of(lp[keep], old[keep], adv[keep], mask[keep])
    assert torch.allclose(full, only)
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, torch.zeros_like(mask))
    loss.backward()
    assert loss == 0 and torch.isfinite(x.grad).all() and (x.grad == 0).all()
    assert all(torch.isfinite(v).all() for v in m.values())


@pytest.mark.parametrize("variant", ["gspo", "gspo_token", "grpo", "sapo", "cispo"])
def test_extreme_log_ratios_are_clamped_finite(variant):
    lp = torch.tensor([[0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
    old = torch.tensor([[-500.0, -800.0, -300.0], [-1.1, -2.0, -0.9]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, mask, variant=variant, clip_low=0.2, clip_high=0.27)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    token_ratios = variant in ("grpo", "sapo", "cispo")
    expected = 3 / 6 if token_ratios else 0.5  # 3 of 6 tokens / one of 2 sequences
    assert m["clamp_fraction"] == expected
    ref = ref_objective(lp, old, adv, mask, variant, 0.2, 0.27)
    assert torch.allclose(loss, ref)


def test_num_sequences_normalises_across_microbatches():
    lp, old, adv, mask = _batch(seed=5)
    full, _ = loss_of(lp, old, adv, mask)
    parts = sum(
        loss_of(lp[s], old[s], adv[s], mask[s], num_sequences=5)[0]
        for s in (slice(0, 2), slice(2, 6))
    )
    assert torch.allclose(full, parts)


def test_kl_penalty_k3():
    lp, old, adv, mask = _batch(seed=6)
    ref_lp = lp + 0.2 * torch.randn_like(lp)
    base, _ = loss_of(lp, old, adv, mask)
    with_kl, m = loss_of(lp, old, adv, mask, ref_logprobs=ref_lp, kl_coef=0.1)
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
    _, m = loss_of(lp, old, adv, mask, variant="grpo", clip_low=0.2, clip_high=0.27)
    deltas = (lp - old)[mask.bool()]
    assert m["token_log_ratio_std"] == pytest.approx(deltas.std(unbiased=False).item(), rel=1e-9)


# -- sapo, cispo ---------------------------------------------------------------------------------


def test_sapo_far_from_one_both_signs_and_length_one_rows():
    """w from ~0.05 to ~20 (a spread of 1.5 in log-ratio), advantages of both signs (so both
    temperatures), rows of one token: value and gradient equal the reference's; on-policy
    (w = 1) the gate's slope is 1, so the gradient is GRPO's exactly."""
    lp, old, adv, mask = _batch(seed=7, spread=1.5, lengths=[1, 7, 1, 4, 1, 6])
    assert (adv > 0).any() and (adv < 0).any()
    kw = {"sapo_tau_pos": 0.7, "sapo_tau_neg": 1.3}
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, mask, variant="sapo", **kw)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    ref = ref_objective(y, old, adv, mask, "sapo", 0.2, 0.27, tau_pos=0.7, tau_neg=1.3)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12) and torch.allclose(x.grad, y.grad, rtol=1e-10)
    assert m["clip_fraction"] == 0
    grads = {}
    for variant in ("sapo", "grpo"):
        x = lp.clone().requires_grad_(True)
        loss_of(x, lp, adv, mask, variant=variant, **kw)[0].backward()
        grads[variant] = x.grad
    assert torch.allclose(grads["sapo"], grads["grpo"], rtol=1e-12, atol=1e-15)


def test_cispo_gradient_flows_only_through_logp_with_a_capped_weight():
    """d loss / d logp_t = -min(w_t, 1 + clip_high) A_i / (response tokens of the batch): the
    weight carries no gradient, is truncated where w_t is above the cap (and only there), and
    every token keeps a gradient (nothing is clipped away)."""
    lp, old, adv, mask = _batch(seed=8, spread=0.4)
    high = 0.1
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, mask, variant="cispo", clip_high=high)
    loss.backward()
    w = torch.exp(lp - old)
    capped = (w > 1 + high) & mask
    assert 0 < capped.sum() < mask.sum()
    want = -torch.clamp(w, max=1 + high) * adv[:, None] / mask.sum() * mask
    assert torch.allclose(x.grad, want, rtol=1e-12, atol=1e-15)
    assert m["clip_fraction"] == pytest.approx(float(capped.sum() / mask.sum()))


def test_cispo_normalises_by_the_tokens_of_the_whole_batch():
    """Micro-batches given the global token count add up to the full batch's loss (the
    sequence count would not)."""
    lp, old, adv, mask = _batch(seed=9, spread=0.3)
    full, _ = loss_of(lp, old, adv, mask, variant="cispo", clip_high=0.2)
    n = float(mask.sum())
    parts = [
        loss_of(lp[s], old[s], adv[s], mask[s], variant="cispo", clip_high=0.2, num_tokens=n)[0]
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert torch.allclose(full, sum(parts), rtol=1e-12)


# -- rollout correction --------------------------------------------------------------------------

CORRECTION_CASES = [
    (variant, correction)
    for variant in ("gspo", "gspo_token", "grpo", "sapo", "cispo")
    for correction in ("tis", "mis", "icepop")
    if not (variant == "gspo" and correction == "icepop")
]
_CORR = {"correction_cap": 1.15, "correction_low": 0.85, "correction_high": 1.2}
_REF_CORR = {"cap": 1.15, "c_low": 0.85, "c_high": 1.2}


def _rollout(old, mask, seed=11, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    return old + spread * torch.randn(old.shape, generator=g)


@pytest.mark.parametrize("variant,correction", CORRECTION_CASES)
def test_rollout_correction_matches_reference(variant, correction):
    """Engine log-probs 0.3 from pi_old's (per token; less per sequence): the cap binds and the
    range masks for some units and not others, in value and in gradient."""
    lp, old, adv, mask = _batch(seed=10, spread=0.1)
    roll = _rollout(old, mask)
    low, high = (0.2, 0.27) if variant != "gspo" else (0.05, 0.1)
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(
        x,
        old,
        adv,
        mask,
        variant=variant,
        clip_low=low,
        clip_high=high,
        rollout_correction=correction,
        rollout_logprobs=roll,
        **_CORR,
    )
    loss.backward()
    y = lp.clone().requires_grad_(True)
    ref = ref_objective(
        y, old, adv, mask, variant, low, high, correction=correction, roll=roll, **_REF_CORR
    )
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-14)
    # The metrics, from the definitions: units are tokens for token weights, else sequences.
    token_form = correction == "icepop" or (correction == "tis" and variant != "gspo")
    if token_form:
        rho = torch.exp(old - roll)[mask]
    else:
        rho = torch.stack(
            [torch.exp((old[i] - roll[i])[mask[i]].mean()) for i in range(6) if mask[i].any()]
        )
    if correction == "tis":
        weight, changed = rho.clamp(max=1.15), rho > 1.15
    else:
        keep = (rho >= 0.85) & (rho <= 1.2)
        weight, changed = keep.double(), ~keep
    assert 0 < changed.sum() < rho.numel()  # the correction binds for some units only
    assert m["correction_weight_mean"] == pytest.approx(weight.mean().item(), rel=1e-12)
    assert m["correction_masked_fraction"] == pytest.approx(changed.double().mean().item())
    assert m["rho_min"] == rho.min() and m["rho_max"] == rho.max()


def test_rollout_correction_changes_nothing_when_engine_and_trainer_agree():
    lp, old, adv, mask = _batch(seed=12, spread=0.2)
    for variant, correction in CORRECTION_CASES:
        kw = {"variant": variant, "clip_low": 0.2, "clip_high": 0.27}
        plain, _ = loss_of(lp, old, adv, mask, **kw)
        same, m = loss_of(
            lp, old, adv, mask, rollout_correction=correction, rollout_logprobs=old, **kw
        )
        assert torch.equal(plain, same), (variant, correction)
        assert m["correction_weight_mean"] == 1 and m["correction_masked_fraction"] == 0


def test_icepop_refuses_an_objective_without_token_terms():
    lp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="icepop"):
        loss_of(lp, old, adv, mask, rollout_correction="icepop", rollout_logprobs=old)


@pytest.mark.parametrize("variant,correction", CORRECTION_CASES)
def test_corrections_on_empty_rows_and_extreme_ratios_stay_finite(variant, correction):
    """No response tokens at all: loss 0, gradient 0, no NaN anywhere. Engine log-probs 800
    nats away: weights, loss and gradient finite (the log-ratios are clamped)."""
    lp, old, adv, mask = _batch(seed=13, spread=0.2)
    kw = {"variant": variant, "clip_low": 0.2, "clip_high": 0.27, "rollout_correction": correction}
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, torch.zeros_like(mask), rollout_logprobs=old - 5, **kw)
    loss.backward()
    assert loss == 0 and (x.grad == 0).all()
    assert all(not torch.isnan(v).any() for v in m.values())
    for far in (old - 800.0, old + 800.0):
        x = lp.clone().requires_grad_(True)
        loss, m = loss_of(x, old, adv, mask, rollout_logprobs=far, **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(m[k]) for k in ("correction_weight_mean", "rho_min", "rho_max"))


# -- float64 exactness ---------------------------------------------------------------------------

# The two sides sum the same <= 42 token terms of size <= ~3 in different orders: the rounding
# bound is 42 x 2.2e-16 (fp64 eps) x 3 ~ 3e-14, the observed difference <= 2.2e-16. A setting
# rounded to float32 anywhere (1.05 -> 1.0499999523) moves the loss by ~1e-8.
FP64_ATOL = 1e-14


@pytest.mark.parametrize(
    "variant,correction", [(v, "none") for v, _, _ in REFERENCE_CASES[1:]] + CORRECTION_CASES
)
def test_every_objective_meets_its_fp64_reference_with_float32_as_the_default(variant, correction):
    """The loss runs in the log-probs' dtype whatever torch's default dtype is: with float64
    inputs and the default left at float32 (as in a program that did not change it), value and
    gradient equal the fp64 reference to rounding. SAPO's temperatures, built from Python floats,
    once became float32 tensors here."""
    low, high = dict((v, (lo, hi)) for v, lo, hi in REFERENCE_CASES[1:])[variant]
    for seed in range(5):
        lp, old, adv, mask = _batch(seed=seed, spread=0.1)
        roll = _rollout(old, mask)
        torch.set_default_dtype(torch.float32)
        try:
            kw = {"variant": variant, "clip_low": low, "clip_high": high}
            kw.update(sapo_tau_pos=0.7, sapo_tau_neg=1.3)
            if correction != "none":
                kw.update(rollout_correction=correction, rollout_logprobs=roll, **_CORR)
            x = lp.clone().requires_grad_(True)
            loss, _ = loss_of(x, old, adv, mask, **kw)
            loss.backward()
        finally:
            torch.set_default_dtype(torch.float64)
        assert loss.dtype == torch.float64
        y = lp.clone().requires_grad_(True)
        extra = {} if correction == "none" else {"correction": correction, "roll": roll}
        ref = ref_objective(
            y, old, adv, mask, variant, low, high, tau_pos=0.7, tau_neg=1.3, **extra, **_REF_CORR
        )
        ref.backward()
        assert abs(loss.item() - ref.item()) <= FP64_ATOL, (variant, correction, seed)
        assert (x.grad - y.grad).abs().max().item() <= FP64_ATOL, (variant, correction, seed)


# -- advantages of rewards of any size -----------------------------------------------------------


def test_group_advantages_of_any_finite_reward():
    """The advantage is scale-free: rewards x 1e300 (whose float64 squares overflow) or
    +-1.7e308 (whose sums overflow) give the advantages of the same rewards at ordinary scale
    (the eps term, 1e-6 against a std of ~1e300, vanishes), finite; rewards of ordinary size
    give the same bits as the unscaled formula."""
    from gspo_megatron.loss.advantages import reward_mean_std

    base = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.25, 0.5, 0.75, 1.0])
    want = group_advantages(base, 4, eps=0.0)
    for scale in (1e300, 1.7e308, 1e-30):
        got = group_advantages(base * scale, 4, eps=0.0 if scale < 1 else 1e-6)
        assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-6), scale
    extreme = torch.tensor([1.7e308, -1.7e308, 1.7e308, -1.7e308])
    assert torch.allclose(
        group_advantages(extreme, 4), (torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.8660254).float()
    )
    g = base[4:]
    assert torch.equal(group_advantages(base, 4)[4:], ((g - g.mean()) / (g.std() + 1e-6)).float())
    mean, std = reward_mean_std(base * 1e300)
    assert mean == pytest.approx(float(base.mean()) * 1e300) and std == pytest.approx(
        float(base.std()) * 1e300
    )
    assert reward_mean_std(extreme)[1] == torch.finfo(torch.float64).max  # beyond range: capped


def test_groups_whose_differences_vanish_are_counted():
    """Rewards that differ by less than the advantage's eps by 300 orders of magnitude give
    advantages that underflow float32 to 0: the group teaches nothing although its rewards
    differ, and silent_groups counts it (equal-reward groups are not counted: they carry no
    signal by definition)."""
    from gspo_megatron.loss.advantages import equal_reward_groups, silent_groups

    r = torch.tensor([0.0, 1e-300, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(r, 4)
    assert (adv[:8] == 0).all() and (adv[8:] != 0).all()
    assert equal_reward_groups(r, 4).tolist() == [False, True, False]
    assert silent_groups(r, adv, 4) == 1


def _multi_turn_batch(seed=20):
    """Rows of a multi-turn episode's response: model turns between environment spans (tool
    results, template separators; mask 0), one row with a single model token, one with none.
    Environment positions hold garbage log-probs: nothing of them may reach the loss."""
    lp, old, adv, _ = _batch(seed=seed, B=6, T=12, spread=0.2)
    pattern = [
        "111001110011",
        "000000000100",
        "000000000000",
        "110000011111",
        "011101110110",
        "111111000000",
    ]
    mask = torch.tensor([[c == "1" for c in row] for row in pattern])
    return lp, old, adv, mask


def _garbage(x, mask, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask, x, 40 * torch.randn(x.shape, generator=g) - 20)


MULTI_TURN_CASES = [(v, lo, hi, "none") for v, lo, hi in REFERENCE_CASES] + [
    (v, 0.2, 0.27, c) for v, c in CORRECTION_CASES
]


@pytest.mark.parametrize("variant,low,high,correction", MULTI_TURN_CASES)
def test_multi_turn_masks_count_only_the_models_tokens(variant, low, high, correction):
    """Every objective (and correction, and the KL term) on a response whose mask has holes
    equals the fp64 reference over the model's tokens only, |y_i| counting them alone; the
    log-probs at environment positions (trainer's, pi_old's, the engine's, the reference's)
    change neither the value nor the gradient, and no gradient reaches them."""
    lp, old, adv, mask = _multi_turn_batch()
    roll = _rollout(old, mask)
    kw = dict(variant=variant, clip_low=low, clip_high=high)
    if correction != "none":
        kw.update(rollout_correction=correction, rollout_logprobs=roll, **_CORR)
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, mask, **kw)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    ref = ref_objective(
        y, old, adv, mask, variant, low, high, correction=correction, roll=roll, **_REF_CORR
    )
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-14)
    assert m["num_tokens"] == mask.sum() and m["num_sequences"] == 5
    # Garbage wherever the environment wrote: bit for bit the same loss, gradient and metrics.
    z = _garbage(lp, mask, 1).requires_grad_(True)
    kw2 = dict(kw)
    if correction != "none":
        kw2["rollout_logprobs"] = _garbage(roll, mask, 3)
    loss2, m2 = loss_of(z, _garbage(old, mask, 2), adv, mask, **kw2)
    loss2.backward()
    assert torch.equal(loss2, loss)
    assert torch.equal(z.grad, x.grad)
    assert not z.grad[~mask].any()
    for k, v in m.items():
        assert torch.equal(m2[k], v), k


def test_multi_turn_kl_penalty_ignores_environment_tokens():
    lp, old, adv, mask = _multi_turn_batch(seed=21)
    ref_lp = lp + 0.1
    x = lp.clone().requires_grad_(True)
    loss, m = loss_of(x, old, adv, mask, kl_coef=0.1, ref_logprobs=ref_lp)
    loss.backward()
    z = _garbage(lp, mask, 4).requires_grad_(True)
    loss2, m2 = loss_of(
        z, _garbage(old, mask, 5), adv, mask, kl_coef=0.1, ref_logprobs=_garbage(ref_lp, mask, 6)
    )
    loss2.backward()
    assert torch.equal(loss2, loss) and torch.equal(z.grad, x.grad)
    assert torch.equal(m2["ref_kl"], m["ref_kl"])
    # k3 at d = 0.1 on every model token: the mean over the model's tokens of each row.
    k3 = torch.exp(torch.tensor(0.1)) - 0.1 - 1
    assert m["ref_kl"].item() == pytest.approx(k3.item(), rel=1e-12)
