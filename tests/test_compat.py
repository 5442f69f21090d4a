"""The CPU support layer: import without triton, active only without CUDA, idempotent, and each patch works.

Checks that must see a fresh interpreter (before/without the layer) run in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_import_megatron_core_without_triton():
    out = _run("""
        import importlib.util, sys
        from megatron_amir.model.compat import install_triton_stub, triton_available
        had_triton = triton_available()
        install_triton_stub()
        import megatron.core
        from megatron.core.pipeline_parallel import get_forward_backward_func
        stub = sys.modules["megatron.core.transformer.moe.ops.paged_stash"]
        print(had_triton, getattr(stub, "__file__", None) is None)
        if not had_triton:
            try:
                stub.paged_stash_copy_kernel()
            except RuntimeError as e:
                print("raises:", "Triton" in str(e))
    """)
    had_triton, is_stub = out.split()[:2]
    if had_triton == "False":
        assert is_stub == "True"
        assert "raises: True" in out
    else:  # real triton present: the real module is used
        assert is_stub == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_without_compat_megatron_breaks_on_cpu():
    """The layer is needed: upstream get_default_causal_mask asks for a CUDA tensor."""
    out = _run("""
        from megatron_amir.model.compat import install_triton_stub
        install_triton_stub()
        from megatron.core.transformer.utils import get_default_causal_mask
        try:
            get_default_causal_mask(4)
            print("worked")
        except (AssertionError, RuntimeError) as e:
            print("failed")
    """)
    assert out.strip() == "failed"


def test_inactive_when_cuda_present():
    """With torch.cuda.is_available() -> True, apply_cpu_compat patches nothing."""
    out = _run("""
        import torch
        torch.cuda.is_available = lambda: True
        orig = (torch.cuda.current_device, torch.cuda.current_stream, torch.cuda.synchronize, torch.Tensor.type)
        from megatron_amir.model import compat
        assert compat.apply_cpu_compat() is False
        assert compat.apply_cpu_compat() is False
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.optimizer import clip_grads
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.optimizer import optimizer as mopt
        now = (torch.cuda.current_device, torch.cuda.current_stream, torch.cuda.synchronize, torch.Tensor.type)
        print(all(a is b for a, b in zip(orig, now)),
              mrandom._get_cuda_rng_state.__module__ == mrandom.__name__,
              clip_grads.clip_grad_by_total_norm_fp32.__module__ == clip_grads.__name__,
              schedules.torch is torch,
              not getattr(mopt.Float16OptimizerWithFloat16Params.__init__, "_amir_cpu_wrapped", False),
              compat.cpu_compat_active())
        from megatron.core.models.common.language_module.language_module import LanguageModule
        print(not getattr(LanguageModule.setup_embeddings_and_output_layer, "_amir_cpu_wrapped", False))
    """)
    assert out.split() == ["True", "True", "True", "True", "True", "False", "True"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_applied_idempotent_and_patches_work():
    out = _run("""
        import torch
        from megatron_amir.model import compat
        assert compat.apply_cpu_compat() is True
        first = torch.cuda.current_device
        from megatron.core.pipeline_parallel import schedules
        proxy = schedules.torch
        assert compat.apply_cpu_compat() is True          # idempotent: nothing re-wrapped
        assert torch.cuda.current_device is first and schedules.torch is proxy
        assert torch.cuda.current_device() == "cpu"
        # literal device="cuda" lands on CPU inside patched modules only
        assert proxy.zeros(2, device="cuda").device.type == "cpu"
        from megatron.core.transformer.utils import get_default_causal_mask
        m = get_default_causal_mask(3)
        assert m.device.type == "cpu" and m.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
        # RNG tracker backed by the CPU generator: fork gives the model-parallel stream and restores the default
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import random as mrandom
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("a", 5)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with tracker.fork("a"):
            x = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)
        torch.manual_seed(5)
        assert torch.equal(x, torch.rand(3))
        # clip_grad without the cuda type-string assertion
        from megatron.core.optimizer import clip_grads
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 2.0)
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
        # Tensor.type() / Tensor.cuda() are untouched outside the wrapped constructors / methods
        assert torch.zeros(1).type() == "torch.FloatTensor"
        try:
            torch.zeros(1).cuda()
            raise SystemExit("Tensor.cuda() should still fail on a CPU build")
        except (AssertionError, RuntimeError):
            pass
        from megatron.core.models.common.language_module.language_module import LanguageModule
        assert LanguageModule.setup_embeddings_and_output_layer._amir_cpu_wrapped
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_fp8_on_cpu_fails_clearly():
    from megatron_amir.config import ModelConfig
    from megatron_amir.model.builder import FP8UnavailableError, choose_transformer_impl

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(FP8UnavailableError, match="model.fp8='hybrid' needs CUDA and Transformer Engine"):
        choose_transformer_impl(ModelConfig(fp8="hybrid"))
    with pytest.raises(FP8UnavailableError, match="transformer_impl=transformer_engine"):
        choose_transformer_impl(ModelConfig(transformer_impl="transformer_engine"))
    assert choose_transformer_impl(ModelConfig()) == "local"


def test_fp8_with_the_local_layers_is_refused(monkeypatch):
    """Megatron's local layers ignore TE's fp8_autocast: model.fp8 with transformer_impl=local would train in bf16
    while the config says FP8. Simulated GPU + TE (the check runs before any CUDA call)."""
    from megatron_amir.config import ModelConfig
    from megatron_amir.model import builder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(builder, "check_fp8_support", lambda *a: None)
    with pytest.raises(builder.FP8UnavailableError, match="needs model.transformer_impl=transformer_engine"):
        builder.choose_transformer_impl(ModelConfig(fp8="hybrid", transformer_impl="local"))
    assert builder.choose_transformer_impl(ModelConfig(fp8="hybrid")) == "transformer_engine"
