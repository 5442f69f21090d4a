"""Turn rollout groups into the padded tensors of the RL batch, and share them across ranks.

Layout (see docs/architecture.md): sequence = prompt ids + response ids, right-padded to L with pad_id.
Per-token tensors are [N, T] with T = L - 1 and index t predicts token t + 1; ``response_mask[n, t]`` is 1
where token t + 1 is a response token. Rollout log-probs are placed on the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [N, L] long
    response_mask: torch.Tensor  # [N, T] float32
    rollout_logp: torch.Tensor  # [N, T] float32 (0 outside the response)
    rewards: torch.Tensor  # [N] float64
    correct: torch.Tensor  # [N] bool
    group_ids: torch.Tensor  # [N] long, the prompt index inside the step
    response_len: torch.Tensor  # [N] long
    truncated: torch.Tensor  # [N] bool: finish_reason == "length"
    weight_version: torch.Tensor  # [N] long

    def __post_init__(self) -> None:
        for name, (dtype, _) in FIELD_SPECS.items():
            t = getattr(self, name)
            if t.dtype != dtype:
                raise TypeError(f"RolloutBatch.{name}: dtype {t.dtype}, expected {dtype}")

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


# every field's dtype and shape ([N, L], [N, T = L - 1] or [N]): one table for building, checking and broadcasting
FIELD_SPECS: dict[str, tuple[torch.dtype, str]] = {
    "tokens": (torch.long, "NL"),
    "response_mask": (torch.float32, "NT"),
    "rollout_logp": (torch.float32, "NT"),
    "rewards": (torch.float64, "N"),  # as the verifier gave them: pair margins compare exact values
    "correct": (torch.bool, "N"),
    "group_ids": (torch.long, "N"),
    "response_len": (torch.long, "N"),
    "truncated": (torch.bool, "N"),
    "weight_version": (torch.long, "N"),
}


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    group_ids: Sequence[int],
    rewards: Sequence[float],
    correct: Sequence[bool],
    truncated: Sequence[bool],
    weight_versions: Sequence[int],
    pad_id: int,
    pad_to_multiple: int = 8,
) -> RolloutBatch:
    """Pack one row per sample. Lengths are padded up to a multiple of ``pad_to_multiple`` so that step shapes
    repeat (fewer allocator surprises); right padding never changes earlier positions under causal attention."""
    n = len(responses)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lengths)
    L = max(2, -(-L // pad_to_multiple) * pad_to_multiple)
    tokens = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros(n, L - 1)
    rlp = torch.zeros(n, L - 1)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        seq = list(p) + list(r)
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        start = len(p) - 1  # position predicting the first response token
        mask[i, start : start + len(r)] = 1.0
        if len(r):
            rlp[i, start : start + len(r)] = torch.tensor(list(lp), dtype=torch.float32)
    return RolloutBatch(
        tokens=tokens,
        response_mask=mask,
        rollout_logp=rlp,
        rewards=torch.tensor(list(rewards), dtype=torch.float64),
        correct=torch.tensor(list(correct), dtype=torch.bool),
        group_ids=torch.tensor(list(group_ids), dtype=torch.long),
        response_len=torch.tensor([len(r) for r in responses], dtype=torch.long),
        truncated=torch.tensor(list(truncated), dtype=torch.bool),
        weight_version=torch.tensor(list(weight_versions), dtype=torch.long),
    )


def broadcast_rollout_batch(batch: Optional[RolloutBatch], src: int = 0, group=None) -> RolloutBatch:
    """Send the batch built on ``src`` to every rank: shapes first, then each tensor (no pickling)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        assert batch is not None
        return batch
    shape = torch.zeros(2, dtype=torch.long)
    if dist.get_rank() == src:
        shape[:] = torch.tensor(batch.tokens.shape)
    dist.broadcast(shape, src, group=group)
    n, L = shape.tolist()
    dims = {"NL": (n, L), "NT": (n, L - 1), "N": (n,)}
    out = {}
    for name, (dtype, kind) in FIELD_SPECS.items():
        if dist.get_rank() == src:
            t = getattr(batch, name).contiguous()
        else:
            t = torch.empty(dims[kind], dtype=dtype)
        # gloo cannot broadcast bool tensors: send as uint8
        buf = t.to(torch.uint8) if t.dtype == torch.bool else t
        dist.broadcast(buf, src, group=group)
        out[name] = buf.to(torch.bool) if t.dtype == torch.bool else buf
    return RolloutBatch(**out)
