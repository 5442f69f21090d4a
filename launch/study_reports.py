"""The follow-up reports of ``python -m launch.study``: λ dose-response, length bias, reward scale.

Each report is built from the run directories only (``megatron_amir.eval.arms`` for the per-arm tables and CIs,
``megatron_amir.eval.study`` for the detailed multi-seed tables), every source file is listed with its path relative
to the repository root, and the first section (``## Summary``) is what ``docs/results.md`` quotes beside its link.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_amir.eval.arms import (
    Arm,
    EvalMetric,
    eval_metrics_table,
    standard_eval_metrics,
    train_metrics_table,
)
from megatron_amir.eval.study import verdict
from megatron_amir.fileio import atomic_write_text

# train-time metrics (metrics.jsonl keys) of every report; the pair statistics are measured with amir.enabled=false
TRAIN_KEYS = {"pair accuracy": "amir/pair_accuracy", "entropy": "entropy", "pairs/step": "amir/pair_count"}
TAIL = 20  # train metrics: mean over each run's last TAIL logged steps (the last third of a 60-step run)
_TS = re.compile(r"^(\d\d):(\d\d):(\d\d) ")


def run_wall_seconds(log: Path, max_gap_s: float = 600.0) -> float:
    """A run's wall time from its log: the time its timestamped lines span (HH:MM:SS, across midnight); a gap over
    ``max_gap_s`` (an interrupted run resumed later) is left out."""
    total, last = 0.0, None
    for line in log.read_text(errors="replace").splitlines():
        m = _TS.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        if last is not None:
            dt = (t - last) % 86400
            total += dt if dt <= max_gap_s else 0.0
        last = t
    return total


def _compute(secs: float, logs: Sequence[Path], note: str = "") -> str:
    return (f"- Compute: {len(logs)} runs{f' ({note})' if note else ''}, {secs / 60:.1f} min summed over their logs "
            "(one thread each; `--jobs 2` runs two at a time, so the elapsed time is about half).")


def wall_time(logs: Sequence[Path]) -> tuple[float, list[Path]]:
    """Summed wall time of the logs that exist, and those logs."""
    have = [p for p in logs if p.is_file()]
    return sum(run_wall_seconds(p) for p in have), have


# --------------------------------------------------------------------------------------------- formatting
def _ci(x: Optional[Mapping[str, float]], d: int = 4, signed: bool = False) -> str:
    if not x or not math.isfinite(x.get("estimate", math.nan)):
        return "n/a"
    f = f"+.{d}f" if signed else f".{d}f"
    if not (math.isfinite(x["lo"]) and math.isfinite(x["hi"])):
        return f"{x['estimate']:{f}}"
    return f"{x['estimate']:{f}} [{x['lo']:{f}}, {x['hi']:{f}}]"


def _rel(p: str | Path, root: Path) -> str:
    return os.path.relpath(Path(p).resolve(), root.resolve())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _demote(markdown: str) -> str:
    """A report's headings one level down (its title becomes a section of another report)."""
    return "\n".join(("#" + ln) if ln.startswith("#") else ln for ln in markdown.splitlines()) + "\n"


def _sources(groups: Mapping[str, Sequence[str]], logs: Sequence[Path], root: Path,
             extra: Sequence[str] = ()) -> list[str]:
    L = ["## Sources", "", "Paths relative to the repository root. Eval numbers: the results files listed under "
         "Files; train-time numbers (pair accuracy, entropy, pairs/step): each run's `metrics.jsonl`, the mean of "
         f"its last {TAIL} logged steps; wall time: the timestamps of each run's log.", ""]
    for lab, ds in groups.items():
        L.append(f"- {lab}: " + ", ".join(f"`{_rel(Path(d) / 'metrics.jsonl', root)}`" for d in ds))
    L += [f"- {x}" for x in extra]
    L.append("- logs: " + ", ".join(f"`{_rel(p, root)}`" for p in logs))
    return L


def _study_details(groups: Mapping[str, Sequence[str]], reference: str, base: Optional[Path], assets: Path,
                   report: Path, title: str, root: Path) -> tuple[str, dict[str, Any]]:
    """The multi-seed study report of these arms (pass@k/maj@k per seed, coverage patterns, margins, training
    curves) as markdown, and its data."""
    from megatron_amir.eval.study import build_study, write_study

    data = build_study({k: list(v) for k, v in groups.items()}, reference, str(base) if base else None)
    tmp = assets / "details.md"
    write_study(data, {k: list(v) for k, v in groups.items()}, assets, tmp, title, paths_from=root)
    text = tmp.read_text()
    tmp.unlink()
    # the details were written beside the assets: their image links must be relative to the report instead
    text = text.replace("](", f"]({os.path.relpath(assets.resolve(), report.parent.resolve())}/")
    return _demote(text), data


