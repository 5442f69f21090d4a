"""`python -m launch.study` end to end on a tiny scale: a few-step warm-up, then a 2-arm, 1-seed, 2-step
dose-response study whose report, plots and results.md section come from the run files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=48", "train.micro_batch_size=16"]


@pytest.mark.slow
def test_tiny_dose_response_study_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    warm = repo / "runs" / "warm"
    env_cmd = [sys.executable, "-m", "launch.cli"]
    subprocess.run([*env_cmd, "sft", str(ROOT / "configs" / "demo_tiny.yaml"), f"logging.dir={warm}",
                    f"checkpoint.dir={warm / 'checkpoints'}", "logging.progress=false", "--steps", "3",
                    "--batch-size", "16", "--eval-every", "0"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    docs = repo / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Reproduction study\n\n## Accuracy\n\nrows\n")
    cmd = [sys.executable, "-m", "launch.study", "--dose-response", "--arms", "GRPO", "AMIR λ=1", "--seeds", "1",
           "--steps", "2", "--eval-problems", "6", "--n-boot", "50", "--jobs", "2",
           "--out", str(repo / "runs" / "study"),
           "--warmup", str(warm / "checkpoints"), "--report", str(docs / "results.md"), "--set", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (docs / "results_lambda.md").read_text()
    # every arm has a row; the slope over λ ∈ {0, 1}; paths relative to the repository (the parent of runs/)
    assert "| GRPO | 0 |" in report and "| AMIR λ=1 | 1 |" in report and "## Effect per unit λ" in report
    assert "`runs/study/grpo_s1/metrics.jsonl`" in report and str(tmp_path) not in report
    assert "runs/study/amir-lambda1_s1/eval/final_step000002.jsonl" in report
    data = json.loads((docs / "results_lambda_assets" / "dose_response.json").read_text())
    assert set(data["eval"]["arms"]) == {"GRPO", "AMIR λ=1"} and "pass@1" in data["eval"]["slopes"]
    assert data["eval"]["problems"] == 6 and data["wall_seconds"] > 0
    for name in ("pass_1", "pass_4", "margin", "length", "entropy", "pair_accuracy", "beyond_reference"):
        png = docs / "results_lambda_assets" / f"lambda_{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG" and f"results_lambda_assets/{png.name}" in report
    main = (docs / "results.md").read_text()
    assert main.startswith("# Reproduction study\n\n## Accuracy\n\nrows\n")
    assert main.count("## λ dose-response") == 1 and "[results_lambda.md](results_lambda.md)" in main
    assert "- Accuracy:" in main  # the report's summary is quoted
    # resumable: a second run trains nothing and rewrites the same report
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "megatron-amir train" not in again.stdout
    assert (docs / "results.md").read_text().count("## λ dose-response") == 1
