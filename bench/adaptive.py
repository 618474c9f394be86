"""Benchmark: the detector against an attacker who knows it (issue 18), LeNet-5 on MNIST, 8-bit pixels.

For each budget it measures the fraction of inputs on which an attack both misclassifies and evades the
``adversarial`` flag, at 1 % and 5 % FPR, on the **real** detector (ONNX Runtime + numba; every candidate
rounded to 8-bit pixels):

- white-box through the differentiable mirror (:mod:`detector.offline.mirror`): PGD L-inf on the digit's
  pixels only (the clean image's non-zero pixels) and on the whole image, PGD L2, each with the loss
  max(margin, -kappa) + lambda * max(T / t - 0.8, 0) for the lambdas in ``LAMBDAS`` (lambda = 0 is the plain attack that
  ignores the detector), and Orthogonal PGD (Bryniarski et al. 2022); "adaptive" is, per input, the best
  of the detector-aware attacks (every lambda > 0 and Orthogonal PGD), never the plain one;
- score-based: Square on the real detector, seeing only the probabilities and ``adversarial_score``;
- per scorer alone (its own conformal p-value >= the FPR), on the same candidates;
- L2 budgets are multiples of the median L2 of plain CW-L2 (kappa 0) on the same inputs.

Sanity checks (Tramer et al. 2020), printed with the results: the adaptive attack evades at least as often
as the plain one at every budget, and the unbounded attack (whole image, any L2) evades on every input. If
either fails, the report says the attack is broken and its figures are a lower bound only.

Inputs: the first ``--n`` correctly classified images of the evaluation split [8000, 10000); the baseline
is calibrated on [6000, 8000) with the default :class:`~detector.calibration.CalibrationConfig`
(``build/bench/adaptive-lenet5/baseline``, reused when present). Writes ``bench/results/adaptive.md``,
``adaptive.json`` and ``adaptive.png``.

Run: ``.venv/bin/python bench/adaptive.py [--n 80] [--steps 25] [--queries 1000]`` (about 40-60 minutes
with the defaults on a shared 2-core machine; run it in the background).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from common import RESULTS, ROOT, lenet5, mnist_splits, write_result  # noqa: E402  (puts ROOT on sys.path)

WORK = ROOT / "build" / "bench" / "adaptive-lenet5"
FPRS = (0.01, 0.05)
LAMBDAS = (1.0, 3.0)
LINF_FOREGROUND = (0.1, 0.2, 0.3, 0.5)
LINF_WHOLE = (0.3,)
L2_MULTIPLES = (0.5, 1.0, 2.0, 4.0)
TARGET_EPS, TARGET_FLAGGED, TARGET_L2_MULTIPLE = 0.3, 0.5, 2.0
UNBOUNDED_L2 = 28.0  # sqrt(784): any 28x28 image is within reach


def _say(msg: str) -> None:
    print(f"[adaptive {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One attack at one budget: its outcome as fractions of the inputs."""

    attack: str
    budget: str
    misclassified: float
    evaded: dict[float, float]
    evaded_scorer: dict[str, float]
    queries: int


def _row(attack: str, budget: str, outcome, queries: int = 0) -> Row:
    return Row(attack, budget, float(outcome.misclassified.mean()), {f: float(outcome.evaded[f].mean()) for f in FPRS},
               {f"{s}@{f}": float(v.mean()) for (s, f), v in outcome.evaded_scorer.items()}, queries)