def _dose_label(arm: Arm, lam: Optional[float]) -> str:
    return f"{arm.dose:g}" if arm.dose is not None else f"adaptive (mean {lam:.3f})" if lam is not None else "adaptive"


# --------------------------------------------------------------------------------------------- dose-response
# how the pair term acts: its loss (ln 2 = −log σ(0) when implicit rewards do not separate) and the gradient norm
MECHANISM_KEYS = {"pair loss": "amir/pair_loss", "grad norm": "grad_norm"}


def dose_response_report(groups: Mapping[str, Sequence[str]], doses: Mapping[str, Optional[float]], reference: str,
                         base: Optional[Path], report: Path, root: Path, *, steps: int, logs: Sequence[Path],
                         warm: str, demo_lambda: float, n_boot: int = 2000) -> Path:
    """docs/results_lambda.md: per arm pass@1/4, coverage beyond ``reference``, train pair accuracy, margin, length,
    entropy with CIs; the slope per unit λ over the fixed-λ arms; one plot per metric against λ; the reading of the
    paper's three claims and the demo's λ chosen by rule from them."""
    from megatron_amir.eval import plots as P

    assets = report.parent / (report.stem + "_assets")
    assets.mkdir(parents=True, exist_ok=True)
    arms = {lab: Arm(list(ds), doses[lab]) for lab, ds in groups.items()}
    ev = eval_metrics_table(arms, reference, standard_eval_metrics([1, 4]), coverage_k=4, n_boot=n_boot)
    tr = train_metrics_table(arms, reference, {**TRAIN_KEYS, **MECHANISM_KEYS}, tail=TAIL)
    lam_used = _mean_lambda(groups)
    seeds = max(len(v) for v in groups.values())
    details, _ = _study_details(groups, reference, base, assets, report, "Details: the multi-seed study tables", root)
    secs, have = wall_time(logs)

    def cell(lab: str, name: str, d: int = 4) -> str:
        src = ev if name in ev["arms"][lab] else tr
        return _ci(src["arms"][lab].get(name), d)

    L = [f"# λ dose-response of the AMIR pair term: {seeds} seeds x {len(arms)} arms, {steps} RL steps from one "
         f"warm-up checkpoint", ""]
    summary, claims = _dose_reading(ev, tr, arms, reference, demo_lambda, lam_used)
    L += ["## Summary", "", *summary, _compute(secs, have), "",
          f"Setting: the demo's model and task (configs/demo_tiny.yaml), warm-up checkpoint `{warm}`; λ ∈ "
          f"{{{', '.join(f'{a.dose:g}' for a in arms.values() if a.dose is not None)}}} fixed ({reference} is λ = 0: "
          "`amir.enabled=false` still measures the pair statistics) and the paper's adaptive schedule (from 0.01, in "
          f"[0.005, 0.05]), drawn apart from the fixed doses at the mean λ it used. {ev['problems']} held-out "
          "problems, "
          "4 samples each. CIs are 95%: eval metrics a bootstrap over problems (2000 resamples; a drawn problem "
          "brings all seeds' samples, and every resample recomputes every arm, so differences and slopes are "
          f"paired); train metrics (mean of the last {TAIL} steps per seed) a Student-t interval over seeds.", "",
          "## Per arm", ""]
    rows = []
    for lab, a in arms.items():
        rows.append([lab, _dose_label(a, lam_used.get(lab)), cell(lab, "pass@1"), cell(lab, "pass@4"),
                     cell(lab, "beyond_reference", 1), cell(lab, "reference_only", 1), cell(lab, "pair accuracy"),
                     cell(lab, "margin"), cell(lab, "length", 2), cell(lab, "entropy")])
    L += _table(["arm", "λ", "pass@1", "pass@4", f"solved beyond {reference} (pass@4, problems)",
                 f"solved by {reference} only", "pair accuracy (train)", "margin median (nats/token)",
                 "response length (tokens)", "entropy (train, nats/token)"], rows)
    L += ["", "Margin: per problem with correct and incorrect samples, the mean length-normalized log-prob of the "
          "correct minus the incorrect ones (the paper's Fig. 4 quantity), pooled over seeds. Pair accuracy: the "
          "fraction of the training batch's pairs (reward gap > margin 0.5) whose winner has the higher ℓ̄.", "",
          f"## Differences from {reference}", ""]
    names = ["pass@1", "pass@4", "margin", "length", "pair accuracy", "entropy", "pair loss", "grad norm"]
    rows = []
    for lab in arms:
        if lab == reference:
            continue
        rows.append([lab] + [_ci({**ev["differences"].get(lab, {}), **tr["differences"].get(lab, {})}.get(n), 4, True)
                             for n in names])
    L += _table(["arm"] + [f"Δ {n}" for n in names], rows)
    L += ["", "## Effect per unit λ", "",
          "Least-squares slope over the fixed-λ arms (" + ", ".join(f"{a.dose:g}" for a in arms.values()
                                                                     if a.dose is not None)
          + "): the change per unit λ. λ = 1 carries most of the leverage; a slope is a summary, not a claim of "
          "linearity (the per-arm rows above show the shape).", ""]
    rows = []
    for n in names:
        s = ev["slopes"].get(n) or tr["slopes"].get(n)
        rows.append([n, _ci(s, 4, True), verdict(s) if s and math.isfinite(s["lo"]) else "n/a"])
    L += _table(["metric", "slope per unit λ [95% CI]", "verdict"], rows)
    L += ["", "## Plots", ""]
    ylabels = {"pass@1": "pass@1", "pass@4": "pass@4", "beyond_reference": "problems", "pair accuracy": "pair accuracy",
               "margin": "nats/token", "length": "tokens", "entropy": "nats/token"}
    for n, yl in ylabels.items():
        pts = []
        for lab, a in arms.items():
            v = (ev if n in ev["arms"][lab] else tr)["arms"][lab][n]
            if not math.isfinite(v["estimate"]):
                continue
            fixed = a.dose is not None
            x = a.dose if fixed else lam_used.get(lab, math.nan)
            if not math.isfinite(x):
                continue
            lo, hi = (v["lo"], v["hi"]) if math.isfinite(v["lo"]) else (v["estimate"], v["estimate"])
            pts.append({"x": x, "estimate": v["estimate"], "lo": lo, "hi": hi, "fixed": fixed,
                        "label": f"λ={a.dose:g}" if fixed else f"{lab} (at its mean λ)"})
        title = {"beyond_reference": f"problems solved beyond {reference} (pass@4)"}.get(n, n)
        path = P.plot_dose_response(pts, assets / f"lambda_{re.sub(r'[^a-z0-9]+', '_', n.lower())}.png",
                                    title=f"{title} against λ (95% CI)", ylabel=yl)
        L.append(f"![{n}]({os.path.relpath(path.resolve(), report.parent.resolve())})")
    L += ["", "## Reading: the paper's three claims at this scale", ""]
    for c in claims:
        L += [c, ""]
    L += _sources(groups, have, root)
    json_out = {"eval": ev, "train": tr, "mean_lambda": lam_used, "wall_seconds": secs}
    atomic_write_text(assets / "dose_response.json", json.dumps(json_out, indent=1, default=str) + "\n")
    atomic_write_text(report, "\n".join(L) + "\n\n" + details)
    return report


