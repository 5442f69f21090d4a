"""Loss aggregation modes as *global token weights*.

Every mode is a weighted sum ``L = sum_{i,t} w_{i,t} * loss_{i,t}`` over the whole global batch (all
micro-batches of all data-parallel ranks). Computing the weights once, from *global* counts, makes the
loss of a micro-batch ``sum(w * loss)`` over its rows and the global loss the plain SUM of the
micro-batch losses: exact under any micro-batch split and any DP size (no re-averaging).

With ``m`` the response mask, ``len_i = sum_t m_{i,t}``, ``S`` the number of non-empty sequences and
``T_tok = sum_i len_i`` in the global batch:

================================  ===========================  ==========================================
mode                               w_{i,t}                       used by
================================  ===========================  ==========================================
token-mean                         m / T_tok                     DAPO (arXiv 2503.14476), verl default
seq-mean-token-mean                m / (len_i * S)               original GRPO (DeepSeekMath, 2402.03300)
seq-mean-token-sum                 m / S                         sequence-sum variants (verl option)
seq-mean-token-sum-norm            m / (S * max_len)             Dr. GRPO (arXiv 2503.20783), constant max_len
================================  ===========================  ==========================================

Fully masked sequences (``len_i = 0``) get zero weight and are not counted in ``S``, so padding rows
change nothing.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

# name -> fn(lengths[N], num_tokens, num_seqs, max_len) -> the row factor r (a float, or a tensor[N] when it
#         depends on the row) with w_{i,t} = m_{i,t} * r_i. Every mode is a mask times a per-row factor; the
#         AMIR pair term relies on that (its per-token coefficient is a per-row multiple of w, batch.py).
AGGREGATIONS: dict[str, Callable[..., Union[float, torch.Tensor]]] = {}


def register_aggregation(name: str):
    def deco(fn):
        AGGREGATIONS[name] = fn
        return fn

    return deco


def _safe(x: float) -> float:
    # An empty global batch has no tokens; weights are then all zero anyway (mask is zero).
    return x if x > 0 else 1.0


@register_aggregation("token-mean")
def _token_mean(lengths, num_tokens, num_seqs, max_len):
    """r = 1 / T_tok: every response token of the batch counts the same."""
    return 1.0 / _safe(num_tokens)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(lengths, num_tokens, num_seqs, max_len):
    """r_i = 1 / (len_i * S): mean over tokens of a sequence, then mean over sequences."""
    return 1.0 / (lengths.clamp(min=1) * _safe(num_seqs))


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(lengths, num_tokens, num_seqs, max_len):
    """r = 1 / S: sum over tokens of a sequence, mean over sequences."""
    return 1.0 / _safe(num_seqs)


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(lengths, num_tokens, num_seqs, max_len):
    """r = 1 / (S * max_len): Dr. GRPO's constant normalizer (no dependence on the response length)."""
    if max_len is None:
        raise ValueError("algorithm.loss_agg_max_len must be set for loss_agg_mode=seq-mean-token-sum-norm")
    return 1.0 / (_safe(num_seqs) * float(max_len))


def row_scale(
    mode: str, lengths: torch.Tensor, *, num_tokens: float, num_seqs: float, max_len: Optional[int] = None
) -> Union[float, torch.Tensor]:
    """The row factor r of ``mode`` (w = m·r) from the GLOBAL counts: a float, or r[N] in ``lengths``' dtype."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"algorithm.loss_agg_mode: unknown mode {mode!r} (known: {sorted(AGGREGATIONS)})")
    return AGGREGATIONS[mode](lengths, float(num_tokens), float(num_seqs), max_len)


def weights_from_scale(mask: torch.Tensor, r: Union[float, torch.Tensor]) -> torch.Tensor:
    """w = m · r (r a float or a per-row tensor[N])."""
    return mask * r if isinstance(r, float) else mask * r.unsqueeze(-1)


def token_weights(
    response_mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    max_len: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Global token weights ``w[N, T]`` for ``mode`` given the GLOBAL counts (already DP-reduced).

    ``num_tokens`` = total response tokens, ``num_seqs`` = sequences with at least one response token.
    """
    mask = response_mask.to(dtype)
    r = row_scale(mode, mask.sum(-1), num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return weights_from_scale(mask, r)


def aggregate(
    per_token_loss: torch.Tensor, response_mask: torch.Tensor, mode: str, max_len: Optional[int] = None
) -> torch.Tensor:
    """Local (single-batch, no DP) aggregation: ``sum(w * loss)`` with counts taken from this batch."""
    mask = response_mask.to(per_token_loss.dtype)
    lengths = mask.sum(-1)
    w = token_weights(
        mask,
        mode,
        num_tokens=float(lengths.sum()),
        num_seqs=float((lengths > 0).sum()),
        max_len=max_len,
        dtype=per_token_loss.dtype,
    )
    return (w * per_token_loss).sum()
