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

Every route that hands weights to a rollout engine with ``rollout.fp8_rollout`` carries this layout (the HF directory an
engine starts from, whose config.json gets ``FP8_QUANTIZATION_CONFIG``, the per-step file snapshot, the bucketed
broadcast): ``Fp8Buckets`` quantizes a bucketed stream bucket by bucket on the sending rank. vLLM loads it as a
checkpoint (its in-place reload with ``is_checkpoint_format=True`` puts every layer back into checkpoint form, loads,
and re-runs ``process_weights_after_loading``, so an update leaves a layer as a fresh load would); the embedded engine
dequantizes it into its weights (``Dequantizer``), so it samples from exactly the weights vLLM's FP8 layers hold.
This follows verl's FP8 rollout (the same 128×128 blocks with amax/448 scales and dynamic 1×128 activations), except
that verl quantizes inside a patched vLLM ``load_weights`` and patches ``process_weights_after_loading``, while here the
trainer sends checkpoint-format tensors and vLLM's own reload does the rest.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

BLOCK = 128
E4M3_MAX = 448.0
# the linear layers vLLM's FP8 method quantizes (embeddings, norms and the output layer stay in the model dtype)
QUANTIZED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                      "up_proj.weight", "down_proj.weight")
SCALE_SUFFIX = "weight_scale_inv"
# config.json's quantization_config of an FP8 checkpoint: vLLM's Fp8Config reads it as checkpoint-serialized block FP8
# (e4m3 weight + float32 weight_scale_inv parameters per linear layer, activations quantized per 1×128 group at run time)
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                           "weight_block_size": [BLOCK, BLOCK]}


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


def is_quantized(name: str, shape) -> bool:
    """Whether an FP8 rollout engine holds tensor ``name`` of ``shape`` quantized."""
    return name.endswith(QUANTIZED_SUFFIXES) and len(shape) == 2


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + SCALE_SUFFIX


def fp8_named_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors as an FP8 rollout engine loads them: each quantized linear weight becomes ``<name>`` (e4m3)
    plus ``<prefix>.weight_scale_inv`` right after it; everything else (an already quantized e4m3 weight and its
    scale included) passes through."""
    items = named.items() if isinstance(named, Mapping) else named
    for name, t in items:
        if is_quantized(name, t.shape) and t.dtype != torch.float8_e4m3fn:
            q, s = quantize_block_fp8(t)
            yield name, q
            yield scale_name(name), s
        else:
            yield name, t


def fp8_layout(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]
               ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what ``fp8_named_tensors`` makes of tensors (name, dtype, shape), from metadata only."""
    out = []
    for name, dtype, shape in entries:
        if is_quantized(name, shape) and dtype != torch.float8_e4m3fn:
            out.append((name, torch.float8_e4m3fn, tuple(shape)))
            out.append((scale_name(name), torch.float32, (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))))
        else:
            out.append((name, dtype, tuple(shape)))
    return out


def fp8_hf_config(hf_config: Mapping[str, Any]) -> dict:
    """``hf_config`` with the ``quantization_config`` of an FP8 block checkpoint (what the HF directory an FP8 engine
    starts from says, so vLLM allocates e4m3 weights and their scales)."""
    return {**dict(hf_config), "quantization_config": dict(FP8_QUANTIZATION_CONFIG)}


class Dequantizer:
    """The inverse view for an engine that holds float weights (the embedded engine's simulated FP8): each e4m3
    ``<prefix>.weight`` and its ``<prefix>.weight_scale_inv`` (in either order, in the same or in later calls: an
    update that arrives bucket by bucket may split a pair) become one float32 ``<prefix>.weight`` =
    ``dequantize_block_fp8``; everything else passes through. ``finish`` raises naming a weight without its scale or a
    scale without its weight."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}  # the first half of a pair, by weight name

    def __call__(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        items = named.items() if isinstance(named, Mapping) else named
        for name, t in items:
            if name.endswith(SCALE_SUFFIX):
                weight = name[: -len(SCALE_SUFFIX)] + "weight"
            elif t.dtype == torch.float8_e4m3fn:
                weight = name
            else:
                yield name, t
                continue
            other = self._held.pop(weight, None)
            if other is None:
                self._held[weight] = t
                continue
            q, s = (t, other) if name == weight else (other, t)
            if q.dtype != torch.float8_e4m3fn:
                raise ValueError(f"FP8 weights: {weight!r} has dtype {q.dtype} beside its {SCALE_SUFFIX}; expected "
                                 f"float8_e4m3fn")
            yield weight, dequantize_block_fp8(q, s.float())

    def finish(self) -> None:
        if self._held:
            first = sorted(self._held)[0]
            half = SCALE_SUFFIX if self._held[first].dtype == torch.float8_e4m3fn else "e4m3 weight"
            raise ValueError(f"FP8 weights: {first!r} arrived without its {half} ({len(self._held)} incomplete "
                             f"pair(s))")


def dequantized(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Every pair of a complete set of tensors dequantized (``Dequantizer``), as a list."""
    d = Dequantizer()
    out = list(d(named))
    d.finish()
    return out


