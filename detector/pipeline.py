"""The detection pipeline: one ONNX Runtime pass, every scorer, conformal p-values, fused flags.

Both gRPC transports and the offline ``advdetect score`` command call :meth:`Detector.detect`; it returns a
frozen :class:`Detection` per input and the time spent in each stage.

Flag decision (per flag rule of the manifest): with p_j the conformal p-value of score j against the clean
references of the input's predicted class, the statistic T = fusion(p_1..p_k) (Fisher: -2 sum log p_j) is
compared with the threshold calibrated on clean held-out inputs for the requested false-positive rate; the
flag fires when T > threshold. Its reasons are the scores whose own p-value is below the rule's
``reason_alpha`` (or the single smallest one, when none is).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from detector.baseline import check_model_matches, read_baseline
from detector.capture import Capture
from detector.conformal import FUSION_METHODS, CalibratorStack, ConformalCalibrator
from detector.errors import BaselineError, InvalidInput
from detector.manifest import FlagRule, Manifest
from detector.model import OnnxClassifier
from detector.topology.population import PopulationMonitor
from detector.scorers.base import Scorer, ScorerContext
from detector.scorers.registry import SCORER_KINDS, STAGE_OF_KIND
from detector.squeeze import run_with_squeezers

__all__ = ["Detection", "DetectionBatch", "Detector", "STAGES"]

#: Stages timed by :meth:`Detector.detect` (bounded label values for metrics).
STAGES = ("inference", "topology", "introspection", "peers", "fusion")


@dataclass(frozen=True)
class Detection:
    """The verdict on one input.

    Attributes
    ----------
    predicted_class : int
    probabilities : ndarray of shape (n_classes,)
        Softmax of the logits.
    scores : dict of str to float
        Every raw score (higher = more suspicious).
    p_values : dict of str to float
        Conformal p-value of every score against clean references of the predicted class (small = suspicious).
    statistics : dict of str to float
        Fused statistic of each flag rule.
    flags : dict of str to tuple of str
        The flags that fired, each with its reasons (score names).
    """

    predicted_class: int
    probabilities: np.ndarray
    scores: dict[str, float]
    p_values: dict[str, float]
    statistics: dict[str, float]
    flags: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class DetectionBatch:
    """Detections of a batch, its capture, and seconds spent per stage (keys from :data:`STAGES`)."""

    detections: list[Detection]
    capture: Capture
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Detector:
    """A classifier with its calibrated baseline: load once, then :meth:`detect` batches.

    Use :meth:`load`; the constructor takes already built parts.
    """

    def __init__(self, model: OnnxClassifier, manifest: Manifest, scorers: list[Scorer],
                 calibrators: dict[str, ConformalCalibrator], population: PopulationMonitor | None = None):
        self.model = model
        self.manifest = manifest
        self.scorers = scorers
        self.calibrators = calibrators
        self.population = population
        names = [n for s in scorers for n in s.score_names]
        if not names:
            raise BaselineError("the baseline has no scorers")
        uncalibrated = [n for n in names if n not in calibrators]
        if uncalibrated:
            raise BaselineError(f"the baseline calibrates no conformal p-values for the scores {uncalibrated}")
        other = {n: calibrators[n].n_classes_ for n in names if calibrators[n].n_classes_ != model.n_classes}
        if other:
            raise BaselineError(f"conformal references of {other} classes (by score) for a {model.n_classes}-class model")
        for rule in manifest.flags:
            missing = [n for n in rule.members if n not in names]
            if missing or not rule.scores:
                raise BaselineError(f"flag {rule.name!r} fuses scores {missing or '[]'}; the scorers give {names}")
            if rule.fusion not in FUSION_METHODS:
                raise BaselineError(f"flag {rule.name!r}: unknown fusion {rule.fusion!r}, expected one of {FUSION_METHODS}")
        self.score_names = names
        self._squeezers = list(dict.fromkeys(n for s in scorers for n in s.squeezer_names()))
        self._calibrator_stack = CalibratorStack([calibrators[n] for n in names])
        # each rule's fusion and the rows of its scores in the (n_scores, n_samples) tables of detect()
        self._rules = [(rule, rule.fusion_op(), [names.index(n) for n in rule.members]) for rule in manifest.flags]

    @classmethod
    def load(cls, model_path: str | os.PathLike[str], baseline_dir: str | os.PathLike[str],
             intra_op_threads: int = 0, flagged_scores_only: bool = False) -> "Detector":
        """Load the ONNX classifier and its baseline; refuse a baseline made for another model.

        With ``flagged_scores_only``, only the scorers giving a score that some flag fuses are loaded and
        run: the flags and their p-values are the same, :attr:`Detection.scores` holds fewer scores, and a
        request costs less (no squeezed copies of the input unless a flag fuses feature squeezing).

        Raises
        ------
        ModelError, BaselineError
            With a message that says what is wrong (missing file, corrupt, newer schema, other model).
        """
        manifest, arrays, introspection_onnx = read_baseline(baseline_dir)
        model = OnnxClassifier(model_path, intra_op_threads=intra_op_threads)
        check_model_matches(manifest, model.sha256, model_path)
        context = ScorerContext(model)
        scorers: list[Scorer] = []
        flagged = {n for rule in manifest.flags for n in rule.members}
        for entry in manifest.scorers:
            if flagged_scores_only and not flagged & set(entry.score_names):
                continue
            if entry.kind not in SCORER_KINDS:
                raise BaselineError(f"{baseline_dir}: unknown scorer kind {entry.kind!r} (made by a newer advdetect?)")
            prefix = f"scorer/{entry.kind}/"
            own = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            if entry.kind == "introspection":
                own["onnx_model"] = np.frombuffer(introspection_onnx or b"", dtype=np.uint8)
            try:
                scorers.append(SCORER_KINDS[entry.kind].from_state(dict(entry.params), own, context))
            except (KeyError, ValueError) as exc:
                raise BaselineError(f"{baseline_dir}: the state of scorer {entry.kind!r} is corrupt: {exc}") from None
        calibrators = {}
        for name in (n for s in scorers for n in s.score_names):
            try:
                calibrators[name] = ConformalCalibrator.from_state(arrays, f"conformal/{name}/")
            except (KeyError, ValueError) as exc:
                raise BaselineError(f"{baseline_dir}: conformal references of {name!r} are missing or corrupt: {exc}") from None
        population = None
        if manifest.population:
            own = {k.removeprefix("population/"): v for k, v in arrays.items() if k.startswith("population/")}
            try:
                population = PopulationMonitor.from_state(dict(manifest.population), own)
            except (KeyError, TypeError, ValueError) as exc:
                raise BaselineError(f"{baseline_dir}: the population monitor's state is missing or corrupt ({exc!r}); "
                                    "recalibrate the baseline") from None
        extra = [t for s in scorers for t in s.required_tensors()]
        model.set_capture(list(dict.fromkeys(manifest.model.captured_layers + extra)), intra_op_threads=intra_op_threads)
        return cls(model, manifest, scorers, calibrators, population)

    @property
    def batch_size(self) -> int:
        """Inputs per :meth:`detect` call that keep one ONNX Runtime run (with the squeezed copies) within
        :data:`detector.model.BATCH_BYTES` of working memory (256 for the digits models, 1 for ResNet-50 at 224)."""
        return self.model.batch_size(copies=1 + len(self._squeezers))

    @property
    def version(self) -> str:
        """The baseline's version string."""
        return self.manifest.version

    def classify(self, x: np.ndarray) -> Capture:
        """Only the ONNX Runtime pass (detection off): logits, captured activations, and the logits of the
        squeezed copies feature squeezing reads, computed in the same run as a larger batch."""
        return run_with_squeezers(self.model, x, self._squeezers)

    def raw_scores(self, capture: Capture, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Every scorer's scores for ``capture``; adds the time of each stage to ``seconds`` when given."""
        out: dict[str, np.ndarray] = {}
        for scorer in self.scorers:
            t0 = time.perf_counter()
            out.update(scorer.scores(capture))
            if seconds is not None:
                stage = STAGE_OF_KIND.get(scorer.kind, "peers")
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        return out

    def p_values(self, scores: dict[str, np.ndarray], classes: np.ndarray) -> dict[str, np.ndarray]:
        """Conformal p-value of every score against the clean references of each input's class."""
        return {name: self.calibrators[name].p_values(s, classes) for name, s in scores.items()}

    @staticmethod
    def _threshold(rule: FlagRule, fpr: float | None) -> float:
        target = rule.default_fpr if fpr is None else fpr
        for t in rule.thresholds:
            if abs(t.target_fpr - target) < 1e-12:
                return t.value
        raise InvalidInput(
            f"no threshold calibrated for false-positive rate {target} on flag {rule.name!r}; "
            f"calibrated: {', '.join(str(t.target_fpr) for t in rule.thresholds)}"
        )

    def statistics(self, p_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fused statistic of every flag rule, each ndarray (n_samples,)."""
        return {
            rule.name: fusion.combine(np.stack([p_values[n] for n in rule.members], axis=1))
            for rule, fusion, _ in self._rules
        }

    def detect(self, x: np.ndarray, fpr: float | None = None) -> DetectionBatch:
        """Classify the batch ``x`` and flag suspicious inputs.

        Parameters
        ----------
        x : ndarray of shape (n_samples, ...) matching the model's input
        fpr : float, optional
            Target false-positive rate; one of the calibrated ones (default: each rule's default).

        Raises
        ------
        InvalidInput
            Bad input (see :meth:`OnnxClassifier.validate`) or an uncalibrated ``fpr``.
        """
        thresholds = {rule.name: self._threshold(rule, fpr) for rule in self.manifest.flags}
        seconds = {stage: 0.0 for stage in STAGES}
        t0 = time.perf_counter()
        capture = self.classify(x)
        seconds["inference"] = time.perf_counter() - t0
        scores = self.raw_scores(capture, seconds)
        t0 = time.perf_counter()
        # the scorers' own outputs and the capture's classes need no per-call checks beyond NaN (checked
        # once here): p-values and statistics come from the unchecked kernels, ~0.1 ms less per request
        names, classes = self.score_names, capture.predicted
        table = np.array([scores[n] for n in names], dtype=np.float64).reshape(len(names), len(capture))
        if np.isnan(table).any():
            raise InvalidInput(f"the scores {[n for n, row in zip(names, table) if np.isnan(row).any()]} are NaN")
        p_table = self._calibrator_stack.p_values(table, classes)
        stats = {rule.name: fusion._combine(p_table[rows].T).tolist() for rule, fusion, rows in self._rules}
        probabilities = capture.probabilities
        detections = []
        for i, (score_row, p_row) in enumerate(zip(table.T.tolist(), p_table.T.tolist())):
            p_i = dict(zip(names, p_row))
            flags = {}
            for rule, _, _ in self._rules:
                if stats[rule.name][i] > thresholds[rule.name]:
                    reasons = [n for n in rule.members if p_i[n] < rule.reason_alpha]
                    flags[rule.name] = tuple(reasons or [min(rule.members, key=p_i.__getitem__)])
            detections.append(Detection(
                predicted_class=int(classes[i]), probabilities=probabilities[i], scores=dict(zip(names, score_row)),
                p_values=p_i, statistics={n: s[i] for n, s in stats.items()}, flags=flags,
            ))
        seconds["fusion"] = time.perf_counter() - t0
        return DetectionBatch(detections, capture, seconds)