def _mean_lambda(groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean logged λ (amir/lambda) over all steps and seeds of each arm that logs one."""
    from megatron_amir.eval.plots import load_metrics, metric_series

    out = {}
    for lab, ds in groups.items():
        vals = [v for d in ds for v in metric_series(load_metrics(Path(d) / "metrics.jsonl"), "amir/lambda")[1]]
        if vals:
            out[lab] = float(sum(vals) / len(vals))
    return out


def _dose_reading(ev: dict, tr: dict, arms: Mapping[str, Arm], reference: str, demo_lambda: float,
                  lam_used: Mapping[str, float]) -> tuple[list[str], list[str]]:
    """(summary lines, claim paragraphs), every statement decided by a CI."""
    others = [lab for lab in arms if lab != reference]

    def up(x):
        return x is not None and math.isfinite(x["lo"]) and x["lo"] > 0

    def down(x):
        return x is not None and math.isfinite(x["hi"]) and x["hi"] < 0

    def diffs(name):
        return {lab: ev["differences"].get(lab, {}).get(name) or tr["differences"].get(lab, {}).get(name)
                for lab in others}

    def name_of(lab):
        a = arms[lab]
        if a.dose is None:
            return f"{lab} (mean λ {lam_used[lab]:.3f})" if lab in lam_used else lab
        return lab if "λ" in lab else f"{lab} (λ = {a.dose:g})"

    def listing(name, d=4):
        return "; ".join(f"{name_of(lab)} {_ci(x, d, True)}" for lab, x in diffs(name).items())

    def who(name, test):
        return [lab for lab, x in diffs(name).items() if test(x)]

    def names(labs):
        return ", ".join(name_of(lab) for lab in labs)

    def slope(name):
        s = ev["slopes"].get(name) or tr["slopes"].get(name)
        return f"{_ci(s, 4, True)} per unit λ — {verdict(s)}" if s else "n/a"

    claims, summary = [], []
    acc_up = list(dict.fromkeys(who("pass@1", up) + who("pass@4", up)))
    acc_down = list(dict.fromkeys(who("pass@1", down) + who("pass@4", down)))
    claims.append(
        f"1. **Accuracy (higher pass@k than GRPO).** Δpass@1 against {reference}: {listing('pass@1')}. Δpass@4: "
        f"{listing('pass@4')}. Slope: pass@1 {slope('pass@1')}, pass@4 {slope('pass@4')}. "
        + (f"Reproduced in direction (CI above 0) by: {names(acc_up)}. " if acc_up else
           "No λ reproduces the direction: every CI that does not cover 0 is below it, or all cover 0. ")
        + (f"Resolved harm (CI below 0): {names(acc_down)}." if acc_down else ""))
    cov = {lab: (ev["arms"][lab]["beyond_reference"], ev["arms"][lab]["reference_only"]) for lab in others}
    cov_up = who("pass@4", up)
    claims.append(
        f"2. **Coverage beyond GRPO.** Expected problems solved at pass@4 by the arm and not by {reference} vs by "
        f"{reference} and not the arm: " + "; ".join(f"{name_of(lab)} {_ci(b, 1)} vs {_ci(o, 1)}"
                                                    for lab, (b, o) in cov.items())
        + ". Their difference is the pass@4 difference times the number of problems, so the claim's direction "
          "(more beyond than lost) is resolved exactly when Δpass@4's CI is above 0: "
        + (names(cov_up) if cov_up else "for no λ") + ". Every arm solves some problems GRPO does not; so does "
          "GRPO against every arm, in similar numbers.")
    sep_up, sep_down = who("margin", up), who("margin", down)
    claims.append(
        f"3. **Separation (larger correct − incorrect log-prob margin).** Δ median margin against {reference}: "
        f"{listing('margin')}. Slope {slope('margin')}. Train-time pair accuracy Δ: {listing('pair accuracy')} "
        f"(slope {slope('pair accuracy')}). "
        + (f"Reproduced in direction by: {names(sep_up)}. " if sep_up else "No λ resolves a larger held-out "
                                                                               "margin. ")
        + (f"Resolved smaller margin: {names(sep_down)}." if sep_down else ""))
    side = []
    for name, what in (("length", "response length"), ("entropy", "entropy")):
        s = ev["slopes"].get(name) or tr["slopes"].get(name)
        if s:
            side.append(f"{what} {slope(name)}")
    claims.append("Side effects per unit λ: " + "; ".join(side) + ".")
    pl = {lab: tr["arms"][lab]["pair loss"] for lab in arms}
    gn = {lab: tr["arms"][lab]["grad norm"] for lab in arms}
    claims.append(
        "How the term acts here (measured; the reading of it is an interpretation, not tested separately): the "
        "train-time pair loss is " + ", ".join(f"{lab} {_ci(v, 4)}" for lab, v in pl.items())
        + f", against ln 2 = {math.log(2):.4f} = −log σ(0): β·(ℓ̄_w − ℓ̄_l) stays near 0, the sigmoid is in its linear "
          "regime, and the term's gradient is a near-constant push up on winners and down on losers, the direction "
          "GRPO's advantages already push. It does add gradient (grad norm " + ", ".join(
              f"{lab} {_ci(v, 4)}" for lab, v in gn.items())
        + f"; slope {slope('grad norm')}), but Adam scales each parameter's step by its own gradient history, so a "
          "term collinear with GRPO's gradient changes the update little. λ alone therefore buys little at β = 0.2; "
          "what would change it (a larger β, pairs GRPO ranks differently, another optimizer) is not measured here.")
    unresolved = [c for c, ok in (("accuracy", acc_up), ("coverage", cov_up), ("separation", sep_up)) if not ok]
    claims.append(
        "**Not resolved:** " + (", ".join(unresolved) + " — at this scale (an 820k-parameter model, 60 RL steps, "
                                "3 seeds, 200 problems) the pair term's effect on these is below what the bootstrap "
                                "separates from seed noise, at every λ tried." if unresolved else "nothing."))
    # the demo's λ, by rule: the smallest fixed λ > 0 with a resolved gain on a claim and no resolved harm
    fixed = sorted((a.dose, lab) for lab, a in arms.items() if a.dose not in (None, 0.0) and lab != reference)
    good = [(lam, lab) for lam, lab in fixed if lab in acc_up + sep_up + cov_up and lab not in acc_down]
    harmed = [lab for lam, lab in fixed if lab in acc_down]
    if good:
        lam, lab = good[0]
        strong = lab in acc_up
        choice = (f"**Demo λ.** The evidence favours λ = {lam:g} ({lab}): the smallest fixed λ with a resolved gain "
                  f"on a claim and no resolved accuracy loss. "
                  + ("Its accuracy gain is resolved too" if strong else "Its accuracy is not better resolvably")
                  + f"; the demo keeps λ = {demo_lambda:g} because launch/demo_expected.json's ranges were measured "
                    "with it (a change needs new reference runs), and this recommendation is for users of the task.")
    else:
        gn = {lab: tr["arms"][lab]["grad norm"]["estimate"] for lab in arms}
        big = max(fixed)[1] if fixed else None
        choice = (f"**Demo λ: keep {demo_lambda:g} (fixed).** No λ tried gives a resolved gain on any claim"
                  + (f", and larger λ resolvably lowered accuracy ({names(harmed)})" if harmed else
                     ", and none a resolved loss")
                  + f". Between outcomes the bootstrap cannot tell apart, {demo_lambda:g} is the cheap and faithful "
                    "choice: it is the paper's adaptive ceiling and launch/demo_expected.json's ranges were measured "
                    "with it"
                  + (f"; {name_of(big)} raises the gradient norm to {gn[big] / gn[reference]:.2f}x GRPO's for no "
                     "measured gain" if big and gn.get(reference) else "")
                  + "".join(f"; {name_of(lab)} sits near its floor, so it is a smaller fixed λ in effect"
                            for lab, a in arms.items() if a.dose is None and lab in lam_used)
                  + ". A user should not expect λ alone to buy separation or coverage at this scale.")
    claims.append(choice)
    summary = [f"- Accuracy: {'reproduced by ' + names(acc_up) if acc_up else 'no λ reproduces it'}"
               + (f"; resolved loss at {names(acc_down)}" if acc_down else "")
               + f" (pass@1 slope {slope('pass@1')}).",
               f"- Coverage beyond GRPO: {'resolved for ' + names(cov_up) if cov_up else 'not resolved for any λ'}.",
               f"- Separation: {'larger margin at ' + names(sep_up) if sep_up else 'no λ resolves a larger margin'}"
               + (f"; smaller at {names(sep_down)}" if sep_down else "") + f" (slope {slope('margin')}).",
               "- " + choice.replace("**Demo λ.** ", "Demo λ: ")]
    return summary, claims


# --------------------------------------------------------------------------------------------- length bias
def _restated_share(r) -> Optional[float]:
    from megatron_amir.data.synthetic import is_restated

    return sum(is_restated(t) for t in r.texts) / len(r.texts) if r.texts else None


def _answer_accuracy(r, style: Optional[bool] = None) -> Optional[float]:
    """Fraction of samples whose extracted answer matches, whatever the verifier's style gate; ``style``: only among
    the restated (True) or direct (False) samples (None when the problem has none)."""
    from megatron_amir.data.synthetic import is_restated
    from megatron_amir.rewards.extract import normalize_answer

    picked = [a for a, t in zip(_extracted(r), r.texts) if style is None or is_restated(t) == style]
    if r.gold is None or not picked:
        return None
    return sum(a is not None and normalize_answer(a) == normalize_answer(r.gold) for a in picked) / len(picked)


def _extracted(r) -> list:
    """Each sample's answer as the exact/synthetic verifier extracts it (None: no answer, the format reward's
    0); the results' ``answers`` fall back to looser extraction, so they are not used for this."""
    from megatron_amir.rewards.extract import extract_answer

    return [extract_answer(t) for t in r.texts]


