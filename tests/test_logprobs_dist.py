"""Vocab-parallel log-probs / entropy at TP=2 (2 processes, gloo): each rank holds half the vocabulary."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.spawn_helpers import run_ranks
from tests.test_logprobs import autograd_reference_grad, loop_reference

pytestmark = pytest.mark.dist


def _worker(rank: int, world: int, port: int, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron_amir.model.logprobs import vocab_parallel_logprobs

        results = {}
        for dtype, vocab, chunk in ((torch.float64, 14, None), (torch.float64, 14, 3), (torch.float32, 64, 5)):
            g = torch.Generator().manual_seed(11)
            full = torch.randn(3, 7, vocab, dtype=dtype, generator=g) * 3
            # targets on both halves of the vocabulary
            targets = torch.randint(0, vocab, (3, 7), generator=g)
            g_lp = torch.randn(3, 7, dtype=dtype, generator=g)
            g_ent = torch.randn(3, 7, dtype=dtype, generator=g)
            v = vocab // world
            shard = full[..., rank * v : (rank + 1) * v].clone().requires_grad_()
            lp, ent = vocab_parallel_logprobs(shard, targets, tp_group=dist.group.WORLD, chunk_size=chunk,
                                              with_entropy=True)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            rlp, rent = loop_reference(full, targets)
            rgrad = autograd_reference_grad(full, targets, g_lp, g_ent)[..., rank * v : (rank + 1) * v]
            results[(str(dtype), chunk)] = (
                float((lp.double() - rlp).abs().max()),
                float((ent.double() - rent).abs().max()),
                float((shard.grad.double() - rgrad).abs().max()),
            )
        q.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_tp2_matches_full_vocab_reference():
    out = run_ranks(_worker, 2)
    for rank in (0, 1):
        for (dtype, chunk), (d_lp, d_ent, d_grad) in out[rank].items():
            tol = 1e-10 if dtype == "torch.float64" else 1e-5
            assert d_lp < tol and d_ent < tol and d_grad < tol, (rank, dtype, chunk, d_lp, d_ent, d_grad)
