"""The baseline manifest: a frozen pydantic model written as ``manifest.json`` in the baseline directory.

It says what the baseline was calibrated for (the model's sha256, input, captured layers), on what data
(spec, hash, split sizes, seed), with which scorers and parameters, how p-values are fused, the thresholds
of every flag for every target false-positive rate, and the held-out metrics. The fitted arrays live beside
it in ``arrays.npz`` and the introspection model in ``introspection.onnx``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from detector.conformal import Fusion
from detector.preprocessing import Preprocessing

__all__ = [
    "SCHEMA_VERSION",
    "ModelInfo",
    "DataInfo",
    "ScorerEntry",
    "Threshold",
    "FlagRule",
    "Manifest",
]

#: Bumped whenever a reader of an older version could misread a newer artifact. 2: a flag rule may name a
#: ``screen`` (older readers would refuse the field with a less helpful message than "upgrade advdetect").
SCHEMA_VERSION = 2


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Frozen):
    """The classifier the baseline belongs to."""

    file_name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str
    input_shape: list[int | None]
    n_classes: int = Field(ge=2)
    captured_layers: list[str]


class DataInfo(_Frozen):
    """The clean calibration data and how it was split."""

    spec: str
    sha256: str = Field(description="SHA-256 of the images' and labels' bytes")
    n_samples: int
    n_fit: int
    n_reference: int = Field(description="held-out inputs whose scores are the conformal references")
    n_threshold: int = Field(description="held-out inputs on which the fused thresholds are set")
    threshold_folds: int | None = Field(
        None, description="folds of the cross-fitted p-values the thresholds were set on (the threshold inputs are "
                          "then held-out inputs that are references too); None: a baseline made before "
                          "cross-fitting, whose threshold inputs were a half disjoint from the references")
    seed: int
    preprocessing: Preprocessing | None = Field(
        None, description="how a folder of images was resized and cropped; evaluate and score apply it to "
                          "folders, and clients of serve must send images prepared this way")

    def describe_split(self) -> str:
        """How the inputs were used, for the CLI and the report: ``fit 500, held-out 1500 (references; thresholds
        on 1125 of them, cross-fitted in 10 folds)``."""
        if self.threshold_folds is None:
            return f"fit {self.n_fit}, references {self.n_reference}, thresholds {self.n_threshold}"
        return (f"fit {self.n_fit}, held-out {self.n_reference} (references; thresholds on {self.n_threshold} of "
                f"them, cross-fitted in {self.threshold_folds} folds)")


class ScorerEntry(_Frozen):
    """One fitted scorer: its kind, constructor parameters and the names of the scores it gives."""

    kind: str
    params: dict[str, Any]
    score_names: list[str]


class Threshold(_Frozen):
    """A decision threshold on a flag's statistic for one target false-positive rate on clean data."""

    target_fpr: float = Field(gt=0, lt=1)
    value: float
    heldout_fpr: float = Field(description="false-positive rate measured on the held-out clean inputs the model "
                                           "classifies correctly (the thresholds' inputs)")


class FlagRule(_Frozen):
    """A flag: which p-values it fuses, how, and where it fires.

    The statistic is ``fusion`` of the conformal p-values of ``scores`` (weighted Fisher when ``weights`` are
    given), OR-ed with the ``screen`` score's p-value when there is one (it then spends about ``screen_share``
    of the false-positive rate: :class:`detector.conformal.Fusion`); the flag fires when the statistic exceeds
    the threshold of the chosen target FPR (``default_fpr`` unless the request asks for another).
    ``reason_alpha`` names a scorer as a reason when its own p-value is below it. ``selection`` says how the
    members, fusion and weights were chosen (on calibration data only).
    """

    name: str
    scores: list[str]
    fusion: str
    thresholds: list[Threshold]
    default_fpr: float
    reason_alpha: float = 0.05
    weights: list[float] | None = None
    selection: str = ""
    screen: str | None = None
    screen_share: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _screen_has_share(self) -> "FlagRule":
        if (self.screen is None) != (self.screen_share is None):
            raise ValueError("screen and screen_share go together: give both or neither")
        return self

    @property
    def members(self) -> list[str]:
        """Every score the statistic reads: ``scores``, then the ``screen`` if any (the column order of
        :meth:`fusion_op`)."""
        return self.scores + ([self.screen] if self.screen else [])

    def describe(self) -> str:
        """One line for people: e.g. ``fisher over a, b OR screen c (share 0.2)``."""
        weights = f" (weights {', '.join(f'{w:.3f}' for w in self.weights)})" if self.weights else ""
        screen = f" OR screen {self.screen} (share {self.screen_share:g})" if self.screen else ""
        return f"{self.fusion} over {', '.join(self.scores)}{weights}{screen}"

    def fusion_op(self) -> Fusion:
        """The :class:`~detector.conformal.Fusion` of p-values (n_samples, len(:attr:`members`))."""
        return Fusion(self.fusion, self.weights, self.screen_share)


class Manifest(_Frozen):
    """Everything needed to load a baseline without executing code (see :mod:`detector.baseline`)."""

    schema_version: int = SCHEMA_VERSION
    tool_version: str
    created_at: str
    model: ModelInfo
    data: DataInfo
    scorers: list[ScorerEntry]
    conformal_min_class_count: int
    flags: list[FlagRule]
    population: dict[str, Any] = Field(default_factory=dict, description="window monitor settings and sizes")
    heldout_metrics: dict[str, float] = Field(default_factory=dict)
    package_versions: dict[str, str] = Field(default_factory=dict)

    @property
    def version(self) -> str:
        """A short identifier of this baseline: schema, creation time and model hash prefix."""
        return f"v{self.schema_version}-{self.created_at}-{self.model.sha256[:8]}"
