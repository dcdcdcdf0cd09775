"""Log-probabilities and entropy of sampled tokens from vocabulary-parallel logits.

The output layer leaves each tensor-parallel rank with a slice of the (padded) vocabulary:
``logits`` is [..., V/TP] in the model dtype. ``vocab_parallel_logprobs`` computes
log p(target) and the entropy over the real vocabulary without ever forming full-vocabulary
logits on a rank, and without an fp32 copy of the whole slice either:

- Tokens are processed in chunks (``default_chunk_size``); only a chunk is ever upcast to fp32,
  and each chunk needs two fp32 buffers.
- Across TP ranks, per chunk: one all-reduce (MAX) for the row maxima, one (SUM) carrying
  sum(exp), sum(exp * logit) and the target's logit together.
- Backward needs no communication: it recomputes each chunk's softmax from the saved logits and
  the saved global log-normaliser. With ``inplace_backward`` the gradient is written into the
  logits' own storage chunk by chunk (the logits are dead once their gradient exists), so the
  backward pass allocates nothing of size [tokens, vocab].
- Padding rows of the vocabulary (ids >= ``vocab_size``) are excluded from the softmax, so the
  result equals log_softmax over the real vocabulary, as HF computes it.

Shapes: N tokens (any leading dims, flattened), Vl = V_padded / TP.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _tp_group_info(group) -> Tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        vocab_size: int,
        chunk_size: int,
        group,
        inplace_backward: bool,
    ):
        rank, world = _tp_group_info(group)
        n, vl = logits.shape
        vocab_start = rank * vl
        real = max(0, min(vl, vocab_size - vocab_start))  # real (unpadded) columns on this rank
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            c = hi - lo
            x = logits[lo:hi, :real].to(torch.float32, copy=True)  # [c, real], ours to edit
            if real > 0:
                m = x.max(dim=1).values
            else:
                m = torch.full((c,), float("-inf"), device=logits.device)
            if world > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            x.sub_(m[:, None])
            e = torch.exp(x)
            local_t = targets[lo:hi] - vocab_start
            here = (local_t >= 0) & (local_t < real)
            t_logit = torch.zeros(c, device=logits.device)
            rows = here.nonzero(as_tuple=True)[0]
            t_logit[rows] = x[rows, local_t[rows]]
            # sum_j e_j x_j as a row-wise dot product: no [c, V] temporary.
            sum_ex = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(c)
            sums = torch.stack([e.sum(1), sum_ex, t_logit])  # [3, c]
            if world > 1:
                dist.all_reduce(sums, group=group)
            sum_e, sum_ex, t_shifted = sums
            log_z = torch.log(sum_e)
            logp[lo:hi] = t_shifted - log_z
            entropy[lo:hi] = log_z - sum_ex / sum_e  # H = log Z - E_p[x], both relative to m
            lse[lo:hi] = log_z + m
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.meta = (vocab_start, real, chunk_size, inplace_backward)
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]):
        logits, targets, lse, entropy = ctx.saved_tensors
        vocab_start, real, chunk_size, inplace = ctx.meta
        n, vl = logits.shape
        grad = logits if inplace else torch.empty_like(logits)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            x = logits[lo:hi, :real].to(torch.float32, copy=True)
            x.sub_(lse[lo:hi, None])  # log p over this rank's real columns
            p = torch.exp(x)
            # d logp_t / dx_j = 1[j == t] - p_j ;  d H / dx_j = -p_j (log p_j + H)
            if g_ent is not None:
                g = x.add_(entropy[lo:hi, None]).mul_(p).mul_(-g_ent[lo:hi, None])
                if g_logp is not None:
                    g.sub_(p.mul_(g_logp[lo:hi, None]))
            elif g_logp is not None:
                g = p.mul_(-g_logp[lo:hi, None])
            else:
                g = x.zero_()
            if g_logp is not None:
                local_t = targets[lo:hi] - vocab_start
                rows = ((local_t >= 0) & (local_t < real)).nonzero(as_tuple=True)[0]
                g[rows, local_t[rows]] += g_logp[lo:hi][rows]
            grad[lo:hi, :real] = g
            grad[lo:hi, real:] = 0
        return grad, None, None, None, None, None


def default_chunk_size(vocab_per_rank: int, device: torch.device) -> int:
    """Rows per chunk so one fp32 chunk buffer is ~16 MiB on CPU (small enough for malloc to
    reuse instead of faulting in fresh pages each time) or ~256 MiB on GPU."""
    budget = (256 if device.type == "cuda" else 16) * 1024**2
    return max(1, budget // (4 * max(vocab_per_rank, 1)))


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_size: Optional[int] = None,
    group=None,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and entropy per token, both fp32 with ``targets``' shape.

    ``logits`` [..., Vl] is this rank's vocabulary slice (rank r holds ids [r*Vl, (r+1)*Vl)) over
    the tensor-parallel ``group`` (None: the whole vocabulary is local). ``targets`` [...] are
    global ids < ``vocab_size``, identical on every rank of the group. Differentiable in both
    outputs w.r.t. ``logits``. ``inplace_backward`` overwrites ``logits`` with its gradient:
    only for logits that nothing else reads after the backward pass.
    """
    lead = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    if chunk_size is None:
        chunk_size = default_chunk_size(flat.shape[-1], flat.device)
    logp, entropy = _VocabParallelLogProbs.apply(
        flat, targets.reshape(-1), vocab_size, chunk_size, group, inplace_backward
    )
    return logp.view(lead), entropy.view(lead)


def tp_group():
    """megatron's tensor-parallel group, or None when model parallelism is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """Greedy token ids from vocabulary-parallel logits [..., Vl]: the global argmax over the
    real vocabulary (lowest id on ties, as torch.argmax), returned on every TP rank."""
    rank, world = _tp_group_info(group)
    vl = logits.shape[-1]
    real = max(0, min(vl, vocab_size - rank * vl))
    x = logits.reshape(-1, vl)[:, :real].float()
    if real > 0:
        best, idx = x.max(dim=1)
    else:
        best = torch.full((x.shape[0],), float("-inf"), device=x.device)
        idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    ids = idx + rank * vl
    if world > 1:
        bests = [torch.empty_like(best) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(bests, best, group=group)
        dist.all_gather(all_ids, ids, group=group)
        b, i = torch.stack(bests), torch.stack(all_ids)  # [TP, N]; ranks in vocabulary order
        winner = b.argmax(dim=0)  # first rank holding the maximum = the lowest id
        ids = i.gather(0, winner[None]).squeeze(0)
    return ids.reshape(logits.shape[:-1])