class Fp8Buckets:
    """A bucketed weight stream (``training.weight_stream.WeightStream``, ``weight_sync.PackedBuckets``: ``update_info``
    + an iterator of ``Bucket``s) in FP8 rollout layout: each bucket is quantized (``fp8_named_tensors``) into a new,
    smaller bucket when it is reached, and the source bucket is let go before the next one is asked for. So the sending
    rank holds one source bucket, its FP8 copy and one tensor's quantization temporaries, never a whole model; a
    weight and its scale always share a bucket. ``update_info`` announces the quantized layout up front, computed from
    the source's metadata alone."""

    def __init__(self, stream):
        self.stream = stream
        info = stream.update_info()
        self._layouts: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = []
        self._sizes: list[int] = []
        names, dtypes, shapes = info["names"], info["dtype_names"], info["shapes"]
        start = 0
        for _, count in info["buckets"]:
            src = [(names[i], getattr(torch, dtypes[i]), tuple(shapes[i])) for i in range(start, start + count)]
            start += count
            lay, size = _pack(fp8_layout(src))
            self._layouts.append(lay)
            self._sizes.append(size)

    def update_info(self) -> dict:
        entries = [e for lay in self._layouts for e in lay]
        return {"names": [n for n, _, _, _ in entries],
                "dtype_names": [str(d).removeprefix("torch.") for _, d, _, _ in entries],
                "shapes": [list(s) for _, _, s, _ in entries], "offsets": [o for _, _, _, o in entries],
                "buckets": [[size, len(lay)] for size, lay in zip(self._sizes, self._layouts)]}

    def __iter__(self) -> Iterator:
        from megatron_amir.rollout.weight_sync import Bucket, view_in

        for src, lay, size in zip(self.stream, self._layouts, self._sizes):
            tensors = src.tensors if hasattr(src, "tensors") else src
            buf = torch.empty(size, dtype=torch.uint8, device=tensors[0][1].device if tensors else "cpu")
            views = []
            for (name, t), (lname, dtype, shape, off) in zip(fp8_named_tensors(tensors), lay):
                if name != lname or t.dtype != dtype or tuple(t.shape) != shape:
                    raise RuntimeError(f"FP8 stream: bucket holds {name!r} {t.dtype} {tuple(t.shape)} where the "
                                       f"announced layout has {lname!r} {dtype} {shape}")
                view_in(buf, off, dtype, shape).copy_(t)
                views.append((name, view_in(buf, off, dtype, shape)))
                del t
            if hasattr(src, "buffer"):  # spent: its source generator still names it until the next bucket is asked for
                src.buffer.untyped_storage().resize_(0)
            del tensors, src
            bucket = Bucket(buf, views)
            del views, buf
            yield bucket
            bucket.release()

    def drain(self) -> None:
        """Take part in the source stream without consuming it (the trainer's ranks other than 0)."""
        self.stream.drain()

    def collect(self) -> Optional[dict[str, torch.Tensor]]:
        """Every quantized tensor (a whole-model FP8 copy, for the asynchronous producer); None where the source
        stream yields nothing (the trainer's ranks other than 0)."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self:
            out.update(bucket.tensors)
        return out if out else None


def _pack(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
          ) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    """Byte offsets of ``entries`` packed back to back in one bucket (each aligned as ``weight_sync.align``), and the
    bucket's size."""
    from megatron_amir.rollout.weight_sync import align, itemsize

    out, size = [], 0
    for name, dtype, shape in entries:
        n = 1
        for x in shape:
            n *= x
        off = align(size)
        out.append((name, dtype, shape, off))
        size = off + n * itemsize(dtype)
    return out, size