def _length_split(correct: bool) -> Callable:
    def f(r) -> Optional[float]:
        ls = [ln for ln, ok in zip(r.lengths, r.correct) if ok == correct]
        return sum(ls) / len(ls) if ls else None
    return f


LENGTH_EVAL = {"pass@1": None, "answer accuracy": EvalMetric(_answer_accuracy),
               "answer accuracy, restated": EvalMetric(lambda r: _answer_accuracy(r, True)),
               "answer accuracy, direct": EvalMetric(lambda r: _answer_accuracy(r, False)),
               "restated share": EvalMetric(_restated_share), "length": None,
               "length correct": EvalMetric(_length_split(True)), "length incorrect": EvalMetric(_length_split(False))}


def length_bias_report(directions: Mapping[str, Mapping[str, Sequence[str]]], report: Path, root: Path, *,
                       steps: int, logs: Sequence[Path], sft: Path, sft_steps: int, lam: float,
                       n_boot: int = 2000) -> Path:
    """docs/results_length_bias.md: per direction (correct chains longer / shorter), GRPO vs the pair term with the
    length-normalized ℓ̄ (mean, the paper's) and the plain sum, at λ = ``lam``: accuracy (the style-gated task and the
    answer alone), the restated style's share, response lengths, pair statistics."""
    assets = report.parent / (report.stem + "_assets")
    assets.mkdir(parents=True, exist_ok=True)
    base_metrics = standard_eval_metrics([1])
    metrics = {k: (v or base_metrics[k]) for k, v in LENGTH_EVAL.items()}
    seeds = max(len(ds) for g in directions.values() for ds in g.values())
    L = [f"# Length bias: the length-normalized vs the summed log-prob in the pair term, {seeds} seed"
         f"{'s' if seeds > 1 else ''} per arm, {steps} RL steps", ""]
    body, summary, tables = [], [], {}
    all_groups: dict[str, Sequence[str]] = {}
    for direction, groups in directions.items():
        labels = list(groups)
        ref, mean_lab, sum_lab = labels[0], labels[1], labels[2]
        arms = {lab: Arm(list(ds)) for lab, ds in groups.items()}
        ev = eval_metrics_table(arms, ref, metrics, n_boot=n_boot)
        ev_sum = eval_metrics_table({mean_lab: arms[mean_lab], sum_lab: arms[sum_lab]}, mean_lab, metrics,
                                    n_boot=n_boot)
        tr = train_metrics_table(arms, ref, {**TRAIN_KEYS, "length correct (train)": "response/length_correct",
                                             "length incorrect (train)": "response/length_incorrect"}, tail=TAIL)
        start = eval_metrics_table({"start": Arm([str(_initial(d)) for d in groups[ref]])}, "start", metrics,
                                   n_boot=n_boot)
        tables[direction] = {"eval": ev, "eval_sum_vs_mean": ev_sum, "train": tr, "start": start}
        all_groups.update(groups)
        cols = ["pass@1", "answer accuracy", "answer accuracy, restated", "answer accuracy, direct", "restated share",
                "length", "length correct", "length incorrect"]
        tcols = ["length correct (train)", "length incorrect (train)", "pair accuracy", "pairs/step"]
        body += [f"## {direction}", "", "Held-out eval (final checkpoints; pass@1 = the style-gated task, answer "
                 "accuracy = the answer alone):", ""]
        body += _table(["arm"] + cols, [[f"start ({ref}'s initial eval)"] + [
            _ci(start["arms"]["start"][c], 3 if "length" not in c else 2) for c in cols]] + [
            [lab] + [_ci(ev["arms"][lab][c], 3 if "length" not in c else 2) for c in cols] for lab in labels])
        body += ["", f"Train-time (last {TAIL} steps; the length of correct and incorrect rollouts shows the "
                 "direction):", ""]
        body += _table(["arm"] + tcols, [[lab] + [_ci(tr["arms"][lab][c], 3 if "pair acc" in c else 2) for c in tcols]
                                         for lab in labels])
        body += ["", f"Differences from {ref} (paired bootstrap over problems):", ""]
        dcols = ["pass@1", "answer accuracy", "restated share", "length"]
        body += _table(["arm"] + [f"Δ {c}" for c in dcols],
                       [[lab] + [_ci(ev["differences"][lab][c], 3, True) for c in dcols] for lab in labels[1:]]
                       + [[f"{sum_lab} − {mean_lab}"] + [_ci(ev_sum["differences"][sum_lab][c], 3, True)
                                                          for c in dcols]])
        body.append("")
        d_sum = ev_sum["differences"][sum_lab]
        lc, li = (tr["arms"][ref][k]["estimate"] for k in ("length correct (train)", "length incorrect (train)"))
        summary.append(
            f"- {direction}: correct rollouts {lc:.1f} vs incorrect {li:.1f} tokens ({ref}, train-time); "
            f"sum − mean normalization: Δ length {_ci(d_sum['length'], 2, True)} tokens "
            f"— {verdict(d_sum['length'])}, Δ pass@1 {_ci(d_sum['pass@1'], 3, True)} — {verdict(d_sum['pass@1'])}; "
            f"against GRPO, mean: Δ length {_ci(ev['differences'][mean_lab]['length'], 2, True)}, Δ pass@1 "
            f"{_ci(ev['differences'][mean_lab]['pass@1'], 3, True)}; sum: Δ length "
            f"{_ci(ev['differences'][sum_lab]['length'], 2, True)}, Δ pass@1 "
            f"{_ci(ev['differences'][sum_lab]['pass@1'], 3, True)}.")
    secs, have = wall_time(logs)
    L += ["## Summary", "", *summary, _compute(secs, have, "the fine-tune included"), "",
          "The task variant: `data.synthetic.restate_fraction=0.5` (half the solutions restate the problem first, "
          "picked by a hash of the problem, so the style cannot be told from the prompt) and `reward.style` "
          "(`restated`: only restated answers count; `direct`: only direct ones). A restated chain is longer than "
          "the direct chain of the same problem by the restated prompt, so the gate ties correctness to length; whether correct rollouts end up longer than incorrect ones also depends on how long "
          "the wrong ones are, which the train-time lengths of correct and incorrect rollouts show. "
          f"Both directions start from one checkpoint: the demo's warm-up fine-tuned for "
          f"{sft_steps} supervised steps on the mixed-style solutions (`{_rel(sft, root)}`). Pair term at λ = {lam:g} "
          "fixed, β = 0.2, margin 0.5; `algorithm.amir.logprob_norm` = mean (ℓ̄ = Σ log π / |y|, the paper's) or sum "
          "(Σ log π). CIs 95%: eval a paired bootstrap over problems (all seeds of a drawn problem), train a t "
          "interval over seeds.", "",
          "Both normalizations can tilt: ℓ̄ = sum lowers a chain's implicit reward by the log-prob of every extra "
          "token, so the pair term finds a long winner harder to rank above a short loser and pushes harder; ℓ̄ = "
          "mean averages the extra tokens in, so it tilts towards whichever style has the likelier tokens per "
          "position. The start row is the fine-tuned checkpoint every arm begins from (its answer accuracy per style "
          "says which style the model gets right more often without any gate).", "",
          *body]
    L += _sources(all_groups, have, root, [f"fine-tune: `{_rel(sft, root)}`"])
    L += ["", "## Files", ""] + [f"- {lab}: " + ", ".join(f"`{_rel(f, root)}`" for f in fs)
                                 for d, t in tables.items()
                                 for lab, fs in [(f"{d}, start", t["start"]["files"]["start"]),
                                                 *t["eval"]["files"].items()]]
    atomic_write_text(assets / "length_bias.json", json.dumps(tables, indent=1, default=str) + "\n")
    atomic_write_text(report, "\n".join(L) + "\n")
    return report


