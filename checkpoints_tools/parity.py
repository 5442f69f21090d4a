"""Logit parity: run converted Megatron checkpoints at a given TP/PP (one process per rank, gloo) and return
their logits, to compare with the Hugging Face model on the same tokens.

``megatron_logits({(1, 1): dirs, (2, 1): dirs, (1, 2): dirs}, tokens)`` starts max(TP*PP) processes once and
evaluates every checkpoint at every layout inside them (process start-up and ``import megatron.core`` dominate
on CPU), re-initializing Megatron's parallel state between layouts. Each rank builds its
stage with the trainer's ``build_gpt_model`` and loads with the trainer's ``load_checkpoint``, so this checks
exactly what training will see, resharding included. Pipeline stages pass hidden states with send/recv;
TP ranks all-gather their vocabulary slices; padding columns beyond the original vocabulary are dropped.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path
from typing import Sequence

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_forward(model, tokens: torch.Tensor, info) -> torch.Tensor | None:
    """This rank's part of one forward pass; the last stage returns full-vocab logits [b, s, V_padded]."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    if not info.is_first_stage:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, pos, None)  # causal attention, no padding: no mask needed
    if not info.is_last_stage:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    if info.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(info.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _worker(rank: int, world: int, port: int, jobs: list[tuple[tuple[int, int], list[str]]], tokens: torch.Tensor,
            out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from megatron_amir.config import ModelConfig, ParallelConfig
    from megatron_amir.convert.megatron_side import MODEL_SUBDIR, load_model, read_meta
    from megatron_amir.model.builder import build_gpt_model, transformer_config
    from megatron_amir.training.parallel import init_parallel, shutdown_parallel

    try:
        for (tp, pp), ckpt_dirs in jobs:
            # one world for every layout: ranks beyond TP*PP are data-parallel replicas computing the same logits
            par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, backend="gloo")
            info = init_parallel(par)
            for i, ckpt in enumerate(ckpt_dirs):
                meta = read_meta(Path(ckpt))
                cfg = ModelConfig(**{**meta["model"], "transformer_impl": "local"})
                # Loading overwrites every weight, so skip the first/last-stage all-reduce of tied embeddings
                # that GPTModel does at construction (it also calls .cuda() there: fails on CPU-only torch).
                tcfg = dataclasses.replace(transformer_config(cfg, par, impl="local"), init_model_with_meta_device=True)
                model = build_gpt_model(cfg, par, pre_process=info.is_first_stage, post_process=info.is_last_stage,
                                        config=tcfg)
                model.eval()
                load_model(model, Path(ckpt) / MODEL_SUBDIR)
                with torch.no_grad():
                    logits = _stage_forward(model, tokens, info)
                if logits is not None and info.tp_rank == 0 and info.dp_rank == 0:
                    vocab = int(meta["original_vocab_size"])
                    save_file({"logits": logits[..., :vocab].float().contiguous()},
                              os.path.join(out_dir, f"tp{tp}pp{pp}-{i}.st"))
            shutdown_parallel()
    finally:
        shutdown_parallel(destroy_process_group=True)


def megatron_logits(
    ckpt_dirs: dict[tuple[int, int], Sequence[str | Path]], tokens: torch.Tensor
) -> dict[tuple[int, int], list[torch.Tensor]]:
    """{(TP, PP): [checkpoint dirs]} -> {(TP, PP): [logits [b, s, original vocab] fp32, one per checkpoint]}.

    All layouts run in one spawn of max(TP*PP) processes (start-up dominates on CPU).
    """
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    jobs = [((int(tp), int(pp)), [str(c) for c in dirs]) for (tp, pp), dirs in ckpt_dirs.items()]
    world = max(tp * pp for (tp, pp), _ in jobs)
    bad = [layout for layout, _ in jobs if world % (layout[0] * layout[1])]
    if bad:
        raise ValueError(f"layouts {bad} do not divide the world size {world}")
    with tempfile.TemporaryDirectory(prefix="mamir-parity-") as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), jobs, tokens.long(), out_dir), nprocs=world,
                           join=True, start_method="spawn")
        return {
            (tp, pp): [load_file(os.path.join(out_dir, f"tp{tp}pp{pp}-{i}.st"))["logits"] for i in range(len(dirs))]
            for (tp, pp), dirs in jobs
        }
