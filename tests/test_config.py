"""Config loading: defaults, overrides, and bad inputs whose errors must name the offending key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
        [sys.executable, "-m", "launch.cli", "config", "show", str(DEMO), "train.lr=1e-5"],
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
    (["model.num_kv_heads=3"], "model.num_kv_heads: num_attention_heads=4 must be a multiple of num_kv_heads=3"),
    (["algorithm.loss_agg_mode=seq-mean-token-sum-norm"], "algorithm.loss_agg_max_len"),
    (["data.source=jsonl"], "data.train_path: data.source=jsonl needs data.train_path"),
    (["model.fp8=e5m2"], "model.fp8"),
    (["algorithm.amir.lambda_min=0.1"], "algorithm.amir.lambda_min: lambda_min=0.1 > lambda_max=0.05"),
    (["rollout.engine=remote"], "rollout.servers: rollout.engine=remote needs"),
    (["train.lr=.inf"], "train.lr: Input should be a finite number"),
    (["algorithm.amir.beta=.nan"], "algorithm.amir.beta: Input should be a finite number"),
    (["rollout.async_off_policy=true"], "algorithm.tis_cap: rollout.async_off_policy=true needs algorithm.tis_cap"),
    (["rollout.weight_sync=nccl"], "rollout.weight_sync: Input should be 'file' or 'broadcast'"),
    (["rollout.weight_sync=broadcast"], "rollout.weight_sync: weight_sync=broadcast needs engine=remote"),
    (["rollout.fp8_rollout=true", "algorithm.tis_cap=null"], "algorithm.tis_cap: rollout.fp8_rollout=true needs"),
    (["rollout.engine=vllm", "rollout.fp8_rollout=true"],
     "model.num_kv_heads: rollout.fp8_rollout with rollout.engine=vllm needs widths divisible by 128"),
    (["rollout.servers=[http://[::1]:8000]"], "cannot apply override 'rollout.servers=[http://[::1]:8000]'"),
    (["algorithm.amir.adaptive_lambda=true", "algorithm.amir.lambda_init=0.5"],
     "algorithm.amir.lambda_init: lambda_init=0.5 must lie in [lambda_min=0.005, lambda_max=0.05]"),
    # cross-field and range rules that otherwise fail late (data setup, scheduler, model build) or misbehave;
    # section-level rules name the full dotted path too
    (["data.synthetic.min_digits=4", "data.synthetic.max_digits=3"],
     "data.synthetic.min_digits: min_digits=4 > max_digits=3"),
    (["data.synthetic.kinds=[]"], "data.synthetic.kinds: List should have at least 1 item"),
    (["train.lr=1e-5", "train.min_lr=1e-4"], "train.min_lr: min_lr=0.0001 > lr=1e-05"),
    (["train.lr=0", "train.min_lr=1e-7", "train.lr_decay_style=constant"], "train.min_lr: min_lr=1e-07 > lr=0.0"),
    (["parallel.sequence_parallel=true"],
     "parallel.sequence_parallel: sequence_parallel=true needs tensor_model_parallel_size > 1 (got 1)"),
    (["model.real_vocab_size=300"], "model.real_vocab_size: real_vocab_size=300 > vocab_size=256"),
    (["model.fp8_param=true"], "model.fp8_param: fp8_param=true needs model.fp8"),
    (["model.hidden_size=130"], "model.hidden_size: hidden_size=130 is not divisible by num_attention_heads=4"),
    (["algorithm.amir.ratio_low=0.9"], "algorithm.amir.ratio_low: ratio_low=0.9 > ratio_high=0.7"),
    (["reward.name=exact", "reward.answer_form=number"],
     "reward.answer_form: answer_form='number' is implemented by the math reward only"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(DEMO, overrides)
    assert expected in str(exc.value), str(exc.value)


GOOD_EDGES = [
    # legitimate settings next to the new rules: they must keep loading
    ["data.synthetic.min_digits=3", "data.synthetic.max_digits=3"],  # one digit count
    ["train.lr=1e-5", "train.min_lr=1e-5", "train.lr_decay_style=cosine"],  # min_lr == lr: a flat schedule
    ["train.lr_warmup_steps=500"],  # longer than train.steps=40: Policy stretches the decay past the warm-up
    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
]


@pytest.mark.parametrize("overrides", GOOD_EDGES, ids=[g[0] for g in GOOD_EDGES])
def test_legitimate_edges_still_load(overrides):
    load_config(DEMO, overrides)


# (key, YAML text of the value): a config file and a key=value override must give the same config
SAME_VALUE = [
    ("train.lr", "1e-5"),  # YAML 1.1 reads a string here; OmegaConf's override parser a float
    ("train.lr", "5.0e-6"),
    ("train.lr", "1.0e-5"),
    ("train.steps", "1_000"),
    ("model.rope_scaling", "{rope_type: llama3, factor: 8e0, original_max_position_embeddings: 8192}"),
    ("checkpoint.resume", "2024-01-01"),  # a date object before, which OmegaConf could not hold (a traceback)
    ("rollout.servers", "[http://127.0.0.1:8000]"),
    ("algorithm.amir.enabled", "no"),
    ("name", "'1e5'"),
]


@pytest.mark.parametrize("key,text", SAME_VALUE, ids=[f"{k}={v}" for k, v in SAME_VALUE])
def test_file_and_override_parse_values_alike(tmp_path, key, text):
    *parents, leaf = key.split(".")
    body = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: {text}\n"
    f = tmp_path / "c.yaml"
    f.write_text(body)
    from_file = load_config(f)
    from_override = load_config(None, [f"{key}={text}"])
    assert from_file == from_override
    if key == "model.rope_scaling":
        assert from_file.model.rope_scaling["factor"] == 8.0  # the float, not the string '8e0'
    if key == "checkpoint.resume":
        assert from_file.checkpoint.resume == "2024-01-01"


def test_duplicate_key_in_a_file_is_an_error(tmp_path):
    """A second ``train:`` section silently replaced the first (train.lr lost); override values already refused
    duplicate keys."""
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 1.0e-5\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="(?s)cannot parse config file .*dup.yaml.*duplicate key 'train'"):
        load_config(f)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(None, ["model.rope_scaling={a: 1, a: 2}"])
    # a YAML merge key (<<) may still be overridden by an explicit key
    g = tmp_path / "merge.yaml"
    g.write_text("model:\n  rope_scaling: {<<: {rope_type: llama3, factor: 8.0}, factor: 4.0}\n")
    assert load_config(g).model.rope_scaling == {"rope_type": "llama3", "factor": 4.0}


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
        [sys.executable, "-m", "launch.cli", "config", "show", str(DEMO), "train.lrr=1"],
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


def test_dumped_config_reloads_strings_that_look_like_floats(tmp_path):
    """dump_config quotes strings the loader would read as floats (a run directory named like a git short hash)."""
    from megatron_amir.config import config_from_dict, dump_config, parse_yaml

    cfg = load_config(DEMO, ["logging.dir='runs/x'", "checkpoint.dir='4520e81'", "model.tokenizer='1e5'"])
    assert cfg.checkpoint.dir == "4520e81" and cfg.model.tokenizer == "1e5"
    text = dump_config(cfg)
    assert "'4520e81'" in text and "'1e5'" in text
    back = config_from_dict(parse_yaml(text))
    assert back.checkpoint.dir == "4520e81" and back.model.tokenizer == "1e5"


def test_duplicate_keys_are_compared_by_value():
    from megatron_amir.config import parse_yaml

    for text in ("1: a\n01: b\n", "true: a\nyes: b\n", "a: 1\n'a': 2\n"):
        with pytest.raises(yaml.YAMLError, match="duplicate key"):
            parse_yaml(text)
