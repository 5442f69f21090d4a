"""vLLM engine: CPU checks of the pieces that do not need vLLM; the engine itself on GPU (marked gpu)."""

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_amir.config import RolloutConfig
from megatron_amir.rollout.embedded import EmbeddedEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.vllm_engine import EXTENSION, vllm_serve_command, write_hf_dir
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(1)


def test_write_hf_dir_round_trips_through_the_embedded_engine(tmp_path):
    hf, cfg = tiny_hf_model("qwen3")
    d = write_hf_dir(tmp_path / "m", cfg, hf.state_dict())
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    a = EmbeddedEngine.from_hf_dir(d).generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=5))
    b = EmbeddedEngine(cfg, hf.state_dict()).generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=5))
    assert a[0].samples[0].token_ids == b[0].samples[0].token_ids


def test_vllm_serve_command_has_rlhf_pieces():
    rc = RolloutConfig(fp8_rollout=True, vllm_tensor_parallel_size=2, logprobs_mode="raw_logprobs")
    argv, env = vllm_serve_command("/models/x", 8001, rc)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    # the worker extension is importable from the vLLM process through PYTHONPATH (vLLM may live in another venv)
    module, cls = EXTENSION.rsplit(".", 1)
    repo = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(repo) / (module.replace(".", "/") + ".py")).is_file()
    assert cls in (Path(repo) / (module.replace(".", "/") + ".py")).read_text()
    s = " ".join(argv)
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/x"]
    assert "--worker-extension-cls " + EXTENSION in s and "--logprobs-mode raw_logprobs" in s
    assert "--skip-tokenizer-init" in argv and "--generation-config vllm" in s  # no generation defaults leak
    assert "--tensor-parallel-size 2" in s and "--quantization fp8" in s and "--host 127.0.0.1" in s
    # FP8 comes from the served directory (an FP8 checkpoint, rollout.fp8): overrides claiming FP8 over float weights
    # made vLLM cast them to e4m3 unscaled
    assert "--hf-overrides" not in argv


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM engine needs CUDA")
def test_vllm_engine_logprobs_greedy_and_weight_update(tmp_path):
    pytest.importorskip("vllm")
    from megatron_amir.rollout.vllm_engine import VLLMEngine

    # head size 64 / 2 = 32: vLLM's attention backends start at head size 32 (16, tiny_hf_model's default, is not one)
    hf, cfg = tiny_hf_model("llama", max_position_embeddings=512, num_attention_heads=2, num_key_value_heads=1)
    rc = RolloutConfig(logprobs_mode="processed_logprobs", vllm_gpu_memory_utilization=0.2)
    eng = VLLMEngine.from_config(rc, cfg, hf.state_dict(), workdir=tmp_path, dtype="float32", enforce_eager=True)
    try:
        prompts = [[1, 2, 3], [7, 8, 9, 10]]
        res = eng.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=8, seed=1), n=3)
        for p, g in zip(prompts, res):
            for s in g.samples:
                ids = torch.tensor([p + s.token_ids])
                with torch.no_grad():
                    logits = hf(ids).logits[0, len(p) - 1 : -1].double() / 0.7
                ref = logits.log_softmax(-1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
                assert (ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max() < 1e-3
        new, _ = tiny_hf_model("llama", seed=4, max_position_embeddings=512, num_attention_heads=2,
                               num_key_value_heads=1)
        eng.load_weights(new.state_dict(), 2)
        g = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))[0]
        ids = torch.tensor([[5, 6, 7]])
        ref = new.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert g.samples[0].token_ids == ref[0, 3:].tolist() and g.weight_version == 2
    finally:
        eng.close()
