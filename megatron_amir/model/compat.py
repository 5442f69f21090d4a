"""CPU support layer for Megatron-Core 0.19.2 (torch CPU build, gloo).

Megatron-Core is a GPU library; upstream it does not run without CUDA. The handful of places that
break on a CPU-only machine are listed in ``docs/megatron_on_cpu.md`` (each with the upstream file or function
it concerns and its workaround). This module fixes exactly those, and nothing else:

* ``install_triton_stub()`` -- only when the ``triton`` package is absent (on CPU or GPU):
  registers a stand-in for ``megatron.core.transformer.moe.ops.paged_stash`` (Triton kernels of the
  MoE "paged stash"), which ``pipeline_parallel/schedules.py`` and ``models/gpt/gpt_model.py`` import
  unconditionally through ``transformer/moe/paged_stash.py``. The stand-in exposes the same names; its
  kernels raise if anything ever launches them (only MoE paged-stash does, which we never enable).
* ``apply_cpu_compat()`` -- only when ``torch.cuda.is_available()`` is False. Idempotent. Patches:

  1. ``tensor_parallel/random.py``: ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` and
     ``CudaRNGStatesTracker.add`` read/write the CUDA generator; the attention always enters
     ``get_cuda_rng_tracker().fork()``. They are backed by the CPU default generator instead, and
     ``model_parallel_cuda_manual_seed``'s ``torch.cuda.manual_seed`` becomes a no-op-free call.
  2. ``torch.cuda.current_device`` (called as a ``device=`` argument in GlobalMemoryBuffer, TP mappings,
     DDP buffers, ...) reports ``"cpu"``; ``torch.cuda.current_stream`` / ``synchronize`` /
     ``Stream`` / ``stream`` become no-op stand-ins (``distributed/param_and_grad_buffer.py``
     ``start_grad_sync`` records streams). On a CPU build these functions raise, so nothing that
     worked before changes meaning.
  3. Literal ``device="cuda"`` factory calls in ``pipeline_parallel/schedules.py`` (total_num_tokens),
     ``distributed/param_and_grad_buffer.py``, ``optimizer/clip_grads.py``, ``optimizer/optimizer.py``,
     ``optimizer/grad_scaler.py``, ``transformer/utils.py`` (get_default_causal_mask), ``utils.py`` (local_multi_tensor_l2_norm): those modules' global ``torch`` is replaced by a proxy whose tensor
     factories map ``device="cuda"`` to CPU; everything else is forwarded to the real ``torch``.
  4. ``optimizer/clip_grads.py::clip_grad_by_total_norm_fp32`` asserts
     ``param.grad.type() == 'torch.cuda.FloatTensor'``: replaced by the same computation with the
     assertion on the dtype instead (also re-bound in ``optimizer/optimizer.py``, which imported it).
  5. ``optimizer/optimizer.py`` (Float16OptimizerWithFloat16Params, used for bf16 params) and
     ``optimizer/distrib_optimizer.py`` sort parameters by ``param.type()`` strings
     (``'torch.cuda.BFloat16Tensor'``...): their global ``torch`` proxy (3.) is not enough, so the
     ``.type()`` strings are translated for CPU tensors by a module-local wrapper around
     ``torch.Tensor.type`` (``_cuda_type_name``) installed only while those constructors run.

  6. ``models/common/language_module/language_module.py::setup_embeddings_and_output_layer`` moves the
     tied output weight with ``weight.data.cuda()`` before the first/last-stage all-reduce (PP > 1 with
     tied embeddings): ``Tensor.cuda`` returns the tensor itself while that method runs.

Nothing here runs when CUDA is available: ``apply_cpu_compat`` returns False and touches nothing,
so GPU runs use upstream Megatron-Core unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import types
from typing import Any

import torch

logger = logging.getLogger(__name__)

_PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"
_STATE: dict[str, Any] = {"cpu_applied": False, "triton_stub": False, "originals": {}}

# Modules whose literal device="cuda" factory calls must land on CPU (workaround 3).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.transformer.utils",  # get_default_causal_mask
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def install_triton_stub() -> bool:
    """Register a stand-in for the one Megatron module that imports Triton unconditionally.

    Works around ``megatron/core/transformer/moe/ops/paged_stash.py`` (``import triton`` at module
    level, reached from ``pipeline_parallel/schedules.py``). Does nothing when triton is installed or
    the real module is already imported. Returns True if the stub is (now) installed.
    """
    if _STATE["triton_stub"]:
        return True
    if triton_available() or _PAGED_STASH_OPS in sys.modules:
        return False
    stub = types.ModuleType(_PAGED_STASH_OPS)
    stub.__doc__ = "megatron-amir stand-in: Triton is not installed, MoE paged-stash kernels unavailable."
    stub.GLOBAL_BLOCK_SIZE = 1024  # same constant as upstream

    def _unavailable(*_a, **_k):
        raise RuntimeError(
            "MoE paged stash needs Triton, which is not installed (megatron_amir.model.compat stub)"
        )

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[_PAGED_STASH_OPS] = stub
    _STATE["triton_stub"] = True
    return True


# --------------------------------------------------------------------------------------------- helpers
def _cpu_device(device):
    """Map a 'cuda' device spec to CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, int):  # a CUDA ordinal
        return "cpu"
    return device


