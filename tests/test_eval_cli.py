"""`megatron-amir eval` end to end on CPU: a tiny random HF model directory + the demo tokenizer + a JSONL
benchmark file -> results.jsonl / summary.json, then `compare` on two such runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_amir.eval import compare, runner
from megatron_amir.eval.results import read_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 1-layer Llama saved by transformers (safetensors) and the demo tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_amir.data.synthetic import corpus_lines, make_splits
    from megatron_amir.data.tokenizer import demo_tokenizer

    root = tmp_path_factory.mktemp("evalcli")
    train, _ = make_splits(num_train=200, num_test=20, seed=3)
    tok = demo_tokenizer(root / "cache", corpus_lines(train), vocab_size=256)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model", safe_serialization=True)
    return root


@pytest.fixture()
def bench(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"id": f"b{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)}
            for i, (a, b) in enumerate([(12, 30), (45, 45), (7, 81), (19, 23), (60, 6)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(model_dir, bench, out, *extra):
    return runner.main(["--model", str(model_dir / "model"), "--tokenizer", str(model_dir / "tokenizer"),
                        "--bench", str(bench), "--samples", "4", "--out", str(out), "--max-new-tokens", "6",
                        "--no-progress", *extra, "reward.name=exact"])


def test_eval_cli_writes_results(model_dir, bench, tmp_path, capsys):
    out = tmp_path / "run_a"
    assert _eval(model_dir, bench, out, "--seed", "1") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "pass@1=" in printed and "maj@4=" in printed
    rs = read_results(out)
    assert [r.id.split("/")[-1] for r in rs] == ["b0", "b1", "b2", "b3", "b4"]  # the loader prefixes the format
    assert all(r.n == 4 and len(r.texts) == 4 and all(1 <= n <= 6 for n in r.lengths) for r in rs)
    assert all(lp is not None for r in rs for lp in r.mean_logprobs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["model_kind"] == "hf" and summary["extra"]["logprobs_mode"] == "raw_logprobs"
    assert set(summary["pass_at_k"]) == {"1", "2", "4"}
    # a second run with another seed, then compare the two end to end
    out_b = tmp_path / "run_b"
    assert _eval(model_dir, bench, out_b, "--seed", "2") == 0
    assert compare.main([str(out), str(out_b), "--out", str(tmp_path / "cmp"), "--n-boot", "100"]) == 0
    assert (tmp_path / "cmp" / "report.md").is_file()


def test_eval_cli_named_format_and_synthetic(model_dir, tmp_path, capsys):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"{a}+{a}=", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"}) + "\n"
                           for a in (11, 22, 33)))
    out = tmp_path / "gsm_run"
    assert _eval(model_dir, f"gsm8k={gsm}", out) == 0, capsys.readouterr().err
    rs = read_results(out)
    assert [r.gold for r in rs] == ["22", "44", "66"] and all(r.id.startswith("gsm8k/") for r in rs)
    out = tmp_path / "syn_run"
    assert _eval(model_dir, "synthetic", out, "--max-problems", "3", "data.synthetic.num_test=5") == 0, \
        capsys.readouterr().err
    rs = read_results(out)
    assert len(rs) == 3 and all(r.gold.lstrip("-").isdigit() for r in rs)


def test_eval_cli_bad_inputs_name_the_culprit(model_dir, bench, tmp_path, capsys):
    rc = runner.main(["--model", str(tmp_path / "nope"), "--tokenizer", str(model_dir / "tokenizer"),
                      "--bench", str(bench), "--samples", "2", "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "1+1=", "answer": "2"}\n{"prompt": "no answer"}\n')
    rc = _eval(model_dir, bad, tmp_path / "o2")
    assert rc == 2 and f"{bad}:2" in capsys.readouterr().err
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    rc = runner.main(["--model", str(not_a_model), "--tokenizer", str(model_dir / "tokenizer"),
                      "--bench", str(bench), "--samples", "2", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "neither a Hugging Face directory" in capsys.readouterr().err


def test_eval_cli_missing_bench_file_says_file_not_found(model_dir, tmp_path, capsys):
    missing = tmp_path / "nonexistent.jsonl"
    for bench in (str(missing), "nonexistent.jsonl"):
        assert _eval(model_dir, bench, tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert f"--bench {bench}: file not found" in err and "unknown benchmark" not in err, err
    assert _eval(model_dir, "mmlu", tmp_path / "o") == 2  # a name that is no benchmark is still that error
    assert "unknown benchmark 'mmlu'" in capsys.readouterr().err


def test_eval_cli_refuses_to_overwrite_results_unless_told(model_dir, bench, tmp_path, capsys):
    out = tmp_path / "run"
    assert _eval(model_dir, bench, out, "--seed", "1") == 0, capsys.readouterr().err
    before = (out / "results.jsonl").read_text()
    (out / "summary.json").write_text("{}")  # marks the summary so a replacement shows
    assert _eval(model_dir, bench, out, "--seed", "2") == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--overwrite" in err and str(out / "results.jsonl") in err
    assert (out / "results.jsonl").read_text() == before and (out / "summary.json").read_text() == "{}"
    assert _eval(model_dir, bench, out, "--seed", "2", "--overwrite") == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["extra"]["seed"] == 2
    single = tmp_path / "one.jsonl"  # a .jsonl --out: its summary beside it counts too
    single.with_name("one.summary.json").write_text("{}")
    assert _eval(model_dir, bench, single) == 2 and "one.summary.json" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["embedded", "vllm"])
def test_eval_cli_on_gpu(model_dir, bench, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    out = tmp_path / f"gpu_{engine}"
    assert _eval(model_dir, bench, out, "--engine", engine, "--seed", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["engine"] == engine
    if engine == "embedded":
        assert summary["extra"]["device"] == "cuda" and summary["extra"]["dtype"] == "bf16"
    rs = read_results(out)
    assert len(rs) == 5 and all(lp is not None for r in rs for lp in r.mean_logprobs)


def test_device_resolution():
    from megatron_amir.eval.loading import EvalSetupError, resolve_device

    assert resolve_device("cpu", "auto") == ("cpu", "fp32")
    assert resolve_device("cuda:1", "auto") == ("cuda:1", "bf16")
    assert resolve_device("cpu", "bf16") == ("cpu", "bf16")
    with pytest.raises(EvalSetupError, match="--dtype"):
        resolve_device("cpu", "int4")


def test_eval_remote_engine_pushes_the_model_to_the_fleet(model_dir, bench, tmp_path, monkeypatch, capsys):
    """--engine remote against a real rollout server started with OTHER random weights: eval pushes --model's
    weights first, so its greedy results equal the embedded engine's on the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((model_dir / "model" / "config.json").read_text())
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp_path / "other", safe_serialization=True)
    weights, port_file, token = tmp_path / "weights", tmp_path / "port", "eval-token-1"
    weights.mkdir()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "megatron_amir.rollout.server", "--model", str(tmp_path / "other"), "--port", "0",
         "--port-file", str(port_file), "--api-key", token, "--weights-root", str(weights),
         "--logprobs-mode", "raw_logprobs"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        cwd=root)
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.1)
        url = port_file.read_text().strip()
        greedy = ("--temperature", "0", "--samples", "2")
        rc = _eval(model_dir, bench, tmp_path / "missing", "--engine", "remote", "--servers", url)
        assert rc == 2 and "--weights-dir" in capsys.readouterr().err
        monkeypatch.setenv("MEGATRON_AMIR_TOKEN", token)
        assert _eval(model_dir, bench, tmp_path / "remote", "--engine", "remote", "--servers", url,
                     "--weights-dir", str(weights), "--logprobs-mode", "processed_logprobs", *greedy) == 0, \
            capsys.readouterr().err
        assert _eval(model_dir, bench, tmp_path / "local", *greedy) == 0
    finally:
        server.terminate()
        server.wait(10)
    remote, local = read_results(tmp_path / "remote"), read_results(tmp_path / "local")
    assert [r.texts for r in remote] == [r.texts for r in local]
    assert [r.correct for r in remote] == [r.correct for r in local]
    extra = json.loads((tmp_path / "remote" / "summary.json").read_text())["extra"]
    assert extra["engine"] == "remote" and extra["servers"] == [url]
    # the server runs --logprobs-mode raw_logprobs: that is what its log-probs are, whatever eval asked for
    assert extra["logprobs_mode"] == "raw_logprobs"
