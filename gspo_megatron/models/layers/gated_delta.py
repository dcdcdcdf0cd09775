"""The gated delta rule (Gated DeltaNet's recurrence) in plain torch, chunked, for CPU where
``fla``'s kernels do not run; and the causal depthwise convolution in front of it.

Per head, with a state S of shape [key dim, value dim], keys and queries L2-normalised and the
queries scaled by 1/sqrt(key dim), each position t does

    S <- exp(g_t) S;    u_t = beta_t (v_t - S^T k_t);    S <- S + k_t u_t^T;    o_t = S^T q_t.

Token by token that is a Python loop over the sequence. Within a chunk of C positions it
unrolls: with G_i the cumulative log-decay from the chunk's start and S0 the state before it,

    S_i = e^{G_i} S0 + sum_{j<=i} e^{G_i - G_j} k_j u_j^T,
    (I + A) U = beta V - beta e^{G} K S0,   A_ij = beta_i e^{G_i - G_j} k_i.k_j  (j < i),
    o_i = e^{G_i} S0^T q_i + sum_{j<=i} e^{G_i - G_j} (q_i.k_j) u_j,

so a chunk costs a unit-lower-triangular solve and a few matrix products, and only the state
crosses from chunk to chunk. Everything runs in fp32 (fp64 if given fp64) whatever the inputs'
dtype, as transformers' reference and fla's kernels accumulate; autograd gives the backward.

Sequences never share state: the caller runs each sequence of a packed row on its own
(``per_sequence``), so neither the convolution's window nor the recurrent state crosses a
boundary; a right-padded row needs nothing, since every op here is causal.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dimension (fla's and transformers' convention)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: Optional[torch.Tensor] = None,
    normalise_qk: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """query, key [b, s, h, dk]; value [b, s, h, dv]; g (log-decay, <= 0), beta [b, s, h];
    initial_state [b, h, dk, dv] (zeros if None). Returns (output [b, s, h, dv] in the inputs'
    dtype, final state [b, h, dk, dv] in the compute dtype)."""
    out_dtype = value.dtype
    work = torch.float64 if value.dtype == torch.float64 else torch.float32
    b, s, h, dk = key.shape
    dv = value.shape[-1]
    # [b, h, s, d] in the compute dtype.
    q, k, v = (x.transpose(1, 2).to(work) for x in (query, key, value))
    g, beta = (x.transpose(1, 2).to(work) for x in (g, beta))
    if normalise_qk:
        q, k = l2_normalise(q), l2_normalise(k)
    q = q * dk**-0.5

    pad = (-s) % chunk_size
    if pad:  # zero keys and betas past the end: they write nothing to the state
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (s + pad) // chunk_size
    q, k, v = (x.reshape(b, h, n, chunk_size, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, h, n, chunk_size) for x in (g, beta))

    cum = g.cumsum(-1)  # G_i within each chunk
    # e^{G_i - G_j} for j <= i, 0 above the diagonal (masked before exp: no overflow).
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    rel = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta.unsqueeze(-1)
    strict = torch.ones_like(causal).tril(-1)
    a = (kb @ k.transpose(-1, -2)) * rel * strict
    eye = torch.eye(chunk_size, dtype=work, device=q.device)
    # (I + A)^-1 applied to beta V and to beta e^{G} K: the chunk's corrections before S0.
    system = eye + a
    u_free = torch.linalg.solve_triangular(system, v * beta.unsqueeze(-1), upper=False)
    w = torch.linalg.solve_triangular(system, kb * cum.exp().unsqueeze(-1), upper=False)
    scores = (q @ k.transpose(-1, -2)) * rel  # (q_i.k_j) e^{G_i - G_j}, j <= i
    q_decayed = q * cum.exp().unsqueeze(-1)
    k_to_end = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()

    state = (
        torch.zeros(b, h, dk, dv, dtype=work, device=q.device)
        if initial_state is None
        else initial_state.to(work)
    )
    outs: List[torch.Tensor] = []
    for c in range(n):
        u = u_free[:, :, c] - w[:, :, c] @ state
        outs.append(q_decayed[:, :, c] @ state + scores[:, :, c] @ u)
        state = state * chunk_decay[:, :, c, None, None] + k_to_end[:, :, c].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(b, h, n * chunk_size, dv)[:, :, :s]
    return out.transpose(1, 2).to(out_dtype), state


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [b, s, c], weight [c, kernel]: y_t = sum_i weight[:, i] x_{t - kernel + 1 + i} (zeros
    before the start), then SiLU, as Gated DeltaNet applies to its q/k/v projections."""
    kernel = weight.shape[-1]
    y = F.conv1d(
        F.pad(x.transpose(1, 2), (kernel - 1, 0)), weight.unsqueeze(1), groups=weight.shape[0]
    )
    return F.silu(y).transpose(1, 2)


def per_sequence(
    fn: Callable[..., torch.Tensor], segments: Optional[torch.Tensor], *tensors: torch.Tensor
) -> torch.Tensor:
    """``fn(*tensors)`` over [b, s, ...] tensors, each sequence of a packed row on its own.
    ``segments`` [b, s]: which sequence each position holds, each sequence one contiguous run
    (``learner.packing``'s rows), -1 for padding; None: one sequence per row. Padding positions
    of the result are zeros."""
    if segments is None:
        return fn(*tensors)
    rows = []
    for row in range(segments.shape[0]):
        ids = segments[row].tolist()
        pieces, start = [], 0
        while start < len(ids):
            stop = start + 1
            while stop < len(ids) and ids[stop] == ids[start]:
                stop += 1
            part = [t[row : row + 1, start:stop] for t in tensors]
            if ids[start] >= 0:
                pieces.append(fn(*part)[0])
            else:  # padding: its shape from a run of fn on it, its values zeros
                pieces.append(torch.zeros_like(fn(*part)[0]))
            start = stop
        rows.append(torch.cat(pieces, dim=0))
    return torch.stack(rows, dim=0)