class _NullStream:
    """Stand-in for torch.cuda.Stream on CPU: every operation is already synchronous."""

    def __init__(self, *_a, **_k):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return _NullEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *_a, **_k):
        pass

    def record(self, *_a, **_k):
        return None

    def wait(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "as_tensor")


class _TorchProxy(types.ModuleType):
    """Module-local replacement of ``torch`` whose factories map device='cuda' to CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


def _cuda_type_name(t: torch.Tensor, *args, **kwargs):
    """``Tensor.type()`` as a CUDA build would report it, for CPU tensors (workaround 5)."""
    if args or kwargs:
        return _ORIG_TENSOR_TYPE(t, *args, **kwargs)
    name = _ORIG_TENSOR_TYPE(t)
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


_ORIG_TENSOR_TYPE = torch.Tensor.type


@contextlib.contextmanager
def _cuda_type_strings():
    torch.Tensor.type = _cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = _ORIG_TENSOR_TYPE


def _wrap_method(cls, name: str, ctx_factory) -> None:
    orig = getattr(cls, name)
    if getattr(orig, "_amir_cpu_wrapped", False):
        return

    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        with ctx_factory():
            return orig(self, *args, **kwargs)

    wrapper._amir_cpu_wrapped = True
    _STATE["originals"][f"{cls.__module__}.{cls.__name__}.{name}"] = orig
    setattr(cls, name, wrapper)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def _wrap_init_with_cuda_types(cls):
    orig = cls.__init__
    if getattr(orig, "_amir_cpu_wrapped", False):
        return

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        with _cuda_type_strings():
            orig(self, *args, **kwargs)

    __init__._amir_cpu_wrapped = True
    _STATE["originals"][f"{cls.__module__}.{cls.__name__}.__init__"] = orig
    cls.__init__ = __init__


# --------------------------------------------------------------------------------------------- main
def cpu_compat_active() -> bool:
    return bool(_STATE["cpu_applied"])


def apply_cpu_compat() -> bool:
    """Make Megatron-Core 0.19.2 run on a CPU-only machine; see the module docstring.

    Returns True when the CPU layer is active after the call, False when CUDA is available (nothing
    is patched then, except the Triton stub if triton itself is missing). Safe to call many times.
    """
    install_triton_stub()
    if torch.cuda.is_available():
        return False
    if _STATE["cpu_applied"]:
        return True

    # 2. torch.cuda device/stream queries used all over megatron.core
    cuda = torch.cuda
    for name, repl in (
        ("current_device", lambda: "cpu"),
        ("current_stream", lambda *a, **k: _NullStream()),
        ("default_stream", lambda *a, **k: _NullStream()),
        ("synchronize", lambda *a, **k: None),
        ("Stream", _NullStream),
        ("Event", _NullEvent),
        ("stream", lambda *a, **k: contextlib.nullcontext()),
    ):
        _STATE["originals"][f"torch.cuda.{name}"] = getattr(cuda, name)
        setattr(cuda, name, repl)

    # 1. RNG tracker backed by the CPU generator
    from megatron.core.tensor_parallel import random as mrandom

    def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):  # noqa: ARG001
        return torch.get_rng_state()

    def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
        torch.set_rng_state(new_state)

    def _tracker_add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception("seed {} already exists".format(seed))
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception("cuda rng state {} already exists".format(name))
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    _STATE["originals"]["random._get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    _STATE["originals"]["random._set_cuda_rng_state"] = mrandom._set_cuda_rng_state
    _STATE["originals"]["random.CudaRNGStatesTracker.add"] = mrandom.CudaRNGStatesTracker.add
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed (lazy, harmless on CPU) and
    # torch.cuda.get_rng_state inside add() (replaced above).

    # 3. literal device="cuda" in a few modules
    proxy = _TorchProxy()
    for modname in _CUDA_LITERAL_MODULES:
        mod = importlib.import_module(modname)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy

    # 4. clip_grads type() assertion
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer

    orig_clip = clip_grads.clip_grad_by_total_norm_fp32

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """CPU version of upstream clip_grad_by_total_norm_fp32 (same math, dtype check instead of
        the 'torch.cuda.FloatTensor' type-string assertion)."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            g = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if g is None:
                continue
            if not use_decoupled_grad and g.dtype != torch.float32:
                raise AssertionError(f"clip_grad expects fp32 main grads, got {g.dtype}")
            grads.append(clip_grads.to_local_if_dtensor(g).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if isinstance(clip_coeff, torch.Tensor):
            clip_coeff = clip_coeff.clamp_max(1.0)
            for g in grads:
                g.mul_(clip_coeff)
        elif clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    _STATE["originals"]["clip_grads.clip_grad_by_total_norm_fp32"] = orig_clip
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    if getattr(moptimizer, "clip_grad_by_total_norm_fp32", None) is orig_clip:
        moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    # 5. type()-string dispatch in the bf16 / distributed optimizer constructors
    from megatron.core.optimizer import distrib_optimizer

    _wrap_init_with_cuda_types(moptimizer.Float16OptimizerWithFloat16Params)
    _wrap_init_with_cuda_types(distrib_optimizer.DistributedOptimizer)

    # 6. weight.data.cuda() in the tied-embedding set-up across pipeline stages
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _wrap_method(LanguageModule, "setup_embeddings_and_output_layer", _tensor_cuda_is_identity)

    _STATE["cpu_applied"] = True
    logger.info("megatron_amir CPU compatibility layer applied (torch.cuda unavailable)")
    return True
