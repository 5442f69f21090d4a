"""GPU-only checks of the weight stream and its transports (skipped with a reason on CPU):

- the stream out of a CUDA model: CUDA memory allocated beyond the model stays within bucket + largest tensor
  (torch's own allocator statistics, independent of the stream's bookkeeping), tensors equal to the model's;
- the bucketed broadcast over NCCL (``TensorBroadcaster`` backend "nccl", the same code as gloo) into a receiver
  process on a second GPU (NCCL refuses two ranks on one device);
- the colocated vLLM engine's sleep / wake_up around a weight update: memory given back, then greedy output equal
  before and after (needs vLLM with CUDA).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (marked gpu)")]


def _model_cfg():
    from megatron_amir.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=8192, hidden_size=512, ffn_hidden_size=1024, num_layers=4,
                       num_attention_heads=8, num_kv_heads=4, max_position_embeddings=256)


def test_stream_from_cuda_model_stays_within_bucket_plus_largest():
    from megatron_amir.convert.mapping import mcore_to_hf_named_tensors
    from megatron_amir.convert.megatron_side import build_empty_model, single_process_megatron
    from megatron_amir.training.weight_stream import WeightStream

    cfg = _model_cfg()
    with single_process_megatron():
        model = build_empty_model(cfg).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        ref = {k: v.cpu() for k, v in mcore_to_hf_named_tensors(model.state_dict(), cfg, vocab_size=8000)}
        bucket = 4 * 2**20
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stream = WeightStream([model], cfg, bucket_bytes=bucket, vocab_size=8000)
        got = {}
        for b in stream:
            assert b.buffer.is_cuda
            for name, t in b.tensors:
                got[name] = t.cpu()  # host copies: not counted by the CUDA allocator
        peak = torch.cuda.max_memory_allocated() - base
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert 0 < peak <= max(bucket, stream.largest) + stream.largest, (peak, bucket, stream.largest)


def _nccl_receiver(port: int, info: dict, out) -> None:
    from megatron_amir.rollout.weight_sync import TensorBroadcaster, receive_buckets

    comm = TensorBroadcaster.create("nccl", "127.0.0.1", port, 1, 2, 60, device=torch.device("cuda:1"))
    got = {}
    for bucket in receive_buckets(comm, info, device="cuda:1"):
        got.update({n: t.cpu() for n, t in bucket})
    out.put(got)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs 2 GPUs (one rank per device)")
def test_bucketed_broadcast_over_nccl():
    from megatron_amir.rollout.router import free_port
    from megatron_amir.rollout.weight_sync import PackedBuckets, TensorBroadcaster, send_buckets

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + i, 64, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(12)}
    packed = PackedBuckets({k: v.cuda() for k, v in tensors.items()}, bucket_bytes=100_000)
    port = free_port("127.0.0.1")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_nccl_receiver, args=(port, packed.update_info(), out))
    proc.start()
    comm = TensorBroadcaster.create("nccl", "127.0.0.1", port, 0, 2, 60, device=torch.device("cuda:0"))
    assert send_buckets({"r": comm}, packed) == {}
    got = out.get(timeout=120)
    proc.join(60)
    assert proc.exitcode == 0 and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_vllm_sleep_wake_around_an_update(tmp_path):
    pytest.importorskip("vllm")
    from megatron_amir.rollout.engine import SamplingParams
    from megatron_amir.rollout.vllm_engine import VLLMEngine, write_hf_dir
    from megatron_amir.rollout.weight_sync import PackedBuckets
    from rollout_helpers import tiny_hf_model

    hf, cfg = tiny_hf_model("llama", seed=0, num_attention_heads=2, num_key_value_heads=1)
    new, _ = tiny_hf_model("llama", seed=3, num_attention_heads=2, num_key_value_heads=1)
    engine = VLLMEngine(write_hf_dir(tmp_path / "m", cfg, hf.state_dict()), gpu_memory_utilization=0.3,
                        dtype="float32", max_model_len=256, enforce_eager=True, sync_dir=tmp_path / "sync",
                        extra_engine_args={"enable_sleep_mode": True})
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    try:
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep(1)
        assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache (and weights) went back to the device
        engine.wake_up(["weights"])
        engine.load_weight_buckets(PackedBuckets(new.state_dict()), 1)
        engine.wake_up(["kv_cache"])
        out = engine.generate([[3, 1, 4, 1, 5]], sp)[0].samples[0].token_ids
    finally:
        engine.close()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    ref = new.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                       pad_token_id=0)[0, 5:].tolist()
    assert out == ref


def test_colocated_trainer_with_vllm_sleep_mode(tmp_path):
    """The trainer with a colocated vLLM engine on the GPU (rollout.engine=vllm, tests/colocated_sleep_check.py without
    the stand-in), two steps with rollout.vllm_sleep_level=1 and two without: with sleep the engine sleeps after each
    rollout and wakes weights -> update -> KV cache, the GPU memory held drops at every sleep, and the greedy output
    after every update equals the run without sleep."""
    pytest.importorskip("vllm")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "varied_reward.py").write_text(
        "import zlib\n\n\ndef by_hash(responses, answers):\n"
        "    return [float(zlib.crc32(r.encode()) % 2) for r in responses]\n")
    # head size 32 (64 / 2 heads), as the vLLM tests use; two steps, no eval, no checkpoint
    overrides = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2",
                 "model.num_attention_heads=2", "model.num_kv_heads=1", "model.tie_word_embeddings=false", "data.prompts_per_step=4",
                 "rollout.group_size=4", "rollout.max_new_tokens=12", "train.micro_batch_size=16",
                 "data.synthetic.num_train=200", "data.synthetic.num_test=16", "eval.interval=0",
                 "logging.progress=false", "logging.tensorboard=false", "train.lr=1e-3", "train.steps=2",
                 "train.deterministic=true", "checkpoint.save_interval=1000", "rollout.engine=vllm",
                 "rollout.vllm_gpu_memory_utilization=0.3", "reward.name=varied_reward:by_hash"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), str(tmp_path)])}
    checks = {}
    for level in (1, 0):
        run = tmp_path / f"level{level}"
        res = subprocess.run([sys.executable, str(root / "tests" / "colocated_sleep_check.py"),
                              str(root / "configs" / "demo_tiny.yaml"), str(run / "check.json"), *overrides,
                              f"rollout.vllm_sleep_level={level}", f"logging.dir={run}",
                              f"checkpoint.dir={run / 'ckpt'}"],
                             env=env, cwd=root, timeout=400, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        checks[level] = json.loads((run / "check.json").read_text())
    asleep = checks[1]
    assert asleep["calls"] == [c for v in (1, 2) for c in ("generate", "sleep(1)", "wake_up(weights)", f"load({v})",
                                                           "wake_up(kv_cache)")], asleep["calls"]
    # held = minus the free CUDA memory: lower after each sleep (the KV cache and the weights went to the host)
    assert len(asleep["memory"]) == 2 and all(after < before for before, after in asleep["memory"]), asleep["memory"]
    assert [p["engine"] for p in asleep["probes"]] == [p["engine"] for p in checks[0]["probes"]]
    assert len(asleep["probes"]) == 1  # the rollout after the first update (the second update ends the run)
