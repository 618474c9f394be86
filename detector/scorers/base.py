"""The scorer contract shared by our methods and the peers.

A scorer follows scikit-learn's shape: the constructor only stores parameters, :meth:`Scorer.fit`
validates and learns from clean data and returns ``self``, fitted attributes end in ``_``. Scores run
the other way from scikit-learn's ``score_samples``: **higher = more suspicious**, as in PyOD and the
adversarial-detection literature.

A scorer may produce several named scores from one pass (the introspection VAE gives a reconstruction
error and an estimated classifier error); ``score_names`` lists them and :meth:`Scorer.scores` returns
them all. :meth:`Scorer.score` is the first one, for the common single-score case.

State is written and read as JSON-able parameters plus a dict of plain numpy arrays, so that a baseline
artifact never needs pickle.

Streaming (calibration, :mod:`detector.stream`): each batch's capture is reduced before the next batch
runs. A scorer that reads small tensors (logits, channel means, dense layers) names them in
:meth:`Scorer.kept_tensors` and reads them from the reduced capture as from a full one; a scorer that reads
large tensors, the pixels or the squeezed copies' logits (all dropped by a reduced capture) derives its
per-input features in :meth:`Scorer.reduce`, and its ``fit`` and ``scores`` read them from
``capture.features`` when they are there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from detector.capture import Capture
from detector.errors import NotReady

if TYPE_CHECKING:
    from detector.model import OnnxClassifier

__all__ = ["Scorer", "ScorerContext"]


@dataclass
class ScorerContext:
    """What scorers loaded from one baseline share: the classifier, and objects built once for all.

    ``shared`` lets two scorers that read the same derived data (the induced graph's features) build it
    once: the first to load stores it under a key, the next finds it there.
    """

    model: "OnnxClassifier"
    shared: dict[Any, Any] = field(default_factory=dict)


class Scorer(ABC):
    """Base class of every scorer.

    Subclasses set ``kind`` (a stable identifier used in the artifact) and ``score_names``.
    """

    kind: ClassVar[str]
    score_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def fit(self, capture: Capture, labels: np.ndarray) -> "Scorer":
        """Learn the clean reference from ``capture`` and the true ``labels`` (n_samples,); return self."""

    @abstractmethod
    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Every named score, each ndarray of shape (n_samples,), float64; higher = more suspicious."""

    def score(self, capture: Capture) -> np.ndarray:
        """The first of :attr:`score_names`, ndarray of shape (n_samples,); higher = more suspicious."""
        return self.scores(capture)[self.score_names[0]]

    @abstractmethod
    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Constructor parameters (JSON-able) and fitted state as plain numpy arrays (no object dtype)."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   context: ScorerContext | None = None) -> "Scorer":
        """Rebuild a fitted scorer from :meth:`get_state`'s output without executing stored code.

        ``context`` carries the classifier for scorers whose state depends on its structure.
        """

    def required_tensors(self) -> list[str]:
        """Capture keys the scorer reads beyond the classifier's default capture (none by default)."""
        return []

    def kept_tensors(self) -> list[str]:
        """Capture keys a reduced capture must keep for this scorer (default: :meth:`required_tensors`)."""
        return self.required_tensors()

    def reduce(self, capture: Capture) -> dict[str, np.ndarray]:
        """Per-input features derived from tensors that a reduced capture drops (none by default).

        Returns a dict of arrays of shape (n_samples, ...), keyed by the scorer's :attr:`kind`; :meth:`fit` and
        :meth:`scores` read them back from :attr:`Capture.features <detector.capture.Capture.features>`.
        """
        return {}

    def squeezer_names(self) -> list[str]:
        """Squeezed copies of the input (:data:`detector.squeeze.SQUEEZERS`) whose logits it reads (none by default)."""
        return []

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise NotReady(f"{type(self).__name__} is not fitted: call fit() or load it from a baseline first")
