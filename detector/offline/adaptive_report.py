"""``advdetect evaluate --adaptive``: the detector against an attacker who knows it, with Tramer et al.'s sanity checks.

For each budget it measures the fraction of the attacked inputs on which an attack both misclassifies and
evades the ``adversarial`` flag, at each calibrated false-positive rate, on the **real** detector (every
candidate rounded to 8-bit; :mod:`detector.offline.adaptive`). "plain" attacks ignore the detector;
"adaptive" attacks know its operating point. Per input, an attacker keeps the best candidate it has seen,
and an attack at budget b succeeds when some candidate within b did (so the figures are monotone in b):

- **L-inf, foreground** (only the clean image's non-zero pixels change), for each eps of ``linf_budgets``:
  plain PGD; adaptive = per input the best of PGD on L_f for every FPR f and lambda of ``lambdas``, a
  random start with the largest lambda, Orthogonal PGD per f, and the staged Square attack at its eps;
- **L-inf, whole image** at ``whole_image_eps``: plain PGD; adaptive PGD per f, or any foreground
  candidate within the eps (an attacker may leave the background alone);
- **Square** (score-based, real detector, ``queries`` per input) at ``whole_image_eps`` on the foreground:
  plain against staged;
- **L2**, budgets ``l2_multiples`` times the median L2 of plain CW-L2 (kappa 0): plain = the closest
  candidate of every plain attack (plain DDN on the digit's pixels included); adaptive = the closest of every
  adaptive attack: adaptive CW-L2 and DDN on the digit's pixels per f, and the boundary attack from the
  nearest unflagged clean image of another class;
- **each score alone** (its own conformal p-value >= f), on the adaptive candidates;
- **clean accuracy kept**: correct and not flagged, on every clean input given.

Sanity checks (Tramer et al. 2020), printed in the report: (1) the adaptive attack evades at least as
often as the plain one at every budget and FPR; (2) with an unbounded budget (any L2) it evades on every
input. A failing check says the attack is broken and its figures are lower bounds only.

Issue 18's goal: at eps 0.3 on the foreground, at least half of the inputs the strongest adaptive attack
misclassifies are still flagged at 5 % FPR; otherwise, evading on half of the inputs needs at least twice
the median L2 of plain CW-L2.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from detector.data import Dataset
from detector.errors import InvalidInput
from detector.manifest import FlagRule
from detector.offline.adaptive import (Budget, Judge, Record, boundary_attack, clean_starts, cw_l2_attack, ddn_attack,
                                       pgd_attack, square_attack)
from detector.offline.attacks import round_to_grid
from detector.pipeline import Detector

__all__ = ["AdaptiveConfig", "adaptive_evaluate", "adaptive_markdown", "write_adaptive"]

TARGET_EPS, TARGET_FPR, TARGET_FLAGGED, TARGET_L2_MULTIPLE = 0.3, 0.05, 0.5, 2.0


class AdaptiveConfig(BaseModel):
    """Settings of an adaptive evaluation (defaults: the LeNet-5 run of ``bench/quality.py --adaptive``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_inputs: int = Field(100, ge=1, description="correctly classified inputs attacked (the first ones)")
    steps: int = Field(30, ge=1, description="PGD steps per run; CW runs 3x as many (at least 100)")
    queries: int = Field(1000, ge=0, description="Square queries per input (0: no Square)")
    linf_budgets: tuple[float, ...] = Field((0.1, 0.2, 0.3), min_length=1, description="L-inf eps on the foreground")
    whole_image_eps: float = Field(0.3, gt=0, description="L-inf eps of the whole-image and Square attacks")
    lambdas: tuple[float, ...] = Field((1.0, 10.0), min_length=1, description="weights of the detector term")
    l2_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    rule: str = "adversarial"


@dataclass
class _Runs:
    """The judges of one evaluation, by name, and the clock."""

    judges: dict[str, Judge]
    seconds: dict[str, float]


def _rates(record: Record, norm: str, eps: float, fprs: tuple[float, ...], scores: list[str]) -> dict:
    """Fractions of inputs misclassified / evading (fused and per score) by some candidate within ``eps``."""
    return {"misclassified": float(record.achieved("misclassified", norm, eps).mean()),
            "evaded": {f"{f:g}": float(record.achieved(f"fused@{f:g}", norm, eps).mean()) for f in fprs},
            "evaded_score": {f"{s}@{f:g}": float(record.achieved(f"{s}@{f:g}", norm, eps).mean())
                             for s in scores for f in fprs}}


def adaptive_evaluate(detector: Detector, data: Dataset, config: AdaptiveConfig = AdaptiveConfig(),
                      progress: Callable[[str], None] | None = None) -> dict:
    """Attack the first ``config.n_inputs`` correctly classified inputs of ``data``; returns the results table.

    The other correctly classified inputs of ``data`` are the pool of clean starts of the boundary attack.
    Needs torch (the mirror). The table is what ``adaptive.json`` holds; :func:`adaptive_markdown` renders it.
    """
    import torch

    from detector.offline.mirror import DetectorMirror

    torch.set_num_threads(1)  # the attacks' small batches run faster on one thread of a shared machine
    say = progress or (lambda _: None)
    started = time.time()
    flag = next((r for r in detector.manifest.flags if r.name == config.rule), None)
    if flag is None:
        raise InvalidInput(f"the baseline has no flag {config.rule!r}")
    fprs = tuple(sorted(t.target_fpr for t in flag.thresholds))
    x_all = round_to_grid(data.x)
    capture = detector.classify(x_all)
    correct = capture.predicted == data.y
    statistic = detector.statistics(detector.p_values(detector.raw_scores(capture), capture.predicted))[config.rule]
    kept = {f"{f:g}": float(np.mean(correct & (statistic <= Detector._threshold(flag, f)))) for f in fprs}
    chosen = np.flatnonzero(correct)[:config.n_inputs]
    if len(chosen) < config.n_inputs:
        raise InvalidInput(f"{data.name} has {len(chosen)} correctly classified inputs; {config.n_inputs} asked for")
    x, y = x_all[chosen], data.y[chosen]
    pool = np.setdiff1d(np.flatnonzero(correct), chosen)
    mirror = DetectorMirror(detector)  # raises when a scorer kind has no mirror
    with torch.no_grad():
        mirrored = mirror(torch.from_numpy(x), scores=flag.members).statistics[config.rule].numpy()
    fidelity = float(np.max(np.abs(mirrored - statistic[chosen]) / np.maximum(np.abs(statistic[chosen]), 1e-3)))
    say(f"{len(x)} inputs; mirror of {', '.join(flag.members)} within {fidelity:.1e} (relative)")
    runs = _Runs({}, {})

    def judge(name: str) -> Judge:
        runs.judges[name] = Judge(detector, x, y, fprs, config.rule)
        return runs.judges[name]

    def timed(name: str, work: Callable[[], object]) -> None:
        t0 = time.time()
        work()
        runs.seconds[name] = runs.seconds.get(name, 0.0) + time.time() - t0
        say(f"{name}: {time.time() - t0:.0f} s")

    top = max(fprs)
    for eps in config.linf_budgets:
        budget = Budget("linf", eps, foreground=True)
        plain, aware = judge(f"pgd_fg_plain@{eps:g}"), judge(f"pgd_fg_adaptive@{eps:g}")
        timed("pgd_fg_plain", lambda: pgd_attack(mirror, plain, x, budget, steps=config.steps))

        def adaptive_linf() -> None:
            for f in fprs:
                for lam in config.lambdas:
                    pgd_attack(mirror, aware, x, budget, lam=lam, fpr=f, steps=config.steps)
                pgd_attack(mirror, aware, x, budget, lam=config.lambdas[-1], fpr=f, steps=config.steps,
                           random_start=True, seed=1)
                pgd_attack(mirror, aware, x, budget, fpr=f, steps=config.steps, orthogonal=True)

        timed("pgd_fg_adaptive", adaptive_linf)
    whole = Budget("linf", config.whole_image_eps)
    plain_whole, aware_whole = judge("pgd_whole_plain"), judge("pgd_whole_adaptive")
    timed("pgd_whole_plain", lambda: pgd_attack(mirror, plain_whole, x, whole, steps=config.steps))
    timed("pgd_whole_adaptive", lambda: [pgd_attack(mirror, aware_whole, x, whole, lam=config.lambdas[-1], fpr=f,
                                                    steps=config.steps) for f in fprs])
    if config.queries:
        square = Budget("linf", config.whole_image_eps, foreground=True)
        plain_sq, staged_sq = judge("square_plain"), judge("square_staged")
        timed("square_plain", lambda: square_attack(plain_sq, x, square, queries=config.queries))
        timed("square_staged", lambda: square_attack(staged_sq, x, square, staged=True, queries=config.queries))
    plain_cw, aware_cw = judge("cw_plain"), judge("cw_adaptive")
    timed("cw_plain", lambda: cw_l2_attack(mirror, plain_cw, x, steps=max(3 * config.steps, 100)))
    timed("cw_adaptive", lambda: [cw_l2_attack(mirror, aware_cw, x, lam=config.lambdas[-1], fpr=f, kappa=0.5,
                                               steps=max(3 * config.steps, 100)) for f in fprs])
    plain_ddn, aware_ddn = judge("ddn_plain"), judge("ddn_adaptive")
    timed("ddn_plain", lambda: ddn_attack(mirror, plain_ddn, x, steps=max(3 * config.steps, 100), foreground=True))
    timed("ddn_adaptive", lambda: [ddn_attack(mirror, aware_ddn, x, lam=config.lambdas[0], fpr=f, foreground=True,
                                              steps=max(3 * config.steps, 100)) for f in fprs])
    boundary = judge("boundary")
    starts = clean_starts(detector, x, y, x_all[pool], data.y[pool], fpr=top, rule=config.rule)
    timed("boundary", lambda: [boundary_attack(mirror, boundary, x, starts, fpr=f, lam=config.lambdas[-1],
                                               rounds=12, rule=config.rule) for f in fprs])
    return _table(detector, data, config, fprs, runs, x, kept, fidelity, flag, time.time() - started)


def _table(detector: Detector, data: Dataset, config: AdaptiveConfig, fprs: tuple[float, ...], runs: _Runs,
           x: np.ndarray, kept: dict, fidelity: float, flag: FlagRule, seconds: float) -> dict:
    """The results table of :func:`adaptive_evaluate` from its judges' records."""
    j = {name: judge.record for name, judge in runs.judges.items()}
    scores = list(detector.score_names)
    fg_plain = Record.best([j[f"pgd_fg_plain@{eps:g}"] for eps in config.linf_budgets]
                           + ([j["square_plain"]] if "square_plain" in j else []))
    fg_aware = Record.best([j[f"pgd_fg_adaptive@{eps:g}"] for eps in config.linf_budgets]
                           + ([j["square_staged"]] if "square_staged" in j else []))
    rows = []

    def add(family: str, budget: str, norm: str, eps: float, plain: Record, adaptive: Record) -> None:
        rows.append({"family": family, "budget": budget, "plain": _rates(plain, norm, eps, fprs, scores),
                     "adaptive": _rates(adaptive, norm, eps, fprs, scores)})

    for eps in config.linf_budgets:
        add("L-inf foreground (PGD, Square)", f"eps={eps:g}", "linf", eps, fg_plain, fg_aware)
    add("L-inf whole image (PGD)", f"eps={config.whole_image_eps:g}", "linf", config.whole_image_eps,
        j["pgd_whole_plain"], Record.best([j["pgd_whole_adaptive"], fg_aware]))
    if "square_plain" in j:
        add(f"Square foreground ({config.queries} queries): plain vs staged", f"eps={config.whole_image_eps:g}",
            "linf", config.whole_image_eps, j["square_plain"], j["square_staged"])
    plain_all = Record.best([r for name, r in j.items() if "plain" in name])
    aware_all = Record.best([r for name, r in j.items() if "plain" not in name])
    cw = j["cw_plain"].l2["misclassified"]
    median_cw = float(np.median(cw))  # an input CW never misclassified counts as infinitely far
    for multiple in config.l2_multiples:
        add("L2 (closest candidate of every attack)", f"{multiple:g} x median CW L2", "l2", multiple * median_cw,
            plain_all, aware_all)
    add("L2 (closest candidate of every attack)", "unbounded", "l2", np.inf, plain_all, aware_all)
    at_half = {side: {f"{f:g}": float(np.median(record.l2[f"fused@{f:g}"])) for f in fprs}
               for side, record in (("plain", plain_all), ("adaptive", aware_all))}
    return {
        "model": "", "data": data.name, "n_inputs": len(x), "config": config.model_dump(), "fprs": list(fprs),
        "flag": {"name": config.rule, "scores": flag.scores, "fusion": flag.fusion, "screen": flag.screen,
                 "rule": flag.describe()}, "scores": scores,
        "mirror_max_relative_error": fidelity, "clean_unflagged": kept, "median_cw_l2": median_cw,
        "l2_at_half_evasion": at_half, "rows": rows, "checks": _sanity(rows, fprs),
        "l2_distances": {side: {f"{f:g}": record.l2[f"fused@{f:g}"].tolist() for f in fprs}
                         for side, record in (("plain", plain_all), ("adaptive", aware_all))},
        "seconds": {"total": seconds, **runs.seconds},
        "queries": {name: judge.queries // max(len(x), 1) for name, judge in runs.judges.items()},
    }


def _sanity(rows: list[dict], fprs: tuple[float, ...]) -> dict:
    """Tramer et al.'s checks: adaptive >= plain at every budget and FPR; the unbounded attack evades on every input."""
    weaker = [f"{r['family']} {r['budget']} at FPR {f:g}: adaptive {r['adaptive']['evaded'][f'{f:g}']:.2f} < plain "
              f"{r['plain']['evaded'][f'{f:g}']:.2f}" for r in rows for f in fprs
              if r["adaptive"]["evaded"][f"{f:g}"] < r["plain"]["evaded"][f"{f:g}"]]
    unbounded = next(r for r in rows if r["budget"] == "unbounded")
    return {"adaptive_at_least_plain": not weaker, "weaker_cases": weaker,
            "unbounded_full_evasion": all(unbounded["adaptive"]["evaded"][f"{f:g}"] == 1.0 for f in fprs)}


def _flagged_share(rates: dict, fpr: str) -> float:
    """Share of the misclassified inputs still flagged (NaN when nothing was misclassified)."""
    return 1.0 - rates["evaded"][fpr] / rates["misclassified"] if rates["misclassified"] else float("nan")


def adaptive_markdown(table: dict, command: str = "") -> str:
    """The report: settings, sanity checks, evasion per budget (plain vs adaptive), each score alone, the goal."""
    fprs = [f"{f:g}" for f in table["fprs"]]
    checks, config, flag = table["checks"], table["config"], table["flag"]
    broken = not (checks["adaptive_at_least_plain"] and checks["unbounded_full_evasion"])
    lines = [f"# Adaptive attacks on the detector: {table['model'] or 'model'} on {table['data']}, 8-bit", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"- {table['n_inputs']} correctly classified inputs attacked; the `{flag['name']}` flag is {flag['rule']}; "
        "the differentiable mirror covers every one of them "
        f"(fused statistic within {table['mirror_max_relative_error']:.1e}, relative, of the served detector on these inputs).",
        "- Clean accuracy kept (correct and not flagged, every clean input given): "
        + ", ".join(f"{table['clean_unflagged'][f]:.3f} at {float(f):.0%} FPR" for f in fprs) + ".",
        f"- Every candidate is rounded to 8-bit and judged on the served detector; an input counts when some candidate "
        f"within the budget is misclassified (and not flagged). PGD {config['steps']} steps, lambda in "
        f"{list(config['lambdas'])}, one run per FPR; CW and DDN (digit's pixels only) "
        f"{max(3 * config['steps'], 100)} steps; Square {config['queries']} "
        f"queries. Median L2 of plain CW-L2 (kappa 0): {table['median_cw_l2']:.3f}. "
        f"Wall time {table['seconds']['total'] / 60:.0f} min.",
        "",
        "## Sanity checks (Tramer et al. 2020)",
        "",
        f"- adaptive >= plain at every budget and FPR: **{'pass' if checks['adaptive_at_least_plain'] else 'FAIL'}**"
        + ("" if checks["adaptive_at_least_plain"] else f" ({'; '.join(checks['weaker_cases'])})"),
        f"- unbounded budget (any L2) reaches 100 % evasion: **{'pass' if checks['unbounded_full_evasion'] else 'FAIL'}**",
        "- " + ("**The attack is broken** by at least one check: its evasion figures are lower bounds only."
                if broken else "Both pass: the attack is not visibly broken (its figures are still lower bounds on "
                "what an attacker achieves)."),
        "",
        "## Evasion: misclassified and not flagged (fraction of the attacked inputs)",
        "",
        "| attack | budget | misclassified (plain / adaptive) | "
        + " | ".join(f"evades @{float(f):.0%} (plain / adaptive)" for f in fprs)
        + f" | still flagged among misclassified @{float(fprs[-1]):.0%} (plain / adaptive) |",
        "|---|---|---|" + "---|" * len(fprs) + "---|",
    ]
    for r in table["rows"]:
        p, a = r["plain"], r["adaptive"]
        lines.append(f"| {r['family']} | {r['budget']} | {p['misclassified']:.2f} / {a['misclassified']:.2f} | "
                     + " | ".join(f"{p['evaded'][f]:.2f} / **{a['evaded'][f]:.2f}**" for f in fprs)
                     + f" | {_flagged_share(p, fprs[-1]):.2f} / {_flagged_share(a, fprs[-1]):.2f} |")
    lines += ["", f"## Each score alone (its own p-value >= the FPR) on the adaptive candidates: evasion @{float(fprs[-1]):.0%}"
              f" (@{float(fprs[0]):.0%})", "",
              "| attack | budget | " + " | ".join(table["scores"]) + " |", "|---|---|" + "---|" * len(table["scores"])]
    for r in table["rows"]:
        e = r["adaptive"]["evaded_score"]
        lines.append(f"| {r['family']} | {r['budget']} | "
                     + " | ".join(f"{e[f'{s}@{fprs[-1]}']:.2f} ({e[f'{s}@{fprs[0]}']:.2f})" for s in table["scores"]) + " |")
    lines += ["", "These come from the candidates of the attack on the fused flag, not from an attack on each score "
              "alone: they say which scores the fused-flag attacker left behind (an upper bound on each score's "
              "robustness; the fused flag's members are the ones it was pushed against).", ""]
    lines += _goal(table)
    return "\n".join(lines) + "\n"


def _goal(table: dict) -> list[str]:
    """Issue 18's goal, judged on the strongest attack measured (an attacker runs the plain attacks too), and
    qualified when a sanity check fails (the adaptive attack is then weaker than it should be)."""
    fprs = [f"{f:g}" for f in table["fprs"]]
    target = f"{TARGET_FPR:g}"
    checks = table["checks"]
    caveat = "" if checks["adaptive_at_least_plain"] and checks["unbounded_full_evasion"] else \
        " (a sanity check fails: a stronger attack may do better)"
    row = next((r for r in table["rows"] if r["family"].startswith("L-inf foreground")
                and r["budget"] == f"eps={TARGET_EPS:g}"), None)
    lines = ["## Goal (issue 18)", ""]
    if row is not None and target in fprs:
        share = _flagged_share(row["adaptive"], target)
        verdict = "not measured (nothing misclassified)" if np.isnan(share) else \
            "met" if share >= TARGET_FLAGGED else "not met"
        lines.append(f"- Strongest adaptive attack, L-inf eps {TARGET_EPS:g} on the foreground: {share:.2f} of the "
                     f"misclassified inputs still flagged at {TARGET_FPR:.0%} FPR (goal >= {TARGET_FLAGGED}): "
                     f"**{verdict}**{caveat if verdict == 'met' else ''}.")
    median = table["median_cw_l2"]
    for f in fprs:
        plain, adaptive = (table["l2_at_half_evasion"][side][f] for side in ("plain", "adaptive"))
        half = min(plain, adaptive)
        verdict = "met" if half >= TARGET_L2_MULTIPLE * median else "not met"
        lines.append(f"- L2 at which the strongest attack (plain {plain:.3f}, adaptive {adaptive:.3f}) evades on half "
                     f"of the inputs at {float(f):.0%} FPR: {half:.3f} = {half / median:.2f} x the median L2 of plain "
                     f"CW-L2 ({median:.3f}); goal >= {TARGET_L2_MULTIPLE:g} x: **{verdict}**"
                     f"{caveat if verdict == 'met' else ''}.")
    return lines


def _plot(table: dict, path: Path) -> None:
    """Robust detection accuracy (1 - evasion) against the L-inf foreground eps and against the L2 budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fg = [r for r in table["rows"] if r["family"].startswith("L-inf foreground")]
    eps = [float(r["budget"].removeprefix("eps=")) for r in fg]
    median = table["median_cw_l2"]
    for f, marker in zip([f"{f:g}" for f in table["fprs"]], "os"):
        for side, style in (("plain", "--"), ("adaptive", "-")):
            axes[0].plot(eps, [1.0 - r[side]["evaded"][f] for r in fg], style, marker=marker,
                         label=f"{side}, {float(f):.0%} FPR")
            distances = np.sort(np.asarray(table["l2_distances"][side][f], dtype=float))
            grid = np.linspace(0.0, 5.0 * median, 200)
            axes[1].plot(grid / median, 1.0 - np.searchsorted(distances, grid, side="right") / len(distances), style,
                         label=f"{side}, {float(f):.0%} FPR")
    axes[1].axvline(TARGET_L2_MULTIPLE, color="k", lw=0.8, ls=":")
    for ax, xlabel in zip(axes, ("L-inf eps (digit pixels only)", "L2 budget / median L2 of plain CW-L2")):
        ax.set(xlabel=xlabel, ylabel="robust detection accuracy (correct or flagged)", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{table['model']}, 8-bit: inputs the attack does not get through")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_adaptive(table: dict, out: Path, stem: str = "adaptive", command: str = "") -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(table, indent=1) + "\n")
    text = adaptive_markdown(table, command) + f"\n![robust detection accuracy]({stem}.png)\n"
    (out / f"{stem}.md").write_text(text)
    _plot(table, out / f"{stem}.png")
    return text
