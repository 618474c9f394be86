"""Offline calibration: fit every scorer on clean data, calibrate p-values and thresholds, write the baseline.

Splits of the clean data (stratified by label, seeded):

- **fit** (half): every scorer learns its clean reference;
- **reference** (a quarter): its scores are the conformal references (class-conditional where a predicted
  class has at least ``min_class_count`` of them, global otherwise);
- **threshold** (a quarter): its p-values, computed against the references, give the fused statistic of
  each flag on clean inputs; each flag's threshold is the conformal quantile for every target FPR.

Default flag rules (no attack data needed; see :class:`detector.conformal.Fusion`):

- ``adversarial``: Fisher fusion of the p-values of our three detection methods (induced persistence,
  Betti density, introspection reconstruction) and of max-softmax, the one peer that reads the output
  layer rather than the hidden features ours read, thresholded at the target FPR on clean held-out inputs.
  The membership was chosen on the digits CNN evaluation (``bench/results/quality-digits_cnn.md``):
  adding Mahalanobis and k-NN, which read the same hidden features, lowered the fused AUROC on every
  attack (e.g. CW kappa=10: 0.861 with all six peers and ours, 0.918 with this set); say so when comparing
  with detectors tuned without attack data;
- ``likely_misclassified``: Fisher fusion of the introspection error estimate and max-softmax, the two
  scores that estimate the classifier's error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from importlib import metadata
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from detector.activation_map import plot_activation_map
from detector.baseline import write_baseline
from detector.capture import Capture
from detector.conformal import ConformalCalibrator, Fusion, split_held_out
from detector.data import Dataset
from detector.errors import DataError
from detector.graph_features import InducedGraphFeatures
from detector.induced_graph import DEFAULT_MAX_EDGES, InducedGraph
from detector.introspection import IntrospectionScorer
from detector.manifest import DataInfo, FlagRule, Manifest, ModelInfo, ScorerEntry, Threshold
from detector.model import OnnxClassifier
from detector.population import PopulationMonitor
from detector.report import write_report
from detector.scorers.base import Scorer
from detector.scorers.peers import KNNScorer, MahalanobisScorer, MaxSoftmaxScorer, NonzeroPixelsScorer
from detector.scorers.topology import BettiDensityScorer, InducedPersistenceScorer

__all__ = ["ADVERSARIAL_SCORES", "CalibrationConfig", "calibrate", "MISCLASSIFICATION_SCORES"]

#: Scores the ``adversarial`` flag fuses (see the module docstring for why these).
ADVERSARIAL_SCORES = ("induced_persistence", "betti_density", "introspection_reconstruction", "max_softmax")
#: Scores that estimate the classifier's own error (the ``likely_misclassified`` flag fuses these).
MISCLASSIFICATION_SCORES = ("introspection_error", "max_softmax")
_PACKAGES = ("advdetect", "numpy", "scipy", "numba", "onnx", "onnxruntime", "ripser", "scikit-learn", "torch")


class CalibrationConfig(BaseModel):
    """Settings of one calibration run (validated; unknown fields are refused).

    Attributes
    ----------
    layers : list of str or None
        Captured layers (default: every post-activation hidden layer).
    fprs : tuple of float in (0, 1)
        Target false-positive rates; the first is each flag's default.
    seed : int
        Seed of the splits and of every trained model: the same seed gives the same artifact.
    fit_fraction : float in (0, 1)
        Share of the clean data the scorers are fitted on; the rest is split in half (references, thresholds).
    min_class_count : int
        Class-conditional conformal references need this many per predicted class.
    top_q : float in (0, 1]
        Induced-graph edges kept per layer pair (1 = exact).
    max_edges : int
        Edge budget of the induced graph: the last stages of the network that fit it (the whole graph when
        it fits, as for LeNet-5; see :mod:`detector.induced_graph`).
    latent_dim : int
        Introspection VAE latent size used for scoring (8: measured better than 2 on digits; the report's
        activation-space map gets a 2-D model of its own when this is not 2).
    introspection_hidden : tuple of int
        Widths of the introspection encoder/decoder and estimator layers.
    window_size : int
        Population monitor window (the service's rolling window keeps at least this many inputs).
    progress : bool
        Show progress bars.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[str] | None = None
    fprs: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field((0.01, 0.05), min_length=1)
    seed: int = 0
    fit_fraction: float = Field(0.5, gt=0, lt=1)
    min_class_count: int = Field(50, ge=1)
    top_q: float = Field(1.0, gt=0, le=1)
    max_edges: int = Field(DEFAULT_MAX_EDGES, ge=1)
    latent_dim: int = Field(8, ge=1)
    introspection_hidden: tuple[int, ...] = (128, 128)
    window_size: int = Field(128, ge=8)
    progress: bool = True


def _data_hash(data: Dataset) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(data.x).tobytes())
    digest.update(np.ascontiguousarray(data.y).tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_scorers(model: OnnxClassifier, config: CalibrationConfig) -> list[Scorer]:
    """The scorers calibrated by default, in the order they run."""
    hidden = list(config.layers or model.default_capture())
    features = InducedGraphFeatures(InducedGraph.from_classifier(model, max_edges=config.max_edges), top_q=config.top_q)
    return [
        InducedPersistenceScorer(features),
        BettiDensityScorer(features),
        IntrospectionScorer(latent_dim=config.latent_dim, hidden=config.introspection_hidden,
                            estimator_hidden=config.introspection_hidden, layers=hidden, seed=config.seed),
        MaxSoftmaxScorer(),
        MahalanobisScorer(layer=hidden[-1]),
        KNNScorer(layer=hidden[-1]),
        NonzeroPixelsScorer(),
    ]


def calibrate(model_path: str | os.PathLike[str], data: Dataset, out: str | os.PathLike[str],
              config: CalibrationConfig = CalibrationConfig()) -> Manifest:
    """Calibrate a baseline for the classifier at ``model_path`` on clean ``data`` and write it to ``out``.

    Returns the manifest written. Raises :class:`~detector.errors.ModelError` or
    :class:`~detector.errors.DataError` for an unusable model or data (a message says which).
    """
    model = OnnxClassifier(model_path, capture=config.layers)
    hidden = list(model.capture)
    model.validate(data.x[:1])
    if data.y.max() >= model.n_classes or data.y.min() < 0:
        raise DataError(f"labels must lie in [0, {model.n_classes}) for this {model.n_classes}-class model, "
                        f"got [{data.y.min()}, {data.y.max()}]")
    fit_idx, held_idx = split_held_out(data.y, fraction=config.fit_fraction, seed=config.seed)
    needed = max(int(np.ceil((1 - min(config.fprs)) / min(config.fprs))), config.window_size)
    if len(held_idx) // 2 < needed:
        raise DataError(
            f"{len(data)} clean inputs are too few: thresholds at FPR {min(config.fprs)} need >= {needed} held-out "
            f"threshold inputs, i.e. about {int(np.ceil(needed * 2 / (1 - config.fit_fraction)))} inputs in all"
        )
    scorers = build_scorers(model, config)
    extra = [t for s in scorers for t in s.required_tensors()]
    model.set_capture(list(dict.fromkeys(hidden + extra)))
    steps = tqdm(total=6 + len(scorers), desc="calibrate", disable=not config.progress, unit="step")

    steps.set_postfix_str("capturing activations")
    capture = model.run_batches(data.x)
    steps.update()
    fit, held = capture.subset(fit_idx), capture.subset(held_idx)
    for scorer in scorers:
        steps.set_postfix_str(f"fitting {scorer.kind}")
        scorer.fit(fit, data.y[fit_idx])
        steps.update()

    steps.set_postfix_str("scoring held-out data")
    ref_rows, thr_rows = split_held_out(held.predicted, fraction=0.5, seed=config.seed)
    held_scores = {}
    for scorer in scorers:
        held_scores.update(scorer.scores(held))
    steps.update()

    steps.set_postfix_str("conformal p-values and thresholds")
    classes = held.predicted
    calibrators = {
        name: ConformalCalibrator(config.min_class_count).fit(s[ref_rows], classes[ref_rows], model.n_classes)
        for name, s in held_scores.items()
    }
    p_thr = {name: calibrators[name].p_values(s[thr_rows], classes[thr_rows]) for name, s in held_scores.items()}
    rules = []
    for name, members in (("adversarial", list(ADVERSARIAL_SCORES)), ("likely_misclassified", list(MISCLASSIFICATION_SCORES))):
        fused = Fusion("fisher").combine(np.stack([p_thr[n] for n in members], axis=1))
        thresholds = []
        for fpr in config.fprs:
            value = Fusion.fit_threshold(fused, fpr)
            thresholds.append(Threshold(target_fpr=fpr, value=value, heldout_fpr=float(np.mean(fused > value))))
        rules.append(FlagRule(name=name, scores=members, fusion="fisher", thresholds=thresholds,
                              default_fpr=config.fprs[0]))
    steps.update()

    steps.set_postfix_str("population Betti curves of clean windows")
    population = PopulationMonitor(window_size=config.window_size, seed=config.seed).fit(
        {k: v for k, v in capture.activations.items() if k in hidden})
    steps.update()

    steps.set_postfix_str("writing the baseline")
    arrays: dict[str, np.ndarray] = {}
    entries, introspection_onnx = [], None
    for scorer in scorers:
        params, state = scorer.get_state()
        if scorer.kind == "introspection":
            introspection_onnx = state.pop("onnx_model").tobytes()
        arrays.update({f"scorer/{scorer.kind}/{k}": v for k, v in state.items()})
        entries.append(ScorerEntry(kind=scorer.kind, params=params, score_names=list(scorer.score_names)))
    for name, cal in calibrators.items():
        arrays.update(cal.get_state(f"conformal/{name}/"))
    pop_params, pop_arrays = population.get_state()
    arrays.update({f"population/{k}": v for k, v in pop_arrays.items()})
    accuracy = float(np.mean(capture.predicted == data.y))  # on the whole clean calibration data
    manifest = Manifest(
        tool_version=_versions().get("advdetect", "0"),
        created_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        model=ModelInfo(file_name=Path(model_path).name, sha256=model.sha256, input_name=model.input_name,
                        input_shape=list(model.input_shape), n_classes=model.n_classes, captured_layers=hidden),
        data=DataInfo(spec=data.name, sha256=_data_hash(data), n_samples=len(data), n_fit=len(fit_idx),
                      n_reference=len(ref_rows), n_threshold=len(thr_rows), seed=config.seed),
        scorers=entries,
        conformal_min_class_count=config.min_class_count,
        flags=rules,
        population=pop_params,
        heldout_metrics={"accuracy": accuracy,
                         **{f"{r.name}_fpr@{t.target_fpr}": t.heldout_fpr for r in rules for t in r.thresholds}},
        package_versions=_versions(),
    )
    write_baseline(out, manifest, arrays, introspection_onnx)
    steps.set_postfix_str("writing the report")
    fit_scores: dict[str, np.ndarray] = {}
    for scorer in scorers:
        fit_scores.update(scorer.scores(fit))
    thr_stats = {r.name: Fusion(r.fusion).combine(np.stack([p_thr[n] for n in r.scores], axis=1)) for r in rules}
    write_report(Path(out), manifest, fit_scores, {k: v[thr_rows] for k, v in held_scores.items()}, thr_stats,
                 population.reference_mean_, _map_writer(scorers, config, hidden, fit, data.y[fit_idx], held,
                                                         data.y[held_idx]))
    steps.update()
    steps.close()
    return manifest


def _map_writer(scorers: list[Scorer], config: CalibrationConfig, hidden: list[str], fit: Capture,
                fit_labels: np.ndarray, held: Capture, held_labels: np.ndarray) -> Callable[[Path], None]:
    """Draws the activation-space map of the held-out inputs with a 2-D introspection model.

    The scoring model is reused when its latent space is 2-D; otherwise a 2-D one is fitted for the figure.
    """
    scorer = next(s for s in scorers if isinstance(s, IntrospectionScorer))
    if scorer.latent_dim != 2:
        scorer = IntrospectionScorer(latent_dim=2, hidden=config.introspection_hidden,
                                     estimator_hidden=config.introspection_hidden, layers=hidden,
                                     seed=config.seed).fit(fit, fit_labels)
    return lambda path: plot_activation_map(scorer.transform(held), held_labels, held.predicted, scorer, path)

