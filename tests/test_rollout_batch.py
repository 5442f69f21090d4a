"""training/rollout_batch.py: packing layout, dtype contract, and the broadcast to other ranks (2 gloo processes)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from megatron_amir.training.rollout_batch import FIELD_SPECS, RolloutBatch, broadcast_rollout_batch, build_rollout_batch
from tests.spawn_helpers import run_ranks


def _batch():
    return build_rollout_batch(
        prompts=[[5, 6, 7], [8]], responses=[[9, 10], [11, 12, 13, 14]], logprobs=[[-0.5, -1.5], [-1, -2, -3, -4]],
        group_ids=[0, 0], rewards=[1.0, 0.25], correct=[True, False], truncated=[False, True], weight_versions=[3, 3],
        pad_id=0,
    )


def test_layout_and_dtypes():
    b = _batch()
    assert set(FIELD_SPECS) == {f.name for f in dataclasses.fields(RolloutBatch)}
    assert b.tokens.shape == (2, 8) and b.tokens[0, :5].tolist() == [5, 6, 7, 9, 10]
    # position t predicts token t + 1: the response of row 0 starts at t = len(prompt) - 1 = 2
    assert b.response_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert b.rollout_logp[1, :4].tolist() == [-1, -2, -3, -4]
    for name, (dtype, _) in FIELD_SPECS.items():
        assert getattr(b, name).dtype == dtype, name
    with pytest.raises(TypeError, match="rewards"):
        dataclasses.replace(b, rewards=b.rewards.float())


def _worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = broadcast_rollout_batch(_batch() if rank == 0 else None)
        q.put((rank, {k: v.tolist() for k, v in dataclasses.asdict(got).items()}))
    finally:
        dist.destroy_process_group()


def test_broadcast_reaches_the_other_rank_bit_exact():
    got = run_ranks(_worker, 2)
    expected = {k: v.tolist() for k, v in dataclasses.asdict(_batch()).items()}
    assert got[0] == expected and got[1] == expected
