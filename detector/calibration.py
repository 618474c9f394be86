"""Offline calibration: fit every scorer on clean data, calibrate p-values and thresholds, write the baseline.

Splits of the clean data (stratified by label, seeded):

- **fit** (half, at most ``max_fit_per_class`` inputs per class on average; :func:`fit_split`): every
  scorer learns its clean reference, and the population monitor its clean windows;
- **held-out** (the rest): their scores are the conformal references (class-conditional where a predicted
  class has at least ``min_class_count`` of them, global otherwise; always global for
  :data:`GLOBAL_P_VALUES`). Three quarters of them set the thresholds (all but the quarter whose clean
  statistics the fusion choice read, below): each input's p-values come from calibrators fitted on the other
  ``threshold_folds`` - 1 folds of the held-out inputs (:func:`~detector.conformal.cross_fitted_p_values`),
  giving the fused statistic of each flag on clean inputs; each flag's threshold is, for every target FPR,
  the conformal quantile of the statistic over the threshold inputs the model classifies correctly.
  Cross-fitting replaced a split into reference and threshold halves, whose 1 % quantile rested on ~7 of ~730
  statistics (LeNet-5: 9.8, against a 99th percentile of 4.9 on 1,932 clean test digits, so the flag caught
  6 % of 8-bit foreground PGD). The target FPR is the rate on clean inputs the model gets right, the
  negatives of every evaluation: the model's own errors are what ``likely_misclassified`` looks for, and they
  are the most unusual clean inputs, so a quantile over all clean inputs lands among them (LeNet-5, 17 errors
  among 750 threshold inputs: the 1 % threshold of ``adversarial`` was 12.7 over all of them, 9.8 over the
  733 correct ones). The manifest's ``heldout_metrics`` also give each flag's rate on all threshold inputs,
  errors included (``<flag>_flag_rate_all_clean@<fpr>``): what clean traffic sees.

Flag rules, each chosen on calibration data only (:func:`detector.fusion_choice.choose_fusion`; the
manifest's ``selection`` records the choice and why), on :func:`choice_quarters`: a stratified, seeded half
of the held-out inputs cut in two quarters; conformal calibrators fitted on the first quarter give the
p-values of the second quarter's clean inputs, of its natural misclassifications and of the attacks made
from it. That second quarter sets no threshold: a choice favours the candidate whose clean statistics on it
happen to be low, and a threshold over them comes out low (MNIST-32 ResNet-18, 1,500 held-out inputs: the
5 % threshold of the chosen Fisher over the Mahalanobis score was 2.50 over all of them, 2.60 without that
quarter, 2.70 the 95th percentile of 1,903 clean test inputs; 7.0 % of those flagged against 6.1 %).

- ``adversarial``: among Fisher and minimum-p (Tippett) fusions of up to three of :data:`ADVERSARIAL_CANDIDATES`
  and a weighted Fisher over all of them (logistic-regression weights), the one with the best mean AUROC
  (:data:`TUNING_CRITERION`) over the attacks calibration makes itself (``tuning_attacks``: FGSM over the
  whole image and over the digit only), against the clean inputs. Tuning on minimum-perturbation attacks as
  well (DeepFool, the smallest foreground FGSM step that flips the class) with the ``"worst"`` criterion of
  :func:`~detector.fusion_choice.choose_fusion` brings in members that see CW kappa=0, but was measured to
  cost the high-confidence attacks most of their flags at 1 % FPR (issue 17), so it is not the default.
  Fisher over every score was measured to dilute a
  strong member with weak ones (issue 17), hence a choice. A candidate needing fewer squeezed copies of the
  input (feature squeezing's, each a model pass) whose mean AUROC is within one standard error of the best is
  preferred (``costs`` of ``choose_fusion``). Evaluations report the other attacks. With
  ``tuning_attacks=()`` the rule is Fisher over :data:`ADVERSARIAL_SCORES` (no attack data). Patch PCA is
  then OR-ed with the chosen fusion as a screen (``adversarial_screen``, a fixed share of the FPR), not chosen;
- ``likely_misclassified``: the same choice among fusions of up to two of
  :data:`MISCLASSIFICATION_CANDIDATES`, with the natural misclassifications as positives. Errors are rare
  (2-3 % of inputs), so the choice half's two quarters are cross-fitted: each quarter's p-values come from
  conformal calibrators fitted on the other quarter, and every input of the choice half counts. With fewer than
  :data:`MIN_ERRORS` errors the rule is Fisher over :data:`MISCLASSIFICATION_SCORES`. Max-softmax alone is a
  candidate, so a chosen statistic is never below it on that held-out data.

Thresholds are then calibrated on the cross-fitted statistics of the clean held-out inputs for every target FPR.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from detector.activation_map import plot_activation_map
from detector.baseline import write_baseline
from detector.capture import Capture
from detector.conformal import ConformalCalibrator, Fusion, cross_fitted_p_values, split_held_out
from detector.data import Dataset, Rows
from detector.errors import DataError
from detector.fusion_choice import FusionChoice, choose_fusion
from detector.topology.graph_features import InducedGraphFeatures
from detector.topology.induced_graph import DEFAULT_MAX_EDGES, InducedGraph
from detector.introspection import IntrospectionScorer
from detector.manifest import DataInfo, FlagRule, Manifest, ModelInfo, ScorerEntry, Threshold
from detector.model import OnnxClassifier
from detector.topology.population import PopulationMonitor
from detector.report import write_report
from detector.scorers.base import Scorer
from detector.scorers.layerwise import LayerwiseKNNScorer, LayerwiseMahalanobisScorer
from detector.scorers.output import EnergyScorer, FeatureSqueezingScorer
from detector.scorers.peers import KNNScorer, MahalanobisScorer, MaxSoftmaxScorer, NonzeroPixelsScorer
from detector.scorers.pixels import PatchPCAScorer
from detector.scorers.topology import BettiDensityScorer, InducedPersistenceScorer
from detector.scorers.trust import TrustScoreScorer
from detector.squeeze import default_squeezers
from detector.stream import reduced_capture, reduced_chunks, release_freed_memory, score_in_chunks

__all__ = ["ADVERSARIAL_CANDIDATES", "ADVERSARIAL_SCORES", "CalibrationConfig", "calibrate", "fit_split",
           "GLOBAL_P_VALUES", "layer_readers", "MISCLASSIFICATION_CANDIDATES", "MISCLASSIFICATION_SCORES",
           "MIN_ERRORS", "TUNING_CRITERION"]

#: The ``adversarial`` flag's members without tuning attacks (``tuning_attacks=()``).
ADVERSARIAL_SCORES = ("induced_persistence", "betti_density", "introspection_reconstruction", "max_softmax")
#: Scores the ``adversarial`` flag may fuse (every score but the non-zero-pixel sanity row and patch PCA).
#: Patch PCA is the flag's screen (``CalibrationConfig.adversarial_screen``), not a candidate: in LeNet-5's
#: Fisher fusion it lifted 8-bit CW kappa=10 from 0.849 to 0.990 AUROC, but against the adaptive attacker (eps
#: 0.3 on the digit) the share of misclassified inputs still flagged at 5 % FPR fell from 0.53 to 0.22
#: (`bench/results/adaptive-lenet5-patch-pca.md`); patch PCA alone let 85 % of those inputs through: the
#: attacker keeps the patch statistics clean at no cost, and inside a Fisher sum that dilutes the rest.
ADVERSARIAL_CANDIDATES = ("induced_persistence", "betti_density", "introspection_reconstruction",
                          "introspection_error", "max_softmax", "energy", "mahalanobis", "knn", "feature_squeezing",
                          "layerwise_knn", "layerwise_mahalanobis")
#: The ``likely_misclassified`` flag's members without enough held-out errors to choose: max-softmax and the
#: trust score (Jiang et al. 2018), the pair LeNet-5's calibration chose on its 13 reference-split errors
#: (AUROC 0.993 against 0.979 for max-softmax alone).
MISCLASSIFICATION_SCORES = ("max_softmax", "trust_score")
#: Scores the ``likely_misclassified`` flag may fuse.
MISCLASSIFICATION_CANDIDATES = ("max_softmax", "introspection_error", "energy", "mahalanobis", "knn",
                                "feature_squeezing", "layerwise_knn", "layerwise_mahalanobis", "trust_score")
#: Scores whose p-values rank them against the global references, never per predicted class: the trust
#: score already compares an input with its predicted class and the nearest other, so Mondrian conditioning
#: on the predicted class only re-ranks classes against each other. It lowered the trust score's AUROC on
#: 10 of 11 rows of LeNet-5's and of MobileNetV2-32's quality tables (natural misclassifications: 0.953 ->
#: 0.925 and 0.967 -> 0.952). The flags' thresholds are quantiles over all classes anyway (marginal FPR).
GLOBAL_P_VALUES = ("trust_score",)
#: A threshold at FPR a over n clean statistics has about n a of them above it: with fewer than this many,
#: ``calibrate`` warns that the threshold rests on a few clean outliers and will move with the data (the digits
#: CNN, ~196 correct threshold inputs: its 1 % threshold is their largest statistic).
MIN_TAIL_INPUTS = 5
#: Fewest natural misclassifications (in the choice half) to choose the ``likely_misclassified`` fusion.
MIN_ERRORS = 5
#: How the ``adversarial`` choice ranks candidates over the tuning attacks (:data:`detector.fusion_choice.CRITERIA`).
#: ``"mean"``: tuned on DeepFool and minimal foreground FGSM as well with ``"worst"``, the digits CNN's flag fell
#: from 80 % to 10 % of FGSM at 1 % FPR (CW kappa=0's AUROC rose from 0.881 to 0.967), so that stays opt-in.
TUNING_CRITERION = "mean"
_PACKAGES = ("advdetect", "numpy", "scipy", "numba", "onnx", "onnxruntime", "ripser", "scikit-learn", "torch")


class CalibrationConfig(BaseModel):
    """Settings of one calibration run (validated; unknown fields are refused).

    Attributes
    ----------
    layers : list of str or None
        Capture keys the peers, the introspection VAE and the population monitor read (tensor names, or
        ``mean(<tensor>)`` for channel means computed in the graph); default:
        :meth:`OnnxClassifier.default_capture <detector.model.OnnxClassifier.default_capture>`.
    fprs : tuple of float in (0, 1)
        Target false-positive rates; the first is each flag's default.
    seed : int
        Seed of the splits and of every trained model: the same seed gives the same artifact.
    fit_fraction : float in (0, 1)
        Share of the clean data the scorers are fitted on; the rest is split in half (references, thresholds).
    max_fit_per_class : int
        The fit split holds at most ``max_fit_per_class`` inputs per class present in the data, on average
        (:func:`fit_split`); the inputs beyond join the held-out data. What the scorers keep (their k-NN
        references, the VAE's training set) is thus bounded by the number of classes, not the number of
        inputs, and so is calibration's peak memory: the held-out inputs are captured and scored a chunk at
        a time. 50 (500 for ten classes): calibrating on 1,000 inputs already reaches it, and LeNet-5 on 2,000
        MNIST inputs detected as well with 500 fit inputs as with 1,000 (the held-out half grows to 1,500,
        so the conformal references and thresholds get more inputs; ``bench/quality.py lenet5``).
    min_class_count : int
        Class-conditional conformal references need this many per predicted class.
    top_q : float in (0, 1]
        Induced-graph edges kept per layer pair (1 = exact).
    max_edges : int
        Edge budget of the induced graph: the last stages of the network that fit it (the whole graph when
        it fits, as for LeNet-5; see :mod:`detector.topology.induced_graph`).
    latent_dim : int
        Introspection VAE latent size used for scoring (8: measured better than 2 on digits; the report's
        activation-space map gets a 2-D model of its own when this is not 2).
    introspection_hidden : tuple of int
        Widths of the introspection encoder/decoder and estimator layers.
    window_size : int
        Population monitor window (the service's rolling window keeps at least this many inputs).
    tuning_attacks : tuple of str
        Attacks (:data:`detector.offline.attacks.ATTACK_DEFAULTS`) made on the choice half of the held-out inputs to choose the
        ``adversarial`` fusion (default: FGSM and foreground FGSM; ``deepfool`` and ``fgsm_minimal_foreground``
        add minimum-perturbation examples); empty: Fisher over :data:`ADVERSARIAL_SCORES`, no attack data.
    max_squeezed_copies : int >= 0 or None
        The most squeezed copies of an input a flag's members may run through the model, each a full model
        pass in the same ONNX Runtime call (feature squeezing needs 2: they add 1.8-2.1x the model's own time on
        the MNIST-32 models). 0 keeps the served path to one model pass, for a latency budget below that; None
        (default): no budget, and a costlier fusion must beat a cheaper one by a standard error.
    threshold_folds : int >= 2
        Folds of the cross-fitted p-values the thresholds are set on (module docstring): more folds bring the
        out-of-fold references closer to the served ones (n (K - 1) / K of n) at K calibrator fits per score.
    adversarial_screen : str or None
        A score OR-ed with the ``adversarial`` flag's fusion rather than fused into it (:class:`FlagRule`'s
        ``screen``), when the detector gives it and the choice did not make it a member; None: no screen.
        Default: patch PCA, the pixel statistic that sees what the feature scores miss (8-bit CW kappa=10), kept
        out of the Fisher sum, where an adaptive attacker who keeps it clean at no cost diluted the rest.
    screen_share : float in (0, 1)
        The share of the false-positive rate the screen spends (weighted Bonferroni). An adaptive attacker keeps
        the screen clean at no cost, and the fusion is then held to about 1 - share of the target rate: at 0.2,
        LeNet-5's adaptive evasion at eps 0.3 and 5 % FPR rose from 40 % to 49 %. The screen fires on p-values
        near their floor, so a small share keeps most of what it sees (LeNet-5's CW kappa=10: 0.986 AUROC at 0.2,
        0.979 at 0.05).
    progress : bool
        Show progress bars.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: list[str] | None = None
    fprs: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field((0.01, 0.05), min_length=1)
    seed: int = 0
    fit_fraction: float = Field(0.5, gt=0, lt=1)
    max_fit_per_class: int = Field(50, ge=1)
    min_class_count: int = Field(50, ge=1)
    top_q: float = Field(1.0, gt=0, le=1)
    max_edges: int = Field(DEFAULT_MAX_EDGES, ge=1)
    latent_dim: int = Field(8, ge=1)
    introspection_hidden: tuple[int, ...] = (128, 128)
    window_size: int = Field(128, ge=8)
    tuning_attacks: tuple[str, ...] = ("fgsm", "fgsm_foreground")
    max_squeezed_copies: int | None = Field(None, ge=0)
    adversarial_screen: str | None = "patch_pca"
    threshold_folds: int = Field(10, ge=2)
    screen_share: float = Field(0.05, gt=0, lt=1)
    progress: bool = True


def _data_hash(data: Dataset, batch_size: int = 16) -> str:
    """SHA-256 of the images' float32 bytes then the labels' (read batch by batch: 16 images of 3x224x224
    are 9.6 MB of float32; the digest does not depend on the batch size)."""
    digest = hashlib.sha256()
    for start in range(0, len(data), batch_size):
        digest.update(np.ascontiguousarray(data.x[start:start + batch_size], dtype=np.float32).tobytes())
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


def fit_split(labels: np.ndarray, config: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rows the scorers fit on and the held-out rows, sorted and disjoint, covering every input.

    A stratified, seeded ``fit_fraction`` of ``labels`` (:func:`~detector.conformal.split_held_out`); when that
    is more than ``max_fit_per_class`` inputs per class present in ``labels``, a stratified, seeded subsample of
    that size (up to rounding per class) is kept and the rest of it joins the held-out rows. The classes
    present count, not the model's: a 1,000-class model calibrated on ten classes keeps at most 1,000.
    """
    fit_idx, held_idx = split_held_out(labels, fraction=config.fit_fraction, seed=config.seed)
    cap = config.max_fit_per_class * len(np.unique(labels))
    if len(fit_idx) > cap:
        keep, rest = split_held_out(labels[fit_idx], fraction=cap / len(fit_idx), seed=config.seed)
        fit_idx, held_idx = fit_idx[keep], np.sort(np.r_[held_idx, fit_idx[rest]])
    return fit_idx, held_idx


def build_scorers(model: OnnxClassifier, config: CalibrationConfig, squeezers: list[str]) -> list[Scorer]:
    """The scorers calibrated by default, in the order they run (``squeezers``: feature squeezing's); the
    patch peer only for image inputs (C, H, W) of at least 4x4 pixels."""
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
        EnergyScorer(),
        FeatureSqueezingScorer(squeezers),
        LayerwiseKNNScorer(layers=hidden, seed=config.seed),
        LayerwiseMahalanobisScorer(layers=hidden, seed=config.seed),
        TrustScoreScorer(layer=hidden[-1]),
        *([PatchPCAScorer()] if len(model.input_shape) == 3 and min(model.input_shape[1:]) >= 4 else []),
    ]


def layer_readers(scorers: list[Scorer], population_layers: list[str]) -> dict[str, list[str]]:
    """Who reads each capture key: the scorer kinds (the two topology scorers as ``topology``), and
    ``population`` for the population monitor's layers. Keys in capture order of first reader."""
    readers: dict[str, list[str]] = {}
    for scorer in scorers:
        name = "topology" if isinstance(scorer, (InducedPersistenceScorer, BettiDensityScorer)) else scorer.kind
        for key in scorer.required_tensors():
            if name not in readers.setdefault(key, []):
                readers[key].append(name)
    for key in population_layers:
        readers.setdefault(key, []).append("population")
    return readers


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
    fit_idx, held_idx = fit_split(data.y, config)
    least = int(np.ceil((1 - min(config.fprs)) / min(config.fprs)))  # inputs a conformal quantile at that FPR needs
    needed = max(least, config.window_size)
    if len(held_idx) < needed:
        raise DataError(
            f"{len(data)} clean inputs are too few: thresholds at FPR {min(config.fprs)} need >= {needed} held-out "
            f"inputs, i.e. about {int(np.ceil(needed / (1 - config.fit_fraction)))} inputs in all"
        )
    if len(fit_idx) < config.window_size:
        raise DataError(f"the fit split holds {len(fit_idx)} inputs, fewer than one population window of "
                        f"{config.window_size}: raise max_fit_per_class (now {config.max_fit_per_class})")
    scorers = build_scorers(model, config, default_squeezers(model, Rows(data.x, fit_idx), data.y[fit_idx]))
    extra = [t for s in scorers for t in s.required_tensors()]
    model.set_capture(list(dict.fromkeys(hidden + extra)))
    steps = tqdm(total=6 + len(scorers), desc="calibrate", disable=not config.progress, unit="step")

    def begin(step: str) -> None:
        """Start a step: give the heap the last step freed back to the OS (ResNet-50, 1,000 inputs: 0.17 GiB
        less resident when held-out scoring begins), then show the step."""
        release_freed_memory()
        steps.set_postfix_str(step)

    begin("capturing activations")
    # batch by batch, keeping per input only what the scorers and the population monitor read
    fit = reduced_capture(model, Rows(data.x, fit_idx), scorers, keep=hidden)
    steps.update()
    begin("population Betti curves of clean windows")
    population = PopulationMonitor(window_size=config.window_size, seed=config.seed).fit(
        {k: v for k, v in fit.activations.items() if k in hidden})
    steps.update()
    for scorer in scorers:
        begin(f"fitting {scorer.kind}")
        scorer.fit(fit, data.y[fit_idx])
        steps.update()

    begin("scoring held-out data")
    fit_scores, fit_predicted = score_in_chunks(scorers, fit), fit.predicted
    map_model = _map_model(scorers, config, hidden, fit, data.y[fit_idx])
    del fit
    held_parts = [(score_in_chunks(scorers, chunk), chunk.predicted, map_model.transform(chunk))
                  for chunk in reduced_chunks(model, Rows(data.x, held_idx), scorers)]
    held_scores = {name: np.concatenate([scores[name] for scores, _, _ in held_parts]) for name in fit_scores}
    classes = np.concatenate([predicted for _, predicted, _ in held_parts])
    points = np.concatenate([z for _, _, z in held_parts])
    del held_parts  # from here on, memory holds the fitted scorers and the scores, not the captures
    accuracy = float(np.mean(np.r_[fit_predicted == data.y[fit_idx], classes == data.y[held_idx]]))
    quarters = choice_quarters(classes, config.seed)
    # thresholds: on the correctly classified inputs, not on the quarter whose clean statistics the choice read
    thr_rows = np.setdiff1d(np.arange(len(classes)), quarters[1])
    right = classes[thr_rows] == data.y[held_idx][thr_rows]
    if right.sum() < least:
        raise DataError(f"the model classifies {right.sum()} of the {len(thr_rows)} threshold inputs correctly; "
                        f"thresholds at FPR {min(config.fprs)} need >= {least}: calibrate on more clean inputs")
    steps.update()

    begin("conformal p-values and thresholds")
    for fpr in (f for f in config.fprs if right.sum() * f < MIN_TAIL_INPUTS):
        warnings.warn(f"thresholds at FPR {fpr} rest on the top {math.ceil(right.sum() * fpr)} of {right.sum()} clean "
                      f"held-out statistics and will move with the calibration data; for about {MIN_TAIL_INPUTS} "
                      f"above them, calibrate on about {math.ceil(MIN_TAIL_INPUTS / fpr * len(data) / right.sum())} "
                      "inputs", stacklevel=2)
    calibrators = {name: _calibrator(name, config).fit(s, classes, model.n_classes) for name, s in held_scores.items()}
    drafts = [FlagRule(name=name, thresholds=[], default_fpr=config.fprs[0], **choice)
              for name, choice in _choose_rules(model_path, model, scorers, held_scores, Rows(data.x, held_idx),
                                                data.y[held_idx], classes, quarters, config).items()]
    members = {n for rule in drafts for n in rule.members}  # the thresholds read only the flags' members
    p_held = cross_fitted_p_values({n: s for n, s in held_scores.items() if n in members}, classes, model.n_classes,
                                   lambda name: _calibrator(name, config), folds=config.threshold_folds, seed=config.seed)
    rules, thr_stats, rates_all = [], {}, {}
    for rule in drafts:
        fused = thr_stats[rule.name] = rule.fusion_op().combine(np.stack([p_held[n][thr_rows] for n in rule.members], axis=1))
        thresholds = []
        fused_right = fused[right]
        for fpr in config.fprs:
            value = Fusion.fit_threshold(fused_right, fpr)
            thresholds.append(Threshold(target_fpr=fpr, value=value, heldout_fpr=float(np.mean(fused_right > value))))
            rates_all[f"{rule.name}_flag_rate_all_clean@{fpr}"] = float(np.mean(fused > value))
        rules.append(rule.model_copy(update={"thresholds": thresholds}))
    steps.update()

    begin("writing the baseline")
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
    manifest = Manifest(
        tool_version=_versions().get("advdetect", "0"),
        created_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        model=ModelInfo(file_name=Path(model_path).name, sha256=model.sha256, input_name=model.input_name,
                        input_shape=list(model.input_shape), n_classes=model.n_classes, captured_layers=hidden),
        data=DataInfo(spec=data.name, sha256=_data_hash(data), n_samples=len(data), n_fit=len(fit_idx),
                      n_reference=len(held_idx), n_threshold=len(thr_rows), seed=config.seed,
                      threshold_folds=config.threshold_folds,
                      preprocessing=data.preprocessing),
        scorers=entries,
        conformal_min_class_count=config.min_class_count,
        flags=rules,
        population=pop_params,
        heldout_metrics={"accuracy": accuracy,
                         **{f"{r.name}_fpr@{t.target_fpr}": t.heldout_fpr for r in rules for t in r.thresholds},
                         **rates_all},
        package_versions=_versions(),
    )
    write_baseline(out, manifest, arrays, introspection_onnx)
    begin("writing the report")
    write_report(Path(out), manifest, fit_scores, {k: v[thr_rows] for k, v in held_scores.items()}, thr_stats,
                 population.reference_mean_,
                 lambda path: plot_activation_map(points, data.y[held_idx], classes, map_model, path),
                 [(key, model.capture_shape(key), who) for key, who in layer_readers(scorers, hidden).items()])
    steps.update()
    steps.close()
    return manifest


def _calibrator(name: str, config: CalibrationConfig) -> ConformalCalibrator:
    """The conformal calibrator of score ``name``: class-conditional where a predicted class has
    ``min_class_count`` references, global for :data:`GLOBAL_P_VALUES`."""
    return ConformalCalibrator(config.min_class_count, by_class=name not in GLOBAL_P_VALUES)


def choice_quarters(classes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out rows the fusion choice reads (module docstring): a stratified, seeded half of the held-out
    inputs (by ``classes``, their predicted classes), cut in two quarters: the first gives the choice's conformal
    references, the second its clean inputs and the attacks made from them. Sorted row indices."""
    half = split_held_out(classes, fraction=0.5, seed=seed)[0]
    fit, tune = split_held_out(classes[half], fraction=0.5, seed=seed)
    return half[fit], half[tune]


def _choose_rules(model_path: str | os.PathLike[str], model: OnnxClassifier, scorers: list[Scorer],
                  held_scores: dict[str, np.ndarray], x_held: Rows, y_held: np.ndarray, predicted: np.ndarray,
                  quarters: tuple[np.ndarray, np.ndarray], config: CalibrationConfig) -> dict[str, dict]:
    """Each flag's members, fusion, weights and the reason, chosen on the :func:`choice_quarters` of the held-out
    inputs (module docstring).

    ``held_scores`` are the held-out inputs' scores, ``x_held``/``y_held`` their pixels (read only when attacked)
    and labels, ``predicted`` the model's classes for them.
    """
    fit_half, tune_half = quarters

    def cross(train: np.ndarray, test: np.ndarray) -> tuple[dict[str, ConformalCalibrator], dict[str, np.ndarray]]:
        """Calibrators fitted on the ``train`` rows and the p-values they give the ``test`` rows."""
        cals = {name: _calibrator(name, config).fit(s[train], predicted[train], model.n_classes)
                for name, s in held_scores.items()}
        return cals, {name: cals[name].p_values(s[test], predicted[test]) for name, s in held_scores.items()}

    calibrators, p_tune = cross(fit_half, tune_half)
    x, y = x_held.select(tune_half), y_held[tune_half]
    right = predicted[tune_half] == y
    clean = {n: p[right] for n, p in p_tune.items()}
    rules = {"adversarial": {"scores": list(ADVERSARIAL_SCORES), "fusion": "fisher", "weights": None,
                             "selection": "default members (no tuning attacks)"}}
    tuned = {}
    if config.tuning_attacks:
        from detector.offline.tuning import tuning_p_values

        tuned = tuning_p_values(model_path, model, scorers, calibrators, x.select(right), y[right], config.tuning_attacks)
    # what a member costs a request: the squeezed copies of the input it needs, each a full model pass
    costs = {n: float(len(s.squeezer_names())) for s in scorers for n in s.score_names}
    budget = "" if config.max_squeezed_copies is None else f" (at most {config.max_squeezed_copies} squeezed copies)"
    if tuned:
        rules["adversarial"] = _rule(choose_fusion(clean, tuned, ADVERSARIAL_CANDIDATES, ADVERSARIAL_SCORES,
                                                   seed=config.seed, criterion=TUNING_CRITERION, costs=costs,
                                                   max_cost=config.max_squeezed_copies),
                                     "tuning attacks " + ", ".join(tuned) + budget)
    screen = config.adversarial_screen
    if screen in held_scores and screen not in rules["adversarial"]["scores"]:
        rules["adversarial"].update(screen=screen, screen_share=config.screen_share)
    # natural errors are rare: cross-fitted, so that every input of the choice half has a p-value from the other quarter
    p_fit = cross(tune_half, fit_half)[1]
    p_all = {n: np.r_[p_fit[n], p_tune[n]] for n in held_scores}
    wrong = np.r_[predicted[fit_half] != y_held[fit_half], ~right]
    if wrong.sum() >= MIN_ERRORS:
        rules["likely_misclassified"] = _rule(
            choose_fusion({n: p[~wrong] for n, p in p_all.items()}, {"misclassified": {n: p[wrong] for n, p in p_all.items()}},
                          MISCLASSIFICATION_CANDIDATES, MISCLASSIFICATION_SCORES, max_members=2, seed=config.seed,
                          costs=costs, max_cost=config.max_squeezed_copies),
            f"{int(wrong.sum())} misclassifications of the choice half (cross-fitted quarters){budget}")
    else:
        rules["likely_misclassified"] = {
            "scores": list(MISCLASSIFICATION_SCORES), "fusion": "fisher", "weights": None,
            "selection": f"default members: fewer than {MIN_ERRORS} misclassifications in the choice half"}
    return rules


def _rule(choice: FusionChoice, positives: str) -> dict:
    """A :class:`FlagRule`'s fusion fields from a choice."""
    return {"scores": choice.scores, "fusion": choice.method, "weights": choice.weights,
            "selection": f"{positives}: {choice.reason()}"}


def _map_model(scorers: list[Scorer], config: CalibrationConfig, hidden: list[str], fit: Capture,
               fit_labels: np.ndarray) -> IntrospectionScorer:
    """The 2-D introspection model of the activation-space map: the scoring model when its latent space is
    2-D, otherwise one fitted on ``fit`` for the figure."""
    scorer = next(s for s in scorers if isinstance(s, IntrospectionScorer))
    if scorer.latent_dim == 2:
        return scorer
    return IntrospectionScorer(latent_dim=2, hidden=config.introspection_hidden,
                               estimator_hidden=config.introspection_hidden, layers=hidden,
                               seed=config.seed).fit(fit, fit_labels)
