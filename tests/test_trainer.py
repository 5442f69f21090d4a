"""The trainer end to end on CPU: metrics, checkpoints, exact resume after SIGKILL, signals, bad configs.

Runs `megatron-amir train` as subprocesses (what users run) on a very small model.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo_tiny.yaml"

TINY = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
    "model.num_kv_heads=1", "data.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12",
    "train.micro_batch_size=8", "data.synthetic.num_train=200", "data.synthetic.num_test=16", "eval.max_problems=8",
    "eval.samples=2", "logging.progress=false", "logging.tensorboard=false", "train.lr=1e-3",
]
# keys whose values depend on wall time, not on the computation
TIMING = ("time/", "throughput/")


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(CONFIG), *TINY, f"logging.dir={run}",
            f"checkpoint.dir={run / 'ckpt'}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _export(ckpt_step: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    subprocess.run([sys.executable, "-m", "launch.cli", "convert", "mcore-to-hf", "--ckpt", str(ckpt_step),
                    "--out", str(out)], check=True, env=_env(), cwd=ROOT, capture_output=True)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.slow
def test_train_metrics_checkpoint_and_exact_resume_after_sigkill(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ["train.steps=6", "checkpoint.save_interval=1"]
    subprocess.run(_cmd(straight, *steps), check=True, env=_env(), cwd=ROOT, timeout=600, capture_output=True)
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "amir/pair_count", "amir/lambda",
                "loss", "grad_norm", "entropy", "mismatch/logp_abs_mean", "weight_version"):
        assert key in rows[-1], key
    # the engine samples with the trainer's weights: rollout vs recomputed log-probs agree
    assert all(r["mismatch/logp_abs_max"] < 1e-3 for r in rows)
    assert (straight / "ckpt" / "latest").read_text().strip() == "step_00000006"

    # same run, SIGKILLed once step 3's checkpoint is complete, then started again with the same command
    proc = subprocess.Popen(_cmd(resumed, *steps), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        latest = resumed / "ckpt" / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_00000003":
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = (resumed / "ckpt" / "latest").read_text().strip()
    assert killed_at < "step_00000006", "the run finished before it could be killed"
    out = subprocess.run(_cmd(resumed, *steps), env=_env(), cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    assert _rows(resumed) == rows  # identical metrics, step by step

    a = _export(straight / "ckpt" / "step_00000006", tmp_path / "hf_a")
    b = _export(resumed / "ckpt" / "step_00000006", tmp_path / "hf_b")
    assert a.keys() == b.keys()
    # the export of a step directory has the tokenizer's vocabulary (no padding rows) and its token ids
    meta = json.loads((straight / "ckpt" / "step_00000006" / "meta.json").read_text())
    real = meta["config"]["model"]["real_vocab_size"]
    hf_cfg = json.loads((tmp_path / "hf_a" / "config.json").read_text())
    assert real < meta["config"]["model"]["vocab_size"] and a["model.embed_tokens.weight"].shape[0] == real
    assert hf_cfg["vocab_size"] == real and hf_cfg["eos_token_id"] == meta["hf_config"]["eos_token_id"] is not None
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k  # bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 75), (signal.SIGINT, 130)], ids=["SIGUSR1", "Ctrl-C"])
def test_signal_checkpoints_and_exits(tmp_path, sig, code):
    """Slurm's preemption signal -> checkpoint + requeue code 75; Ctrl-C -> checkpoint + 130. Both resumable."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, "train.steps=200", "checkpoint.save_interval=1000"), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    step = int((run / "ckpt" / "latest").read_text().strip().split("_")[1])
    assert step >= 1 and _rows(run)[-1]["step"] == step


