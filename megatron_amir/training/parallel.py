"""Process groups and seeds: torch.distributed (torchrun env or a single process) + Megatron parallel_state.

``init_parallel(parallel_cfg, seed)`` is the one entry point: it starts torch.distributed if needed
(gloo on CPU, nccl on GPU unless parallel.backend says otherwise), initializes Megatron's
tensor/pipeline/data-parallel groups, and seeds python/numpy/torch plus Megatron's model-parallel RNG
tracker (seed + 100 * pp_rank, as in Megatron-LM, so PP stages draw different dropout streams while DP
replicas of a stage agree).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_amir.config import ParallelConfig
from megatron_amir.model.compat import apply_cpu_compat
from megatron_amir.training.dist_env import init_process_group


@dataclass(frozen=True)
class ParallelInfo:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_parallel(parallel_cfg: ParallelConfig, seed: int = 1234) -> ParallelInfo:
    """torch.distributed + Megatron parallel_state + seeds. Idempotent for the same sizes."""
    apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    if not dist.is_initialized():
        # torchrun's or Slurm's environment (a bare `srun -n N` included), or a single process; a config that
        # needs more ranks than were launched fails here with a message saying how to launch
        init_process_group(parallel_cfg)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(
            f"world size {world} is not divisible by TP*PP = {tp}*{pp} "
            "(parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)"
        )
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise RuntimeError("parallel_state already initialized with different TP/PP sizes; call shutdown_parallel()")
    else:
        # Megatron's own groups get the same collective timeout as the default group (its default is 30 min)
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=max(1, math.ceil(parallel_cfg.timeout_s / 60)))
    info = parallel_info()
    seed_everything(seed + 100 * info.pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * info.pp_rank)
    return info


def parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def shutdown_parallel(destroy_process_group: bool = False) -> None:
    """Tear down parallel_state (and torch.distributed if asked), e.g. between tests."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def initialize_distributed(cfg) -> ParallelInfo:
    """Trainer entry point: ``init_parallel(cfg.parallel, cfg.train.seed)``."""
    return init_parallel(cfg.parallel, cfg.train.seed)
