"""`megatron-amir eval --model <trainer checkpoint>`: the Megatron -> HF path of eval.loading gives the
rollout engine the same model (log-probs agree with the Megatron policy's) on one CPU process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from megatron_amir.config import Config
    from megatron_amir.training.policy import Policy
    from megatron_amir.training.parallel import shutdown_parallel
    from megatron_amir.eval import loading

    def main():
        out = Path(sys.argv[1])
        cfg = Config(model=dict(arch="qwen2", vocab_size=256, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                                num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64),
                     data=dict(prompts_per_step=2), rollout=dict(group_size=4), train=dict(micro_batch_size=2, seed=7))
        policy = Policy(cfg)
        # the trainer's layout: CheckpointManager step directory with meta.json (config) and a manifest
        from megatron_amir.training.checkpoint import CheckpointManager
        step = CheckpointManager(out / "run" / "checkpoints").save(
            3, lambda d: policy.save(d / "model", save_optimizer=False),
            {"step": 3, "config": cfg.model_dump(mode="json")})
        tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
        ref = policy.compute_logprobs(tokens)
        shutdown_parallel()

        step_dir = loading.find_trainer_checkpoint(out / "run")  # a run directory holding checkpoints/
        assert step_dir == step, step_dir
        cfg2 = loading.config_from_checkpoint(step_dir)
        engine, meta = loading.load_engine(str(out / "run"), cfg2, logprobs_mode="raw_logprobs", step_dir=step_dir)
        assert meta["model_kind"] == "megatron"
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = engine.model(tokens, pos).float()
        got = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        diff = float((got - ref).abs().max())
        print("maxdiff", diff)
        assert diff < 1e-4, diff

        # the whole CLI on the trainer run directory: config, tokenizer (the demo one, as the trainer builds
        # it) and problems (the synthetic held-out split) all come from the checkpoint's stored config
        from megatron_amir.eval import runner
        from megatron_amir.eval.results import read_results
        rc = runner.main(["--model", str(out / "run"), "--bench", "synthetic", "--samples", "2", "--out",
                          str(out / "eval"), "--max-new-tokens", "4", "--max-problems", "3", "--no-progress",
                          "reward.name=exact"])
        assert rc == 0, rc
        rs = read_results(out / "eval")
        assert len(rs) == 3 and all(r.n == 2 for r in rs)
        summary = json.loads((out / "eval" / "summary.json").read_text())
        assert summary["extra"]["model_kind"] == "megatron" and summary["extra"]["checkpoint"].endswith("step_00000003")


    if __name__ == "__main__":  # dist_checkpointing.save starts a spawn Manager
        main()
''')


def test_trainer_checkpoint_loads_into_the_engine(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MEGATRON_AMIR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "maxdiff" in proc.stdout
