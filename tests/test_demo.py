"""The README's main command, end to end in its --quick form: warm-up -> GRPO and AMIR-GRPO -> report.

Checks that every phase left its files, the plots are real PNGs, and the report's numbers are the ones in the
run directories (nothing typed in by hand).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "launch.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for phase in ("warmup", "grpo", "amir-grpo"):
        assert (out / phase / "metrics.jsonl").stat().st_size > 0, phase
    for label in ("grpo", "amir-grpo"):
        assert list((out / label / "eval").glob("initial_step*.jsonl")) and list((out / label / "eval").glob("final_step*.jsonl"))
        assert list((out / label / "checkpoints").glob("step_*"))
    pngs = sorted(out.glob("plots/*.png"))
    assert len(pngs) >= 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for m in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every image the report shows exists
        assert (out / m.group(1)).is_file(), m.group(1)
    # the table's pass@1 of each run is the value in that run's eval.jsonl
    summary = json.loads((out / "summary.json").read_text())
    for label in ("GRPO", "AMIR-GRPO"):
        rows = [json.loads(line) for line in (out / label.lower() / "eval.jsonl").read_text().splitlines()]
        final = [r for r in rows if "final/pass@1" in r][-1]["final/pass@1"]
        assert summary[label]["final"]["pass@1"] == final
        assert f"| {label} | " in report and f"{final:.3f}" in report
    assert (out / "compare" / "report.md").is_file()


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    """Finished phases are reused on a re-run of the same --out: a different mode or seed must not reuse them."""
    import json

    from launch.demo import main

    (tmp_path / "demo_settings.json").write_text(json.dumps({"quick": True, "seed": 1234, "plan": {}}))
    assert main(["--out", str(tmp_path), "--seed", "7"]) == 2
    assert "holds a demo run with other settings" in capsys.readouterr().err