def _initial(run_dir: str) -> Path:
    """A run's evaluation at step 0 (the starting checkpoint)."""
    found = sorted((Path(run_dir) / "eval").glob("initial_step*.jsonl"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no eval/initial_step*.jsonl (the runs are trained with --eval-at-start)")
    return found[-1]


# --------------------------------------------------------------------------------------------- reward scale
def _pairs_per_group(r, scheme: str) -> Optional[float]:
    """Pairs among a problem's eval samples under a reward scheme: ``01`` (0/1 correctness, margin 0.5: every correct
    × incorrect sample) or ``paper`` (2·correct + 0.5·format, margin 2.0: only correct × samples without an answer,
    a correct vs a wrong-but-formatted sample being exactly 2.0 apart)."""
    c = sum(r.correct)
    if scheme == "01":
        return float(c * (r.n - c))
    return float(c * sum(a is None for a in _extracted(r)))


REWARD_EVAL = {"pass@1": None, "pass@4": None, "margin": None, "length": None,
               "format rate": EvalMetric(lambda r: sum(a is not None for a in _extracted(r)) / r.n),
               "pairs/problem, 0/1 scheme": EvalMetric(lambda r: _pairs_per_group(r, "01")),
               "pairs/problem, paper scheme": EvalMetric(lambda r: _pairs_per_group(r, "paper"))}


def reward_scale_report(groups: Mapping[str, Sequence[str]], reference: str, base: Optional[Path], report: Path,
                        root: Path, *, steps: int, logs: Sequence[Path], n_boot: int = 2000) -> Path:
    """docs/results_reward_scale.md: 0/1 correctness with pair margin 0.5 vs the paper's 2.0 correctness + 0.5 format
    with margin 2.0: which pairs form (train-time counts, and the pair structure of the eval samples) and the
    outcome (pass@k, margin, length) against ``reference``."""
    assets = report.parent / (report.stem + "_assets")
    assets.mkdir(parents=True, exist_ok=True)
    base_metrics = standard_eval_metrics([1, 4])
    metrics = {k: (v or base_metrics[k]) for k, v in REWARD_EVAL.items()}
    arms = {lab: Arm(list(ds)) for lab, ds in groups.items()}
    ev = eval_metrics_table(arms, reference, metrics, n_boot=n_boot)
    tr = train_metrics_table(arms, reference, TRAIN_KEYS, tail=TAIL)
    tr_all = train_metrics_table(arms, reference, {"pairs/step (all steps)": "amir/pair_count"}, tail=10 ** 9)
    details, _ = _study_details(groups, reference, base, assets, report, "Details: the multi-seed study tables", root)
    secs, have = wall_time(logs)
    labels = list(groups)
    L = [f"# The paper's reward scale: 2.0 correctness + 0.5 format with pair margin 2.0, vs 0/1 with margin 0.5, "
         f"{steps} RL steps", ""]
    amir = [lab for lab in labels if "AMIR" in lab]
    L += ["## Summary", "",
          "- Which pairs form: a pair needs a reward gap above the margin. With 0/1 rewards and margin 0.5 every "
          "correct sample pairs with every incorrect one. With 2·correct + 0.5·format and margin 2.0 the gap between "
          "a correct and a wrong-but-formatted answer is exactly 2.0, not above it, so only correct × no-answer pairs "
          "form. Pairs per training step (all steps, mean over seeds): "
          + "; ".join(f"{lab} {_ci(tr_all['arms'][lab]['pairs/step (all steps)'], 1)}" for lab in labels) + ".",
          "- Outcome against " + reference + ": " + "; ".join(
              f"{lab}: Δ pass@1 {_ci(ev['differences'][lab]['pass@1'], 4, True)} — "
              f"{verdict(ev['differences'][lab]['pass@1'])}, "
              f"Δ margin {_ci(ev['differences'][lab]['margin'], 4, True)}"
              for lab in labels if lab != reference) + ".",
          *_pair_verdict(tr_all, ev, labels), _compute(secs, have), "",
          "The paper-scale arms use `reward.correct_weight=2.0 reward.format_weight=0.5 algorithm.amir.margin=2.0` "
          "(the reference code's correctness and strict-format rewards; its smaller shaping rewards are left out); "
          "GRPO's advantages are normalized by the group's reward std, so the scale alone does not change GRPO, only "
          "the format term could. "
          "CIs 95%: eval a paired bootstrap over problems, train a t interval over seeds.", "",
          "## Which pairs form", ""]
    cols = ["format rate", "pairs/problem, 0/1 scheme", "pairs/problem, paper scheme"]
    L += ["Held-out eval samples (4 per problem; final checkpoints): the share with an extractable answer and the "
          "pairs the two schemes would form among a problem's samples:", ""]
    L += _table(["arm"] + cols, [[lab] + [_ci(ev["arms"][lab][c], 3) for c in cols] for lab in labels])
    L += ["", f"Training batches (16 groups of 8; last {TAIL} steps, and all steps):", ""]
    L += _table(["arm", "pairs/step", "pairs/step (all steps)", "pair accuracy"],
                [[lab, _ci(tr["arms"][lab]["pairs/step"], 1), _ci(tr_all["arms"][lab]["pairs/step (all steps)"], 1),
                  _ci(tr["arms"][lab]["pair accuracy"], 3)] for lab in labels])
    cols = ["pass@1", "pass@4", "margin", "length"]
    L += ["", "## Outcome", ""]
    L += _table(["arm"] + cols, [[lab] + [_ci(ev["arms"][lab][c], 4) for c in cols] for lab in labels])
    L += ["", f"Differences from {reference}:", ""]
    L += _table(["arm"] + [f"Δ {c}" for c in cols], [[lab] + [_ci(ev["differences"][lab][c], 4, True) for c in cols]
                                                     for lab in labels if lab != reference])
    if amir:
        L += ["", "AMIR arms: " + ", ".join(amir) + "."]
    L += ["", *_sources(groups, have, root)]
    atomic_write_text(assets / "reward_scale.json", json.dumps({"eval": ev, "train": tr, "train_all": tr_all},
                                                              indent=1, default=str) + "\n")
    atomic_write_text(report, "\n".join(L) + "\n\n" + details)
    return report


def _pair_verdict(tr_all: dict, ev: dict, labels: Sequence[str]) -> list[str]:
    """Whether the pair term is active at the paper's scale: its pairs per step against the 0/1 AMIR arm's."""
    amir = [lab for lab in labels if "AMIR" in lab]
    if len(amir) < 2:
        return []
    base, paper = amir[0], amir[-1]
    key = "pairs/step (all steps)"
    a, b = tr_all["arms"][base][key]["estimate"], tr_all["arms"][paper][key]["estimate"]
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return []
    share = b / a
    return [f"- So the pair term is {'practically off' if share < 0.01 else 'active'} at the paper's scale here: "
            f"{paper} forms {100 * share:.2f}% of {base}'s pairs, because nearly every sample has the answer format "
            f"(held-out format rate {_ci(ev['arms'][paper]['format rate'], 3)}): a correct answer (2.5) and a wrong "
            "one with the format (0.5) are exactly 2.0 apart, which the strict margin of 2.0 excludes."]


# --------------------------------------------------------------------------------------------- results.md links
def summary_of(report: Path) -> str:
    """The ``## Summary`` section's text of a follow-up report ('' when it has none)."""
    text = report.read_text() if report.is_file() else ""
    _, found, rest = text.partition("\n## Summary\n")
    if not found:
        return ""
    nxt = rest.find("\n## ")
    return (rest[:nxt] if nxt >= 0 else rest).strip().split("\n\n")[0]