def test_bad_config_fails_before_any_work(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(_cmd(run, "parallel.tensor_model_parallel_size=3"), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "parallel.tensor_model_parallel_size: TP=3 must divide" in out.stderr
    assert not run.exists()


def test_step_metrics_combine_every_optimizer_update():
    """2 PPO epochs x 2 minibatches: sizes are the rollout batch's (first epoch summed), λ the last value,
    the rest means over the 4 updates of their finite values."""
    from megatron_amir.training.trainer import combine_update_metrics

    ups = [
        {"amir/num_sequences": 8.0, "amir/pair_count": 5.0, "loss": 1.0, "amir/pair_accuracy": float("nan"), "amir/lambda": 0.01},
        {"amir/num_sequences": 6.0, "amir/pair_count": 3.0, "loss": 2.0, "amir/pair_accuracy": 0.5, "amir/lambda": 0.0125},
        {"amir/num_sequences": 8.0, "amir/pair_count": 5.0, "loss": 3.0, "amir/pair_accuracy": 0.7, "amir/lambda": 0.015625},
        {"amir/num_sequences": 6.0, "amir/pair_count": 3.0, "loss": 6.0, "amir/pair_accuracy": 0.9, "amir/lambda": 0.0125},
    ]
    m = combine_update_metrics(ups, updates_per_epoch=2)
    assert m["amir/num_sequences"] == 14.0 and m["amir/pair_count"] == 8.0
    assert m["loss"] == 3.0 and m["amir/pair_accuracy"] == pytest.approx(0.7)
    assert m["amir/lambda"] == 0.0125 and m["train/updates"] == 4.0
    one = combine_update_metrics(ups[:1], updates_per_epoch=1)
    assert one["loss"] == 1.0 and one["amir/pair_accuracy"] != one["amir/pair_accuracy"]  # NaN stays NaN


def test_bad_reward_names_the_sample():
    from types import SimpleNamespace

    from megatron_amir.training.trainer import _check_rewards

    probs = [SimpleNamespace(id="p0"), SimpleNamespace(id="p1")]
    _check_rewards([0.0, 1, True, 0.5], ["a", "b", "c", "d"], probs, 2, "exact")  # numbers of any kind pass
    with pytest.raises(RuntimeError, match=r"returned nan for sample 1 of problem 'p1' .*'the answer is'"):
        _check_rewards([0.0, 1.0, 0.0, float("nan")], ["a", "b", "c", "the answer is"], probs, 2, "mine")
    with pytest.raises(RuntimeError, match="returned 3 rewards for 4 responses"):
        _check_rewards([0.0, 1.0, 0.0], ["a", "b", "c", "d"], probs, 2, "mine")
    with pytest.raises(RuntimeError, match="returned None"):
        _check_rewards([None, 1.0, 0.0, 1.0], ["a", "b", "c", "d"], probs, 2, "mine")


def test_close_releases_engine_reward_pool_and_metrics_once(monkeypatch, tmp_path):
    """``main`` closes the trainer however training ends (here: it raises), and ``close`` is idempotent."""
    from megatron_amir.training import trainer as tr

    closed = []

    class Closable:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    class FakeTrainer(tr.Trainer):
        def __init__(self, cfg, init_from=None):
            self.rank, self.step = 0, 0
            self.engine, self.reward_fn, self.metrics = Closable("engine"), Closable("reward"), Closable("metrics")

        def train(self):
            raise RuntimeError("boom")

    made = []
    monkeypatch.setattr(tr, "Trainer", lambda cfg, init_from=None: made.append(FakeTrainer(cfg)) or made[-1])
    with pytest.raises(RuntimeError, match="boom"):
        tr.main([str(CONFIG), f"logging.dir={tmp_path}", "logging.tensorboard=false"])
    assert closed == ["engine", "reward", "metrics"]
    made[0].close()  # a second close releases nothing twice
    assert closed == ["engine", "reward", "metrics", "metrics"] and made[0].engine is None


@pytest.mark.slow
def test_resume_keeps_the_starting_weights_as_reference(tmp_path):
    """With KL on, a run stopped after step 2 and resumed gives step 3 exactly as an uninterrupted run: the
    reference policy is reloaded from ``<checkpoint.dir>/reference`` (the starting weights), not rebuilt
    from the resumed weights (which would make the KL to the reference 0 again right after the resume)."""
    # a reward that varies inside every group (the tiny random model solves nothing), so the policy moves
    (tmp_path / "varied_reward.py").write_text(
        "def by_parity(responses, answers):\n    return [float(len(r) % 2) for r in responses]\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    kl = ["algorithm.kl_coef=0.05", "checkpoint.save_interval=1000", "reward.name=varied_reward:by_parity"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = lambda d, steps: subprocess.run(_cmd(d, *kl, f"train.steps={steps}"), check=True, env=env, cwd=ROOT,
                                          timeout=600, capture_output=True)
    run(straight, 3)
    run(split, 2)
    assert (split / "ckpt" / "reference" / "metadata.json").is_file()
    meta = json.loads((split / "ckpt" / "step_00000002" / "meta.json").read_text())
    assert meta["reference"] == {"source": "initial", "path": "reference"}
    run(split, 3)
    want, got = _rows(straight), _rows(split)
    assert len(want) == len(got) == 3
    assert want[1]["kl"] > 0 and want[2]["kl"] > 0  # the policy has moved away from the reference
    assert got == want
    # algorithm.reference_offload: the reference kept in host memory between passes gives the same run
    run_off = tmp_path / "offload"
    subprocess.run(_cmd(run_off, *kl, "train.steps=3", "algorithm.reference_offload=true"), check=True, env=env,
                   cwd=ROOT, timeout=600, capture_output=True)
    assert _rows(run_off) == want
    # without the recorded reference a resume stops with the path, not with a silently different objective
    shutil.rmtree(split / "ckpt" / "reference")
    out = subprocess.run(_cmd(split, *kl, "train.steps=4"), env=env, cwd=ROOT, timeout=600, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "reference policy weights not found at" in out.stderr
    # resuming another run's checkpoint into a new directory finds that run's reference and records it absolutely
    other = tmp_path / "other"
    subprocess.run(_cmd(other, *kl, "train.steps=4", f"checkpoint.resume={straight / 'ckpt' / 'step_00000003'}"),
                   check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    meta = json.loads((other / "ckpt" / "step_00000004" / "meta.json").read_text())
    assert meta["reference"]["path"] == str((straight / "ckpt" / "reference").resolve())


def test_minibatch_layout_needs_whole_groups_per_rank():
    from megatron_amir.training.trainer import _check_minibatch_layout

    _check_minibatch_layout(16, 2, 4)  # 8 rows = 2 whole groups per rank
    _check_minibatch_layout(4, 1, 4)
    with pytest.raises(ValueError, match=r"global_batch_size=4 must be a multiple of data-parallel size 2 x "
                                         r"rollout.group_size 4 = 8"):
        _check_minibatch_layout(4, 2, 4)  # each rank would train half a group per optimizer step
    with pytest.raises(ValueError, match="global_batch_size=2"):
        _check_minibatch_layout(2, 4, 1)  # fewer rows than ranks


@pytest.mark.slow
def test_hf_path_is_converted_once_and_used_as_the_starting_weights(tmp_path):
    """``model.hf_path`` (as the shipped configs use it): the HF model is converted into <checkpoint.dir>/init on
    first use and the run starts from it (lr 0: the step-1 checkpoint exports back to the same tensors); a
    model section that does not describe that checkpoint stops the run with the differing fields."""
    import transformers
    from safetensors.torch import load_file

    hf_cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch_mod = __import__("torch")
    torch_mod.manual_seed(0)
    hf_dir = tmp_path / "hf_model"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf_dir)
    want = {}
    for f in hf_dir.glob("*.safetensors"):
        want.update(load_file(f))
    run = tmp_path / "run"
    subprocess.run(_cmd(run, f"model.hf_path={hf_dir}", "train.steps=1", "train.lr=0"), check=True, env=_env(),
                   cwd=ROOT, timeout=600, capture_output=True)
    assert (run / "ckpt" / "init" / "megatron_amir_model.json").is_file()
    got = _export(run / "ckpt" / "step_00000001", tmp_path / "out")
    real = got["model.embed_tokens.weight"].shape[0]
    for k, v in got.items():
        w = want[k][:real] if k in ("model.embed_tokens.weight", "lm_head.weight") else want[k]
        assert torch_mod.equal(v, w), k
    out = subprocess.run(_cmd(tmp_path / "run2", f"model.hf_path={hf_dir}", "model.rope_theta=500000",
                              "train.steps=1"), env=_env(), cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert out.returncode != 0 and "rope_theta: config 500000.0, checkpoint 10000.0" in out.stderr


def _tiny_rollout_batch(P=2, G=4, T=6):
    import torch

    from megatron_amir.training.rollout_batch import RolloutBatch

    n = P * G
    mask = torch.zeros(n, T)
    for i in range(n):
        mask[i, 1 : 2 + i % (T - 1)] = 1
    rewards = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float64)[:n]
    return RolloutBatch(tokens=torch.randint(0, 50, (n, T + 1), generator=torch.Generator().manual_seed(0)),
                        response_mask=mask, rollout_logp=torch.zeros(n, T), rewards=rewards, correct=rewards > 0.5,
                        group_ids=torch.arange(n) // G, response_len=mask.sum(-1).long(),
                        truncated=torch.zeros(n, dtype=torch.bool), weight_version=torch.zeros(n, dtype=torch.long))


class _FakePolicy:
    """One DP rank's policy for driving the real Trainer.train_step: log-probs -1, updates that succeed or not."""

    def __init__(self, ok=True):
        import types

        from megatron_amir.training.policy import Policy

        self.ok, self.forwards, self.updates = ok, 0, 0
        self.info, self.dp_size, self.dp_group = types.SimpleNamespace(dp_size=1, dp_rank=0), 1, None
        self.data_parallel_rows = Policy.data_parallel_rows.__get__(self)

    def compute_logprobs(self, tokens, temperature=1.0, **kw):
        import torch

        self.forwards += 1
        return torch.full((tokens.shape[0], tokens.shape[1] - 1), -1.0)

    def train_step(self, tokens, prepared, temperature=1.0):
        self.updates += 1
        return {"loss": 0.1, "grad_norm": 1.0 if self.ok else float("nan"), "update_successful": float(self.ok)}

    def full_hf_state_dict(self, vocab_size=None):
        return None


def _train_step_with(monkeypatch, cfg, policy):
    """Trainer.train_step on a fixed rollout batch with ``policy``; returns the trainer."""
    import types

    from megatron_amir.algorithms import AmirState
    from megatron_amir.training import trainer as tr_mod

    batch = _tiny_rollout_batch(cfg.data.prompts_per_step, cfg.rollout.group_size)
    monkeypatch.setattr(tr_mod, "broadcast_rollout_batch", lambda b: batch)
    t = tr_mod.Trainer.__new__(tr_mod.Trainer)
    t.cfg, t.rank, t.step, t.weight_version, t._nonfinite_in_a_row = cfg, 0, 0, 0, 0
    t.policy, t.ref_policy, t.amir_state = policy, None, AmirState.from_config(cfg.algorithm.amir)
    t.engine, t.producer = types.SimpleNamespace(load_weights=lambda *a: None), None
    t.collect_rollouts = lambda: (batch, {})
    t._sync_weights = lambda load=None: None
    t.train_step()
    return t


def test_skipped_update_leaves_lambda_where_it_was(monkeypatch):
    """prepare_batch moves λ for the update it prepares; when that update is skipped (non-finite gradient,
    fp16 overflow) the trainer puts λ and its step count back. Real Trainer.train_step, fake one-rank policy."""
    from megatron_amir.config import Config

    cfg = Config(model=dict(vocab_size=64), data=dict(prompts_per_step=2), rollout=dict(group_size=4),
                 algorithm=dict(amir=dict(lambda_init=0.01)), train=dict(micro_batch_size=4))
    skipped = _train_step_with(monkeypatch, cfg, _FakePolicy(ok=False)).amir_state
    applied = _train_step_with(monkeypatch, cfg, _FakePolicy(ok=True)).amir_state
    assert (skipped.lam, skipped.step) == (0.01, 0)  # skipped: as before the step
    assert applied.step == 1 and applied.lam != 0.01  # applied: the adaptive rule moved λ once


@pytest.mark.parametrize("amir", [True, False])
def test_later_minibatches_refresh_logprobs_only_for_amir(monkeypatch, amir):
    """2 minibatches: AMIR's implicit rewards need a fresh forward before the second update; plain GRPO does not
    (it would only feed the pair diagnostics), so it runs the one forward for old_logp."""
    from megatron_amir.config import Config

    cfg = Config(model=dict(vocab_size=64), data=dict(prompts_per_step=2), rollout=dict(group_size=4),
                 algorithm=dict(amir=dict(enabled=amir)), train=dict(micro_batch_size=4, global_batch_size=4))
    policy = _train_step_with(monkeypatch, cfg, _FakePolicy()).policy
    assert policy.updates == 2 and policy.forwards == (2 if amir else 1)


def test_samples_from_old_weights_stop_the_step():
    """A sample from an older weight version than rollout.max_staleness allows (a server that missed an update, or
    an async schedule gone wrong) stops the step with the versions instead of training on another policy; the
    samples' versions reach the batch, and the staleness histogram counts them."""
    import types

    from megatron_amir.config import Config
    from megatron_amir.rewards.base import RewardResult
    from megatron_amir.rollout.engine import GroupResult, Sample
    from megatron_amir.training import trainer as tr_mod
    from megatron_amir.training.async_rollouts import staleness_metrics

    cfg = Config(model=dict(vocab_size=64), data=dict(prompts_per_step=2), rollout=dict(group_size=2),
                 train=dict(micro_batch_size=2))
    versions = [[3, 3], [3, 2]]

    def generate(prompts, params, n):
        return [GroupResult(p, [Sample([5, 6], [-0.1, -0.2], "stop", v) for v in vs]) for p, vs in zip(prompts, versions)]

    t = tr_mod.Trainer.__new__(tr_mod.Trainer)
    t.cfg, t.step, t.weight_version = cfg, 0, 3
    t.engine = types.SimpleNamespace(generate=generate)
    t.tokenizer = types.SimpleNamespace(eos_id=1, pad_id=0, encode=lambda s: [7, 8], decode=lambda ids: "x")
    t.sampler = types.SimpleNamespace(next_batch=lambda k: [types.SimpleNamespace(id=f"p{i}", prompt="q", answer="1")
                                                            for i in range(k)])
    t.reward_fn = lambda texts, answers: RewardResult(rewards=[1.0, 0.0] * (len(texts) // 2),
                                                      correct=[True, False] * (len(texts) // 2))
    batch, _ = t.collect_rollouts()
    assert batch.weight_version.tolist() == [3, 3, 3, 2]
    with pytest.raises(RuntimeError, match=r"1 of 4 samples come from weight version 2 while the trainer is at 3"):
        staleness_metrics(batch.weight_version, 3, max_staleness=0)
    hist = staleness_metrics(batch.weight_version, 3, max_staleness=2)
    assert hist == {"staleness/mean": 0.25, "staleness/max": 1.0, "staleness/frac_0": 0.75,
                    "staleness/frac_1": 0.25, "staleness/frac_2": 0.0}


def _checkpointable_trainer(cfg, root: Path, nonfinite: int = 0):
    """A Trainer with fake policy/sampler parts and the real save/_resume and CheckpointManager under ``root``."""
    import types

    from megatron_amir.algorithms import AmirState
    from megatron_amir.training import trainer as tr_mod
    from megatron_amir.training.checkpoint import CheckpointManager
    from megatron_amir.training.metrics import MetricsLogger

    def save_model(d, save_optimizer=True):
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"w")

    t = tr_mod.Trainer.__new__(tr_mod.Trainer)
    t.cfg, t.rank, t.world_size, t.step, t.weight_version = cfg, 0, 1, 0, 0
    t._nonfinite_in_a_row = nonfinite  # __init__ starts at 0, before _resume
    t.reference, t.hf_config, t._hf_base = None, {}, None
    t.policy = types.SimpleNamespace(save=save_model, load=lambda d, load_optimizer=True: None, barrier=lambda: None)
    t.sampler = types.SimpleNamespace(state_dict=lambda: {"epoch": 0, "pos": 3}, load_state_dict=lambda s: None)
    t.amir_state = AmirState.from_config(cfg.algorithm.amir)
    t.checkpointer = CheckpointManager(root, keep_last=2)
    t.metrics = MetricsLogger(root.parent / "logs", tensorboard=False)
    return t


def test_nonfinite_count_survives_a_resume(tmp_path):
    """The count of consecutive non-finite updates is trainer state: a run stopped (preempted) after 2 of them and
    resumed still stops at train.max_consecutive_nonfinite=3 with the next one (before: the resume forgot the
    count, so a run that keeps diverging could be requeued forever). Real save/_resume, fake model."""
    from megatron_amir.config import Config
    from megatron_amir.training.trainer import NonFiniteError

    cfg = Config(model=dict(vocab_size=64), data=dict(prompts_per_step=2), rollout=dict(group_size=4),
                 train=dict(micro_batch_size=4, max_consecutive_nonfinite=3),
                 checkpoint=dict(dir=str(tmp_path / "ckpt")))
    before = _checkpointable_trainer(cfg, tmp_path / "ckpt")
    nan = {"loss": float("nan"), "grad_norm": 1.0}
    before._check_finite(nan)
    before._check_finite(nan)
    before.step = 5
    ckpt = before.save()
    assert json.loads((ckpt / "meta.json").read_text())["nonfinite_in_a_row"] == 2
    after = _checkpointable_trainer(cfg, tmp_path / "ckpt")
    assert after._resume() and after.step == 5
    assert after._nonfinite_in_a_row == 2
    with pytest.raises(NonFiniteError, match="3 consecutive optimizer updates"):
        after._check_finite(nan)
    # a finite update resets the count, and the reset is what the next checkpoint records
    after._check_finite({"loss": 0.5, "grad_norm": 1.0})
    after.step = 6
    assert json.loads((after.save() / "meta.json").read_text())["nonfinite_in_a_row"] == 0


def test_checkpoint_without_nonfinite_count_resumes_at_zero(tmp_path):
    """Checkpoints written before the count was saved have no ``nonfinite_in_a_row``: they resume with 0."""
    from megatron_amir.config import Config
    from megatron_amir.training.checkpoint import MANIFEST, build_manifest

    cfg = Config(model=dict(vocab_size=64), checkpoint=dict(dir=str(tmp_path / "ckpt")))
    old = _checkpointable_trainer(cfg, tmp_path / "ckpt", nonfinite=2)
    old.step = 4
    ckpt = old.save()
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.pop("nonfinite_in_a_row", None)  # the old format, with a manifest that matches it
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / MANIFEST).write_text(json.dumps(build_manifest(ckpt)))
    resumed = _checkpointable_trainer(cfg, tmp_path / "ckpt", nonfinite=7)  # stale value must not survive
    assert resumed._resume() and resumed.step == 4 and resumed.checkpointer.latest_good() == ckpt
    assert resumed._nonfinite_in_a_row == 0
