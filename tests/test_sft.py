"""The supervised warm-up (`megatron-amir sft`): data-parallel batches, its checkpoints beside RL's, bad arguments."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"
TINY = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_kv_heads=1", "data.synthetic.num_train=200", "data.synthetic.num_test=16",
        "logging.progress=false", "logging.tensorboard=false"]


def _sft(run: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    cmd = [*launcher, "megatron_amir.cli", "sft", str(CONFIG), *TINY, f"logging.dir={run}",
           f"checkpoint.dir={run / 'ckpt'}", "--batch-size", "8", "--eval-every", "0", *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=600,
                          capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.dist
def test_data_parallel_warmup_equals_one_process(tmp_path):
    """Each DP rank trains its share of the batch, weighted by the whole batch's tokens: the summed loss is the
    single process's token-mean NLL (before: every rank took the whole batch and the loss doubled)."""
    rows = {}
    for nproc in (1, 2):
        out = _sft(tmp_path / f"dp{nproc}", nproc, "--steps", "2")
        assert out.returncode == 0, out.stderr[-3000:]
        rows[nproc] = [json.loads(l) for l in (tmp_path / f"dp{nproc}" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows[1], rows[2]):
        assert b["sft/loss"] == pytest.approx(a["sft/loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-4)


def test_steps_must_be_positive(tmp_path):
    out = _sft(tmp_path, 1, "--steps", "0")
    assert out.returncode == 2 and "--steps must be >= 1" in out.stderr


def _ckpt(root: Path, step: int, kind):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, **({"kind": kind} if kind else {})}))
    return d


def test_warmup_and_rl_checkpoints_do_not_mix(tmp_path):
    """The warm-up refuses a checkpoint.dir holding RL checkpoints (its keep-last-1 would delete them), and the RL
    trainer refuses to *resume* a warm-up checkpoint (it starts from one with --init-from)."""
    from megatron_amir.config import load_config
    from megatron_amir.training.sft import WarmupRunner
    from megatron_amir.training.trainer import Trainer

    _ckpt(tmp_path / "rl", 50, None)
    cfg = load_config(CONFIG, [f"checkpoint.dir={tmp_path / 'rl'}"])
    with pytest.raises(ValueError, match=r"holds RL checkpoints \(step_00000050\)"):
        WarmupRunner.save(types.SimpleNamespace(cfg=cfg, rank=0), 10, {})
    warm = _ckpt(tmp_path / "warm", 250, "sft-warmup")
    t = Trainer.__new__(Trainer)
    t.cfg = load_config(CONFIG, [f"checkpoint.resume={warm}"])
    with pytest.raises(ValueError, match="is a warm-up \\(sft\\) checkpoint, not an RL one: start RL from it with"):
        t._resume()
