"""The gated delta rule of Gated DeltaNet (Qwen3.5 / Qwen3-Next's linear attention), chunked in
plain torch for CPU (``models/layers/gated_delta.py``), against the recurrence itself written
token by token (``_token_by_token`` below, in float64) and against transformers' token-by-token
reference (``torch_recurrent_gated_delta_rule``, which computes in fp32 whatever it is given):
outputs, final state and every input's gradient, on sequences longer than a chunk, from a zero
and from a given state; and packed rows, where no state may cross from one sequence to the next.

Tolerances. In float64 the chunked and the token-by-token orders of summation agree to 5e-16
here (outputs up to 0.4): 1e-9 leaves six orders of magnitude, while a wrong decay, a missing
beta or a state carried across a boundary moves outputs by more than 1e-2. Against transformers'
fp32 computation the difference is fp32 rounding accumulated over 150 positions (1e-7 measured,
outputs and states): 1e-5, for CPUs whose kernels round otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import torch_recurrent_gated_delta_rule

from gspo_megatron.models.layers.gated_delta import (
    causal_depthwise_conv,
    gated_delta_rule,
    per_sequence,
)

TOL = 1e-9


def _inputs(b=2, s=150, h=3, dk=16, dv=8, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        query=torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64),
        key=torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64),
        value=torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64),
        # Decays in (0, 1) as Gated DeltaNet makes them (-A softplus(a + dt_bias)), betas sigmoid.
        g=-F.softplus(torch.randn(b, s, h, generator=gen, dtype=torch.float64)) * 0.5,
        beta=torch.sigmoid(torch.randn(b, s, h, generator=gen, dtype=torch.float64)),
    )
    for t in x.values():
        t.requires_grad_(grad)
    return x


def _transformers(x, initial_state=None):
    return torch_recurrent_gated_delta_rule(
        **x, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )


def _token_by_token(x, initial_state=None):
    """The recurrence as written in the module's docstring, one position at a time (float64)."""
    q, k = (t / (t.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for t in (x["query"], x["key"]))
    q = q / q.shape[-1] ** 0.5
    b, s, h, dk = k.shape
    state = torch.zeros(b, h, dk, x["value"].shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state
    outs = []
    for t in range(s):
        state = state * x["g"][:, t].exp()[..., None, None]
        kt = k[:, t].unsqueeze(-1)  # [b, h, dk, 1]
        u = x["beta"][:, t, :, None] * (x["value"][:, t] - (state * kt).sum(-2))
        state = state + kt * u.unsqueeze(-2)
        outs.append((state * q[:, t].unsqueeze(-1)).sum(-2))
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("chunk_size", [64, 32])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_rule_equals_the_token_by_token_reference(chunk_size, with_state):
    x = _inputs()
    state = torch.randn(2, 3, 16, 8, dtype=torch.float64) if with_state else None
    want, want_state = _token_by_token(x, state)
    got, got_state = gated_delta_rule(**x, chunk_size=chunk_size, initial_state=state)
    assert (got - want).abs().max() <= TOL and (got_state - want_state).abs().max() <= TOL
    assert want.abs().max() > 0.1  # outputs of a size where a wrong term would show
    theirs, theirs_state = _transformers(x, state)
    assert (got - theirs).abs().max() <= 1e-5 and (got_state - theirs_state).abs().max() <= 1e-5


def test_chunked_rule_gradients_equal_the_references():
    x, y = _inputs(s=90, grad=True), _inputs(s=90, grad=True)
    w = torch.randn(2, 90, 3, 8, dtype=torch.float64)
    (gated_delta_rule(**x, chunk_size=32)[0] * w).sum().backward()
    (_token_by_token(y)[0] * w).sum().backward()
    for name in x:
        diff = (x[name].grad - y[name].grad).abs().max()
        assert diff <= TOL and y[name].grad.abs().max() > 1e-3, name


def test_fp32_follows_the_reference_to_fp32_rounding():
    """The trainer's dtype: fp32 inputs are computed in fp32. Against the float64 recurrence the
    error is fp32 rounding grown over 150 positions (1.4e-7 measured); 1e-4 is the suite's fp32
    log-prob bound."""
    x = _inputs()
    want, _ = _token_by_token(x)
    got, _ = gated_delta_rule(**{k: v.float() for k, v in x.items()})
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= 1e-4


def test_packed_sequences_share_no_state():
    """A row holding three sequences and padding, run per sequence, equals each sequence run
    alone (the padding gets zeros); the same row run as one sequence does not, so state carried
    across a boundary would be caught."""
    x = _inputs(b=1, s=100, grad=False)
    lengths = [30, 45, 15]  # 90 tokens, then 10 of padding
    segments = torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)] + [-1] * 10])
    names = ("query", "key", "value", "g", "beta")

    def rule(*t):
        return gated_delta_rule(*t, chunk_size=16)[0]

    packed = per_sequence(rule, segments, *(x[n] for n in names))
    start = 0
    for n in lengths:
        alone, _ = _token_by_token({k: x[k][:, start : start + n] for k in names})
        assert (packed[:, start : start + n] - alone).abs().max() <= TOL
        start += n
    assert packed[:, 90:].abs().max() == 0
    whole = rule(*(x[n] for n in names))
    assert (whole[:, 30:90] - packed[:, 30:90]).abs().max() > 1e-2


def test_causal_convolution_equals_a_padded_conv1d():
    """transformers' fallback: nn.Conv1d(groups=channels, padding=kernel-1), cut to the length,
    then SiLU."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 12, 4, groups=12, padding=3, bias=False).double()
    x = torch.randn(2, 33, 12, dtype=torch.float64)
    want = F.silu(conv(x.transpose(1, 2))[:, :, :33]).transpose(1, 2)
    got = causal_depthwise_conv(x, conv.weight.squeeze(1))
    assert (got - want).abs().max() <= TOL
