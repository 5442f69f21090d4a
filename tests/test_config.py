"""Config loading: defaults, overrides, and bad inputs whose errors must name the offending key."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_amir.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo_tiny.yaml"


def test_example_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.rollout.group_size >= 2, path


def test_override_changes_value_and_types():
    cfg = load_config(DEMO, ["train.lr=1e-5", "rollout.servers=[http://127.0.0.1:8000]", "algorithm.amir.enabled=false"])
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.rollout.servers == ["http://127.0.0.1:8000"]
    assert cfg.algorithm.amir.enabled is False


def test_cli_config_show_prints_resolved_value():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_amir.cli", "config", "show", str(DEMO), "train.lr=1e-5"],
        capture_output=True, text=True, check=True,
    ).stdout
    train = out.split("\ntrain:\n", 1)[1]
    assert "  lr: 1.0e-05\n" in train


BAD = [
    # (overrides, substring that must appear in the error: the key path, and what is wrong)
    (["train.lrr=1e-5"], "train.lrr: unknown key; did you mean 'train.lr'"),
    (["algorithm.amir.betta=0.1"], "algorithm.amir.betta: unknown key; did you mean 'algorithm.amir.beta'"),
    (["modle.hidden_size=8"], "modle: unknown key; did you mean 'model'"),
    (["rollout.group_size=1"], "rollout.group_size: Input should be greater than or equal to 2"),
    (["algorithm.clip_eps_low=0"], "algorithm.clip_eps_low: Input should be greater than 0"),
    (["algorithm.clip_eps_high=-0.1"], "algorithm.clip_eps_high"),
    (["train.lr=-1e-5"], "train.lr: Input should be greater than or equal to 0"),
    (["train.steps=abc"], "train.steps: Input should be a valid integer"),
    (["algorithm.loss_agg_mode=mean"], "algorithm.loss_agg_mode: Input should be 'token-mean'"),
    (["model.arch=gpt2"], "model.arch: Input should be 'llama', 'qwen2', 'qwen3' or 'mistral' (got 'gpt2')"),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size: TP=3 must divide model.num_attention_heads=4"),
    (["parallel.tensor_model_parallel_size=4"], "parallel.tensor_model_parallel_size: TP=4 must divide model.num_kv_heads=2"),
    (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size: PP=3 must divide model.num_layers=4"),
    (["train.micro_batch_size=48"], "train.micro_batch_size: micro_batch_size=48 must divide global batch size 128"),
    (["train.global_batch_size=12", "train.micro_batch_size=4"], "train.global_batch_size: global_batch_size=12 must divide"),
    (["train.global_batch_size=4", "train.micro_batch_size=4"], "must be a multiple of rollout.group_size=8"),
    (["model.num_kv_heads=3"], "model: Value error, num_attention_heads=4 must be a multiple of num_kv_heads=3"),
    (["algorithm.loss_agg_mode=seq-mean-token-sum-norm"], "algorithm.loss_agg_max_len"),
    (["data.source=jsonl"], "data.train_path: data.source=jsonl needs data.train_path"),
    (["model.fp8=e5m2"], "model.fp8"),
    (["algorithm.amir.lambda_min=0.1"], "lambda_min=0.1 > lambda_max=0.05"),
    (["rollout.engine=remote"], "rollout.servers: rollout.engine=remote needs"),
    (["train.lr=.inf"], "train.lr: Input should be a finite number"),
    (["algorithm.amir.beta=.nan"], "algorithm.amir.beta: Input should be a finite number"),
    (["rollout.async_off_policy=true"], "async_off_policy=true is not implemented"),
    (["rollout.servers=[http://[::1]:8000]"], "cannot apply override 'rollout.servers=[http://[::1]:8000]'"),
    (["algorithm.amir.adaptive_lambda=true", "algorithm.amir.lambda_init=0.5"],
     "lambda_init=0.5 must lie in [lambda_min=0.005, lambda_max=0.05]"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(DEMO, overrides)
    assert expected in str(exc.value), str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="cannot parse config file .*broken.yaml"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(DEMO, ["train.lr"])


def test_cli_exit_code_and_message_on_bad_config():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_amir.cli", "config", "show", str(DEMO), "train.lrr=1"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "train.lrr: unknown key" in proc.stderr


def test_config_record_leaves_the_token_out():
    from megatron_amir.config import config_record, dump_config

    cfg = load_config(DEMO, ["rollout.token=s3cr3t-token"])
    assert cfg.rollout.token == "s3cr3t-token"  # the running config keeps it
    assert config_record(cfg)["rollout"]["token"] is None and "s3cr3t" not in dump_config(cfg)


def test_dict_override_replaces_the_file_value(tmp_path):
    """model.rope_scaling={...} replaces the file's dict (a merge kept rope_type: llama3 next to type: linear)."""
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  rope_scaling: {rope_type: llama3, factor: 8.0}\n")
    cfg = load_config(f, ["model.rope_scaling={type: linear, factor: 4.0}"])
    assert cfg.model.rope_scaling == {"type": "linear", "factor": 4.0}
