"""Token log-probs and entropy from tensor-parallel (vocab-sharded) logits, without gathering the vocab.

Each TP rank holds logits x[..., v] for its vocabulary slice [start, start + V_local). With
M = max_v x_v (all-reduce MAX), S = sum_v exp(x_v - M) (all-reduce SUM), log Z = M + log S:

    logp(y)  = x_y - log Z                       (x_y all-reduced from the rank that owns y)
    H        = log Z - sum_v p_v x_v,  p_v = exp(x_v - log Z)   (entropy of the full distribution)

Gradients (w.r.t. each rank's local logits, no communication needed):

    d logp / d x_v = 1[v = y] - p_v
    d H    / d x_v = -p_v (x_v - sum_u p_u x_u)

All math is fp32 whatever the logits dtype (fp64 logits are computed in fp64). Forward and backward run over chunks of ``chunk_size``
tokens, so only [chunk, V_local] fp32 temporaries exist at a time; the autograd function saves the
logits themselves (already alive as the model output) plus two fp32 numbers per token (log Z and
E_p[x]), never a [tokens x vocab] fp32 copy. Backward recomputes p per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunks(n: int, chunk_size: Optional[int]):
    step = n if not chunk_size or chunk_size >= n else chunk_size
    for s in range(0, n, step):
        yield s, min(n, s + step)


# finite (not -inf) so that 0 * x stays 0 in the entropy and gradient sums
_PAD_LOGIT = -1e30


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (used by exactness tests)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """logits [T, V_local] (any float dtype), targets [T] (global ids) -> (logp [T] fp32, entropy [T] fp32)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, chunk_size, with_entropy, scale, pad_from):
        T, v_local = logits.shape
        cdt = _compute_dtype(logits)
        ctx.set_materialize_grads(False)  # an unused entropy output gets None, not a zero tensor
        logp = torch.empty(T, dtype=cdt, device=logits.device)
        log_z = torch.empty(T, dtype=cdt, device=logits.device)
        mean_x = torch.empty(T, dtype=cdt, device=logits.device) if with_entropy else None
        local_t = targets - vocab_start
        in_shard = (local_t >= 0) & (local_t < v_local)
        local_t = torch.where(in_shard, local_t, torch.zeros_like(local_t))
        for s, e in _chunks(T, chunk_size):
            x = logits[s:e].to(cdt, copy=True)  # a private fp32 copy: edited in place below
            if scale != 1.0:
                x.mul_(scale)  # temperature: the distribution of logits / T
            if pad_from < v_local:
                x[:, pad_from:] = _PAD_LOGIT  # padded vocabulary rows are not tokens: probability 0
            m = x.max(dim=-1).values
            _all_reduce(m, dist.ReduceOp.MAX, group)
            x.sub_(m.unsqueeze(-1))  # x - M, reuses the fp32 copy
            tgt = x.gather(-1, local_t[s:e].unsqueeze(-1)).squeeze(-1) * in_shard[s:e]
            if with_entropy:
                ex = torch.exp(x)
                sum_ex = ex.sum(dim=-1)
                # sum_v exp(x_v - M) (x_v - M), in place in ex (no third buffer); / S gives E_p[x] - M
                sum_exx = ex.mul_(x).sum(dim=-1)
                packed = torch.stack([sum_ex, sum_exx, tgt])
                _all_reduce(packed, dist.ReduceOp.SUM, group)
                sum_ex, sum_exx, tgt = packed[0], packed[1], packed[2]
                mean_x[s:e] = sum_exx / sum_ex + m
            else:
                ex = x.exp_()  # in place: only S is needed
                sum_ex = ex.sum(dim=-1)
                packed = torch.stack([sum_ex, tgt])
                _all_reduce(packed, dist.ReduceOp.SUM, group)
                sum_ex, tgt = packed[0], packed[1]
            lz = torch.log(sum_ex)  # log Z - M
            logp[s:e] = tgt - lz
            log_z[s:e] = lz + m
            del x, ex
        entropy = (log_z - mean_x) if with_entropy else None
        ctx.save_for_backward(logits, local_t, in_shard, log_z, mean_x if with_entropy else log_z)
        ctx.chunk_size = chunk_size
        ctx.with_entropy = with_entropy
        ctx.scale = scale
        ctx.pad_from = pad_from
        if with_entropy:
            return logp, entropy
        return logp, torch.empty(0, dtype=cdt, device=logits.device)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_t, in_shard, log_z, mean_x = ctx.saved_tensors
        T = logits.shape[0]
        cdt = _compute_dtype(logits)
        grad = None
        use_ent = ctx.with_entropy and g_ent is not None and g_ent.numel() > 0  # None when entropy is a metric
        if g_logp is None:
            g_logp = torch.zeros(T, dtype=cdt, device=logits.device)
        for s, e in _chunks(T, ctx.chunk_size):
            x = logits[s:e].to(cdt, copy=True)  # a private fp32 copy: edited in place below
            if ctx.scale != 1.0:
                x.mul_(ctx.scale)
            if ctx.pad_from < x.shape[-1]:
                x[:, ctx.pad_from:] = _PAD_LOGIT  # p = 0 there, so their gradient is 0
            gl = g_logp[s:e].to(cdt).unsqueeze(-1)
            if use_ent:
                p = torch.sub(x, log_z[s:e].unsqueeze(-1)).exp_()
                # -p (x - E[x]) * g_H  - p * g_logp
                x.sub_(mean_x[s:e].unsqueeze(-1)).mul_(g_ent[s:e].to(cdt).unsqueeze(-1)).add_(gl)
                x.mul_(p).neg_()
                gx = x
                if ctx.pad_from < gx.shape[-1]:  # (x - E[x]) ~ -1e30 there: a large g_H overflows to -inf·0 = NaN
                    gx[:, ctx.pad_from:] = 0.0
            else:  # one buffer: p computed in place, then scaled
                p = x.sub_(log_z[s:e].unsqueeze(-1)).exp_()
                gx = p.mul_(gl).neg_()
            # + g_logp at the target column (only on the rank that owns the target)
            gx.scatter_add_(-1, local_t[s:e].unsqueeze(-1), (gl.squeeze(-1) * in_shard[s:e]).unsqueeze(-1))
            if ctx.scale != 1.0:
                gx.mul_(ctx.scale)  # chain rule through x * scale
            if s == 0 and e == T and gx.dtype == logits.dtype:
                grad = gx  # one chunk in the logits' dtype: the buffer is the gradient
            else:
                if grad is None:
                    grad = torch.empty_like(logits)
                grad[s:e] = gx
            del x, p, gx
        if grad is None:  # no tokens
            grad = torch.empty_like(logits)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    vocab_start: Optional[int] = None,
    chunk_size: Optional[int] = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
):
    """Log-prob of ``targets`` (and optionally the entropy) under vocab-sharded ``logits`` / temperature.

    logits: [..., V_local] of this TP rank (any float dtype; math in fp32).
    targets: [...] global token ids (long).
    tp_group: the tensor-parallel process group (None = unsharded, or world size 1).
    vocab_start: first global id of this rank's slice (default rank * V_local).
    chunk_size: tokens per chunk along the flattened leading dims (None = all at once).
    temperature: the distribution is softmax(logits / temperature), applied to each fp32 chunk (no copy
        of the whole logits tensor).
    valid_vocab: ids >= valid_vocab are padding rows of the embedding (vocabulary padded to a multiple of
        128*TP, or beyond the tokenizer): they get probability 0, as in the rollout engine, which never
        sees them. None = every row is a token.
    Returns (logp [...] fp32 (fp64 for fp64 logits), entropy [...] same dtype, or None). Differentiable w.r.t. logits.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match targets {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = targets.shape
    v_local = logits.shape[-1]
    if vocab_start is None:
        rank = dist.get_rank(tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
        vocab_start = rank * v_local
    flat_logits = logits.reshape(-1, v_local)  # a view for contiguous logits (pass them unsliced)
    flat_t = targets.reshape(-1).long()
    logp, ent = _VocabParallelLogprobEntropy.apply(
        flat_logits, flat_t, int(vocab_start), tp_group, chunk_size, bool(with_entropy), 1.0 / float(temperature),
        v_local if valid_vocab is None else max(0, min(v_local, int(valid_vocab) - int(vocab_start))),
    )
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


def vocab_parallel_entropy(logits: torch.Tensor, *, tp_group=None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Entropy of the full distribution from vocab-sharded logits: H = log Z - E_p[x]."""
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return vocab_parallel_logprobs(logits, dummy, tp_group=tp_group, chunk_size=chunk_size, with_entropy=True)[1]
