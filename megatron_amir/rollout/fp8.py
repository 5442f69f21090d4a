"""FP8 block quantization of the weights sent to FP8 rollout engines, in the layout vLLM's FP8 loader expects.

vLLM's block-wise FP8 linear layers (``quant_method: fp8`` with ``weight_block_size: [128, 128]``, the
``FP8_HF_OVERRIDES`` of ``vllm_engine``) hold ``weight`` [N, K] as float8_e4m3fn and ``weight_scale_inv`` [ceil(N/128),
ceil(K/128)] as float32, and dequantize each 128×128 block b as ``W_b ≈ weight_b · weight_scale_inv_b`` (vLLM's
``scaled_dequantize`` with group shape [128, 128]). Its loader does not compute those scales from bf16 weights
(a plain bf16 update would be cast to e4m3 unscaled), so the trainer sends both tensors.

Per block (the formula ``quantize_block_fp8`` computes, in float32):

    s_b = max(|W_b|) / 448          (448 = the largest e4m3fn value; s_b = 1 for an all-zero block)
    q_b = round_to_e4m3(W_b / s_b)  (|W_b / s_b| <= 448, so nothing saturates)
    weight = q, weight_scale_inv = s

Error bound: e4m3 keeps 3 mantissa bits, so a normal value is off by at most half an ulp, 2^-4 of its size; below
2^-6 (the smallest normal) the spacing is 2^-9, so |W - q·s| <= max(2^-4 |W|, 2^-10 s_b) per element.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

BLOCK = 128
E4M3_MAX = 448.0
# the linear layers vLLM's FP8 method quantizes (embeddings, norms and the output layer stay in the model dtype)
QUANTIZED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                      "up_proj.weight", "down_proj.weight")


def quantize_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/block), ceil(K/block)]) of a 2-D ``w``;
    formula in the module docstring. Partial blocks at the edges use their own maximum."""
    if w.ndim != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    x = w.detach().float()
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = x
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    q = q.view(nb * block, kb * block)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """q · scale_inv per block, float32 (the reference side of the round trip; vLLM's ``scaled_dequantize`` is the
    other, in tests)."""
    n, k = q.shape
    s = scale_inv.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * s


def fp8_named_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors as an FP8 rollout engine loads them: each quantized linear weight becomes ``<name>`` (e4m3)
    plus ``<prefix>.weight_scale_inv``; everything else passes through."""
    for name, t in named:
        if name.endswith(QUANTIZED_SUFFIXES) and t.ndim == 2:
            q, s = quantize_block_fp8(t)
            yield name, q
            yield name[: -len("weight")] + "weight_scale_inv", s
        else:
            yield name, t