def _flagged_share(row: Row, fpr: float) -> float:
    """Share of the misclassified inputs that stay flagged at ``fpr`` (NaN when nothing was misclassified)."""
    return 1.0 - row.evaded[fpr] / row.misclassified if row.misclassified else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80, help="inputs attacked")
    parser.add_argument("--steps", type=int, default=25, help="PGD steps per attack")
    parser.add_argument("--queries", type=int, default=1000, help="Square queries per input")
    parser.add_argument("--out", default="adaptive", help="stem of the result files in bench/results")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md and .png from the stem's .json")
    args = parser.parse_args(argv)
    if args.render_only:
        _render(json.loads((RESULTS / f"{args.out}.json").read_text()), args.out)
        return 0

    import torch

    torch.set_num_threads(1)
    from detector.calibration import CalibrationConfig, calibrate
    from detector.offline.adaptive import Budget, Judge, Outcome, cw_l2_attack, pgd_attack, square_attack
    from detector.offline.mirror import DetectorMirror
    from detector.pipeline import Detector

    started = time.time()
    onnx_path, _ = lenet5()
    splits = mnist_splits()
    baseline = WORK / "baseline"
    if not (baseline / "manifest.json").is_file():
        _say("calibrating the baseline")
        calibrate(onnx_path, splits["calib"], baseline, CalibrationConfig(progress=False))
    detector = Detector.load(onnx_path, baseline, intra_op_threads=1)
    mirror = DetectorMirror(detector)
    evaluation = splits["eval"]
    predicted = detector.classify(evaluation.x).predicted
    accuracy = float(np.mean(predicted == evaluation.y))
    correct = np.flatnonzero(predicted == evaluation.y)[:args.n]
    x, y = evaluation.x[correct].astype(np.float32), evaluation.y[correct]
    flag = next(rule for rule in detector.manifest.flags if rule.name == "adversarial")
    clean = detector.detect(x)
    kept = {f: float(np.mean([d.statistics[flag.name] <= Detector._threshold(flag, f) for d in clean.detections]))
            for f in FPRS}
    with torch.no_grad():
        mirrored = mirror(torch.from_numpy(x)).statistics["adversarial"].numpy()
    real = np.array([d.statistics["adversarial"] for d in clean.detections])
    fidelity = float(np.max(np.abs(mirrored - real) / np.maximum(np.abs(real), 1e-3)))
    _say(f"{len(x)} inputs, accuracy {accuracy:.4f}, mirror max relative error {fidelity:.2e}")

    rows: list[Row] = []

    def white_box(name: str, budget: Budget, label: str) -> None:
        plain = Judge(detector, y, FPRS)
        pgd_attack(mirror, plain, x, budget, lam=0.0, steps=args.steps)
        aware = []
        for lam in LAMBDAS:
            judge = Judge(detector, y, FPRS)
            aware.append(pgd_attack(mirror, judge, x, budget, lam=lam, steps=args.steps))
            rows.append(_row(f"{name} lambda={lam:g}", label, judge.outcome))
        judge = Judge(detector, y, FPRS)
        aware.append(pgd_attack(mirror, judge, x, budget, steps=args.steps, orthogonal=True))
        rows.append(_row(f"{name} orthogonal", label, judge.outcome))
        rows.extend([_row(f"{name} plain", label, plain.outcome), _row(f"{name} adaptive (best)", label, Outcome.union(aware))])
        _say(f"{name} {label}: plain {rows[-2].evaded}, adaptive {rows[-1].evaded}")

    for eps in LINF_FOREGROUND:
        white_box("PGD L-inf foreground", Budget("linf", eps, True), f"eps={eps:g}")
    for eps in LINF_WHOLE:
        white_box("PGD L-inf", Budget("linf", eps), f"eps={eps:g}")
    unbounded = Judge(detector, y, FPRS)
    for lam in LAMBDAS:  # L2 steps: a sign step lights every background pixel at once, which the topology sees
        pgd_attack(mirror, unbounded, x, Budget("l2", UNBOUNDED_L2), lam=lam, steps=3 * args.steps, step_size=0.3)
    label = f"L2 <= {UNBOUNDED_L2:g} (whole image)"
    rows.append(_row("PGD L2 adaptive from the input, unbounded", label, unbounded.outcome))
    _say(f"unbounded from the input: {rows[-1].evaded}")
    # the same attack started from a clean image of another class (not among the attacked ones)
    others = np.flatnonzero(~np.isin(np.arange(len(evaluation.y)), correct))
    start = np.stack([evaluation.x[others[np.flatnonzero(evaluation.y[others] != label_)[k]]]
                      for k, label_ in enumerate(y)]).astype(np.float32)
    pgd_attack(mirror, unbounded, x, Budget("l2", UNBOUNDED_L2), lam=LAMBDAS[-1], steps=args.steps, step_size=0.3,
               start=start)
    rows.append(_row("PGD L2 adaptive, unbounded (best of: from the input; from another class's clean image)", label,
                     unbounded.outcome))
    _say(f"unbounded: {rows[-1].evaded}")

    cw = cw_l2_attack(mirror, detector, x, y, steps=max(args.steps * 3, 100))
    median_l2 = float(np.median(cw[np.isfinite(cw)])) if np.isfinite(cw).any() else float("nan")
    _say(f"CW-L2 median L2 {median_l2:.3f} ({np.isfinite(cw).mean():.2f} succeeded)")
    for multiple in L2_MULTIPLES:
        white_box("PGD L2", Budget("l2", multiple * median_l2), f"{multiple:g} x median CW L2")

    for lam, name in ((0.0, "plain"), (1.0, "adaptive")):
        judge = Judge(detector, y, FPRS)
        square_attack(judge, x, Budget("linf", TARGET_EPS, True), lam=lam, queries=args.queries)
        rows.append(_row(f"Square foreground ({args.queries} queries) {name}", f"eps={TARGET_EPS:g}", judge.outcome,
                         judge.queries // len(x)))
        _say(f"Square {name}: {rows[-1].evaded}")

    data = {"settings": {"n": args.n, "steps": args.steps, "queries": args.queries, "lambdas": list(LAMBDAS),
                         "minutes": (time.time() - started) / 60,
                         "date": f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "machine": platform.machine()},
            "flag": {"scores": list(flag.scores), "fusion": flag.fusion}, "scorers": list(detector.score_names),
            "rows": [r.__dict__ for r in rows], "median_cw_l2": median_l2, "accuracy": accuracy,
            "clean_unflagged": kept, "mirror_max_relative_error": fidelity}
    text = json.dumps(data, indent=1)
    (RESULTS / f"{args.out}.json").write_text(text)
    _render(json.loads(text), args.out)  # from the JSON, as --render-only does
    return 0


def _render(data: dict, stem: str) -> None:
    """Write ``<stem>.md`` and ``<stem>.png`` from the measurements ``data`` (what ``<stem>.json`` holds)."""
    rows = [Row(r["attack"], r["budget"], r["misclassified"], {float(f): v for f, v in r["evaded"].items()},
                r["evaded_scorer"], r["queries"]) for r in data["rows"]]
    curves = {"linf_foreground": _curve(rows, "PGD L-inf foreground", "eps="),
              "l2": _curve(rows, "PGD L2", " x median CW L2")}
    checks = _sanity(rows)
    _plot(curves, RESULTS / f"{stem}.png")
    write_result(f"{stem}.md", _report(data, stem, rows, curves, checks))


def _curve(rows: list[Row], attack: str, unit: str) -> list[tuple[float, Row, Row]]:
    """(budget, plain row, adaptive row) of one attack family, by budget."""
    def budget(r: Row) -> float:
        return float(r.budget.replace(unit, "").strip())

    plain = {r.budget: r for r in rows if r.attack == f"{attack} plain"}
    adaptive = {r.budget: r for r in rows if r.attack == f"{attack} adaptive (best)"}
    return sorted(((budget(plain[b]), plain[b], adaptive[b]) for b in plain), key=lambda t: t[0])


def _sanity(rows: list[Row]) -> dict[str, object]:
    """Tramer et al.'s checks: adaptive >= plain at every budget, and the unbounded attack evades everywhere."""
    adaptive = {(r.attack.removesuffix(" adaptive (best)").removesuffix(" adaptive"), r.budget): r for r in rows
                if r.attack.endswith((" adaptive (best)", "queries) adaptive"))}
    weaker = [f"{r.attack} {r.budget} at FPR {f}" for r in rows if r.attack.endswith(" plain")
              for f in FPRS if adaptive[(r.attack.removesuffix(" plain"), r.budget)].evaded[f] < r.evaded[f]]
    unbounded = next(r for r in rows if r.attack.startswith("PGD L2 adaptive, unbounded"))
    return {"adaptive_at_least_plain": not weaker, "weaker_cases": weaker,
            "unbounded_full_evasion": all(unbounded.evaded[f] == 1.0 for f in FPRS)}


def _report(data: dict, stem: str, rows: list[Row], curves: dict, checks: dict) -> list[str]:
    settings, flag, kept, scorers = data["settings"], data["flag"], data["clean_unflagged"], data["scorers"]
    lines = [
        "# Adaptive attacks on the detector (issue 18): LeNet-5 on MNIST, 8-bit",
        "",
        f"Command: `.venv/bin/python bench/adaptive.py --n {settings['n']} --steps {settings['steps']} --queries "
        f"{settings['queries']}`; {settings['date']}, {settings['machine']}, {settings['minutes']:.0f} min.",
        "",
        f"- {settings['n']} correctly classified images of `mnist[8000:10000]` (model accuracy there {data['accuracy']:.4f}); "
        "baseline calibrated on `mnist[6000:8000]` (defaults; the `adversarial` flag fuses "
        f"{', '.join(flag['scores'])} with {flag['fusion']}).",
        f"- Clean accuracy kept (correct and not flagged, on these inputs): {kept['0.01']:.2f} at 1 % FPR, "
        f"{kept['0.05']:.2f} at 5 % FPR.",
        f"- Mirror fidelity: fused statistic within {data['mirror_max_relative_error']:.1e} (relative) of the real "
        "detector on these inputs.",
        f"- Every candidate is rounded to 8-bit and judged on the real detector; an input counts as evading when some "
        f"candidate is misclassified and not flagged. PGD: {settings['steps']} steps, lambda in {settings['lambdas']}, "
        f"kappa 1; median L2 of plain CW-L2 (kappa 0): {data['median_cw_l2']:.3f}.",
        "",
        "## Sanity checks (Tramer et al. 2020)",
        "",
        f"- adaptive >= plain at every budget: **{'pass' if checks['adaptive_at_least_plain'] else 'FAIL'}**"
        + ("" if checks["adaptive_at_least_plain"] else f" ({'; '.join(checks['weaker_cases'])})"),
        f"- unbounded budget (whole image, L2 <= {UNBOUNDED_L2:g}) reaches 100 % evasion: **{'pass' if checks['unbounded_full_evasion'] else 'FAIL'}**",
    ]
    if not (checks["adaptive_at_least_plain"] and checks["unbounded_full_evasion"]):
        lines.append("- **The attack is broken** by at least one check: its evasion figures are lower bounds only.")
    lines += ["", "## Evasion: misclassified and not flagged (fraction of inputs)", "",
              "| attack | budget | misclassified | evades @1% | evades @5% | still flagged among misclassified @5% |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.attack} | {r.budget} | {r.misclassified:.2f} | {r.evaded[0.01]:.2f} | {r.evaded[0.05]:.2f} | "
                     f"{_flagged_share(r, 0.05):.2f} |")
    lines += ["", "## Each scorer alone (its own p-value >= the FPR), on the same candidates: evasion @5% (@1%)", "",
              "| attack | budget | " + " | ".join(scorers) + " |", "|---|---|" + "---|" * len(scorers)]
    for r in rows:
        if r.attack.endswith(("plain", "adaptive (best)")) or "unbounded" in r.attack or r.attack.startswith("Square"):
            lines.append(f"| {r.attack} | {r.budget} | " + " | ".join(
                f"{r.evaded_scorer[f'{s}@0.05']:.2f} ({r.evaded_scorer[f'{s}@0.01']:.2f})" for s in scorers) + " |")
    lines += ["", "Per-scorer figures come from the candidates of the attack on the fused flag, not from an attack on "
              "that scorer alone: they say which scorer the fused-flag attacker left behind.", ""]
    lines += _target(curves, rows, checks)
    lines += ["", f"![robust detection accuracy]({stem}.png)", ""]
    return lines


def _target(curves: dict, rows: list[Row], checks: dict) -> list[str]:
    """The issue's goal: >= 50 % of successful examples still flagged at 5 % FPR at eps 0.3 foreground, or else
    evading half of the inputs needs >= 2x the median L2 of plain CW-L2 (a "met" is only a lower bound when the
    sanity checks fail)."""
    at_target = next(adaptive for eps, _, adaptive in curves["linf_foreground"] if abs(eps - TARGET_EPS) < 1e-9)
    flagged = _flagged_share(at_target, 0.05)
    half = [m for m, _, adaptive in curves["l2"] if adaptive.evaded[0.05] >= 0.5]
    half_1 = [m for m, _, adaptive in curves["l2"] if adaptive.evaded[0.01] >= 0.5]
    broken = not (checks["adaptive_at_least_plain"] and checks["unbounded_full_evasion"])
    lines = ["## Target (issue 18)", "",
             f"- Strongest adaptive attack, L-inf eps {TARGET_EPS} on the digit: {flagged:.2f} of the misclassified inputs "
             f"still flagged at 5 % FPR (goal >= {TARGET_FLAGGED}): **{'met' if flagged >= TARGET_FLAGGED else 'not met'}**"
             f"{' (nothing was misclassified: not measured)' if np.isnan(flagged) else ''}.",
             f"- L2: the adaptive attack first evades on half of the inputs at "
             f"{f'{half[0]:g} x' if half else f'more than {L2_MULTIPLES[-1]:g} x'} the median CW L2 (goal >= "
             f"{TARGET_L2_MULTIPLE:g} x) at 5 % FPR: **{'met' if not half or half[0] >= TARGET_L2_MULTIPLE else 'not met'}**"
             f"{' (only as far as the attack is strong: the sanity checks fail)' if broken else ''}; at 1 % FPR at "
             f"{f'{half_1[0]:g} x' if half_1 else f'more than {L2_MULTIPLES[-1]:g} x'}."]
    strongest = [r for r in rows if r.attack.endswith("adaptive (best)")]
    names = sorted({k.split("@")[0] for r in strongest for k in r.evaded_scorer})
    resist = {s: float(np.mean([r.evaded_scorer[f"{s}@0.05"] for r in strongest])) for s in names}
    order = sorted(resist, key=resist.get)
    lines.append("- Mean evasion @5% of each scorer alone over the adaptive rows (lowest = resists longest): "
                 + ", ".join(f"{s} {resist[s]:.2f}" for s in order) + ".")
    return lines


def _plot(curves: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, xlabel) in zip(axes, (("linf_foreground", "L-inf eps (digit pixels only)"),
                                        ("l2", "L2 budget / median L2 of plain CW"))):
        points = curves[key]
        budgets = [b for b, _, _ in points]
        for which, style, label in ((1, "--", "plain"), (2, "-", "adaptive")):
            for f, marker in zip(FPRS, ("o", "s")):
                ax.plot(budgets, [1.0 - p[which].evaded[f] for p in points], style, marker=marker,
                        label=f"{label}, {f:.0%} FPR")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robust detection accuracy (correct or flagged)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LeNet-5 / MNIST, 8-bit: inputs the attack does not get through")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
