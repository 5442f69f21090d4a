"""The supervised warm-up (`megatron-amir sft`): data-parallel batches, its checkpoints beside RL's, bad arguments."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"
TINY = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_kv_heads=1", "data.synthetic.num_train=200", "data.synthetic.num_test=16",
        "logging.progress=false", "logging.tensorboard=false"]


def _sft(run: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    cmd = [*launcher, "launch.cli", "sft", str(CONFIG), *TINY, f"logging.dir={run}",
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


class _Crash(RuntimeError):
    pass


def _warmup_like(run: Path, losses, crash_at=None):
    """What run_sft needs of a WarmupRunner: a one-rank policy whose updates return ``losses`` in order (raising
    at update number ``crash_at``, a killed attempt), tiny problems, and the real metrics logger on ``run``."""
    from megatron_amir.config import Config
    from megatron_amir.training.metrics import MetricsLogger

    losses, calls = iter(losses), []

    def train_step(tokens, batch):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise _Crash()
        return {"loss": next(losses), "grad_norm": 1.0, "lr": 1e-3}

    cfg = Config(model=dict(vocab_size=64), logging=dict(progress=False, dir=str(run)))
    return types.SimpleNamespace(
        cfg=cfg, rank=0, metrics=MetricsLogger(run, tensorboard=False),
        policy=types.SimpleNamespace(dp_size=1, info=types.SimpleNamespace(dp_rank=0), train_step=train_step),
        train_problems=[types.SimpleNamespace(prompt="1+1=", solution="2")],
        tokenizer=types.SimpleNamespace(encode=lambda s: [5] * len(s), eos_id=1, pad_id=0))


def _steps(run: Path, warmup: bool) -> list[tuple[int, float]]:
    """(step, loss) of the warm-up's rows (they carry sft/loss) or the RL rows in ``run``'s metrics.jsonl."""
    from megatron_amir.training.metrics import read_metrics

    return [(r["step"], r.get("sft/loss", r.get("loss"))) for r in read_metrics(run / "metrics.jsonl")
            if ("sft/loss" in r) == warmup]


def test_restarted_warmup_logs_each_step_once_and_keeps_rl_rows(tmp_path):
    """The warm-up shares logging.dir (metrics.jsonl) with RL by default. A warm-up started again (after a crash,
    or continuing its checkpoint at step k) drops its own rows past its start before logging, so every warm-up
    step appears once, from the attempt that finished; the RL rows stay as they were. Before: every start only
    appended, so a restarted warm-up logged steps 1, 2, 3, 1, 2, ... An RL resume likewise keeps the warm-up's
    rows (before: it dropped every row past its step, warm-up rows included)."""
    from megatron_amir.training.metrics import MetricsLogger
    from megatron_amir.training.sft import run_sft

    run = tmp_path / "run"
    rl = MetricsLogger(run, tensorboard=False)
    for s in (1, 2, 3, 4):
        rl.log(s, {"loss": 10.0 + s, "reward/mean": 0.5})
    rl_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # a first attempt killed during its 4th step, then the warm-up started again from scratch
    with pytest.raises(_Crash):
        run_sft(_warmup_like(run, [0.1, 0.2, 0.3], crash_at=4), steps=5, batch_size=2)
    assert [s for s, _ in _steps(run, True)] == [1, 2, 3]
    last = run_sft(_warmup_like(run, [1.1, 1.2, 1.3, 1.4, 1.5]), steps=5, batch_size=2)
    assert last["sft/steps"] == 5
    assert _steps(run, True) == [(1, 1.1), (2, 1.2), (3, 1.3), (4, 1.4), (5, 1.5)]
    # continuing the warm-up checkpoint of step 5: a killed attempt (logged step 6), then one that finishes
    with pytest.raises(_Crash):
        run_sft(_warmup_like(run, [2.6], crash_at=2), steps=3, batch_size=2, start=5)
    last = run_sft(_warmup_like(run, [3.6, 3.7, 3.8]), steps=3, batch_size=2, start=5)
    assert last["sft/steps"] == 8
    assert _steps(run, True) == [(1, 1.1), (2, 1.2), (3, 1.3), (4, 1.4), (5, 1.5), (6, 3.6), (7, 3.7),
                                        (8, 3.8)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "sft/loss" not in r] == rl_rows  # RL rows untouched, in order
    # the RL trainer's resume at step 2 drops its own rows 3, 4 and none of the warm-up's
    from megatron_amir.training.metrics import RL_KIND, row_kind

    assert {row_kind(r) for r in rows} == {RL_KIND, "sft-warmup"}
    MetricsLogger(run, tensorboard=False).truncate_after(2, kind=RL_KIND)
    assert [s for s, _ in _steps(run, False)] == [1, 2]
    assert [s for s, _ in _steps(run, True)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]  # no temp file left behind


def test_metrics_truncation_is_atomic_and_drops_a_torn_line(tmp_path, monkeypatch):
    """The rewrite goes to a temp file that replaces metrics.jsonl: a crash while writing leaves the old file
    whole. A last line torn by a kill mid-append is dropped instead of stopping the resume."""
    from megatron_amir.training import metrics as metrics_mod

    m = metrics_mod.MetricsLogger(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        m.log(s, {"loss": float(s)})
    with open(m.path, "a") as f:
        f.write('{"step": 4, "lo')
    before = m.path.read_text()

    def crash(path, text, fsync=True):
        raise OSError("disk full")

    monkeypatch.setattr(metrics_mod, "atomic_write_text", crash)
    with pytest.raises(OSError):
        m.truncate_after(2)
    assert m.path.read_text() == before
    monkeypatch.undo()
    m.truncate_after(2)
    assert [r["step"] for r in metrics_mod.read_metrics(m.path)] == [1, 2]


def test_warmup_continues_the_step_count_of_a_warmup_checkpoint(tmp_path, monkeypatch):
    """--init-from / model.load naming a warm-up checkpoint at step k: the warm-up resumes at step k (its rows
    past k are re-logged); any other starting point (an RL checkpoint, a converted model, none) starts at 0."""
    from megatron_amir.config import load_config
    from megatron_amir.training import data_setup, trainer
    from megatron_amir.training.sft import WarmupRunner

    monkeypatch.setattr(trainer, "starting_checkpoint", lambda cfg, rank, barrier, init_from: init_from)
    monkeypatch.setattr(trainer, "load_starting_weights", lambda policy, cfg, path: None)
    monkeypatch.setattr(data_setup, "rollout_hf_config", lambda cfg, tok, base=None: {})
    warm, rl, conv = _ckpt(tmp_path / "w", 250, "sft-warmup"), _ckpt(tmp_path / "r", 40, None), tmp_path / "conv"
    conv.mkdir()
    for path, want in ((warm, 250), (rl, 0), (conv, 0), (None, 0)):
        r = types.SimpleNamespace(cfg=load_config(CONFIG, []), rank=0, policy=types.SimpleNamespace(barrier=None),
                                  tokenizer=None, start_step=0)
        WarmupRunner.start_from(r, None if path is None else str(path))
        assert r.start_step == want, path


@pytest.mark.slow
def test_warmup_cli_restart_and_continuation_log_each_step_once(tmp_path):
    """`megatron-amir sft` into a logging.dir that also holds RL rows: run again from scratch, then continued from
    its checkpoint (--init-from step 2: steps 3, 4, saved as step_00000004). Each warm-up step is logged once;
    the RL rows are kept. Before: 2 + 2 + 2 warm-up rows, steps 1, 2, 1, 2, 1, 2, and a step_00000002 again."""
    run = tmp_path / "run"
    run.mkdir()
    rl = '{"step": 1, "loss": 0.5, "reward/mean": 0.25}\n{"step": 2, "loss": 0.4, "reward/mean": 0.5}\n'
    (run / "metrics.jsonl").write_text(rl)
    for extra in ([], [], ["--init-from", str(run / "ckpt" / "step_00000002")]):
        out = _sft(run, 1, "--steps", "2", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
    assert [s for s, _ in _steps(run, True)] == [1, 2, 3, 4]
    assert "".join(line + "\n" for line in (run / "metrics.jsonl").read_text().splitlines()
                   if "sft/loss" not in line) == rl
    assert [p.name for p in (run / "ckpt").glob("step_*")] == ["step_00000004"]


def test_continued_warmup_draws_the_batches_an_uninterrupted_one_would(tmp_path, monkeypatch):
    """Steps k+1 ... of a warm-up continued from its step-k checkpoint train on the batches an uninterrupted warm-up
    draws at those steps (before: the data RNG started again, repeating the batches of steps 1 ...)."""
    from megatron_amir.training import sft

    drawn: list[list[str]] = []

    def record(tokenizer, prompts, solutions):
        drawn.append(list(prompts))
        return torch.ones(len(prompts), 4, dtype=torch.long), torch.ones(len(prompts), 3)

    monkeypatch.setattr(sft, "tokenize_examples", record)

    def runner(run):
        t = _warmup_like(run, [0.5] * 6)
        t.train_problems = [types.SimpleNamespace(prompt=f"p{i}", solution="1") for i in range(50)]
        return t

    sft.run_sft(runner(tmp_path / "a"), steps=6, batch_size=3)
    straight, drawn[:] = list(drawn), []
    sft.run_sft(runner(tmp_path / "b"), steps=2, batch_size=3)
    sft.run_sft(runner(tmp_path / "b"), steps=4, batch_size=3, start=2)
    assert drawn == straight and straight[2] != straight[0]


@pytest.mark.parametrize("metric,accs,want", [
    ("greedy", [0.1, 0.25, 0.31, 0.5], (3, 1.0)),   # stops at the third evaluation (step 6)
    ("sampled", [0.1, 0.25, 0.31, 0.5], (4, 0.0)),  # the sampled numbers never reach 0.3: the budget runs out
])
def test_warmup_stops_on_the_chosen_metric_and_says_why(tmp_path, metric, accs, want):
    from megatron_amir.training import sft

    t = _warmup_like(tmp_path, [1.0] * 8)
    evals = iter(accs)

    def quick_accuracy(n):
        assert n == 256
        a = next(evals)
        return {"eval/greedy_accuracy": a, "eval/sampled_accuracy": a / 2}

    t.quick_accuracy = quick_accuracy
    last = sft.run_sft(t, steps=8, batch_size=2, eval_every=2, target_accuracy=0.3, eval_problems=256,
                       target_metric=metric)
    steps, reached = want
    assert (last["sft/steps"], last["sft/target_reached"]) == (2 * steps, reached)
    with pytest.raises(ValueError, match="target_metric"):
        sft.run_sft(t, steps=1, batch_size=2, target_metric="best")


def test_validation_problems_are_disjoint_from_train_and_test():
    """The warm-up stops on problems that RL is never evaluated on, and never trained on."""
    from megatron_amir.config import load_config
    from megatron_amir.training.data_setup import build_data
    from megatron_amir.training.sft import WarmupRunner

    cfg = load_config(CONFIG, [])
    _, sampler, test = build_data(cfg)
    r = types.SimpleNamespace(cfg=cfg, train_problems=sampler.records, test_problems=test, val_problems=None)
    val = WarmupRunner.validation_problems(r, 256)
    ids = [p.id for p in val]
    assert len(ids) == len(set(ids)) == 256
    assert not set(ids) & ({p.id for p in sampler.records} | {p.id for p in test})
    assert [p.id for p in WarmupRunner.validation_problems(r, 100)] == ids[:100]
