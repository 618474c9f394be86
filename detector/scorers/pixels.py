"""A peer that reads the pixels alone: the energy of an image's patches in directions clean patches barely use.

Hendrycks & Gimpel ("Early methods for detecting adversarial images", ICLR workshop 2017) found that
adversarial images put more variance than clean ones into the last principal components of the input
space. Carlini & Wagner (2017, "Adversarial examples are not easily detected") bypassed it with an attack
that knows it, and traced its MNIST success to perturbed border pixels that are blank in every clean digit.
This scorer fits the components on small patches instead of whole images, so that it applies to inputs of
any size. On 145 of LeNet-5's 8-bit CW-L2 (kappa 10) examples, 4x4 patches gave AUROC 0.999 against clean
test digits, and still 0.999 with the 298 pixels that are blank in 99 % of clean digits set to zero in both:
here it is not the border. CW-L2 spreads its change thinly over the digit, and rounding to 8-bit leaves
that as a texture of a few grey levels that clean strokes lack. An attacker who knows the scorer can avoid
it, as Carlini & Wagner did, and ours did: fused into LeNet-5's ``adversarial`` flag it cut the share of the
adaptive attacker's misclassified inputs still flagged (eps 0.3 on the digit, 5 % FPR) from 0.53 to 0.22, and
alone it let 85 % of them through (``bench/results/adaptive-lenet5-patch-pca.md``). So no flag fuses it. It
is a peer that ``bench/quality.py`` reports beside the others, and the ``adversarial`` flag's screen: OR-ed
with the fusion for a small share of the false-positive rate (:class:`detector.conformal.Fusion`), it catches
what attackers who ignore it leave in the pixels, and an attacker who keeps it clean only takes that share
from the fusion.

On images whose channels are copies of one grey channel (MNIST padded to 32x32 and repeated to 3 channels),
clean patches use a third of the patch dimensions, so any change that treats the channels unequally scores
far out: when it could be fused, and attacks still coloured grey images, calibration of the MNIST-32
ResNet-18 and ViT chose patch PCA alone with tuning AUROC 1.000. That is a property of such data, not evidence
for colour images, and attacks now keep such images grey (:func:`detector.offline.attacks.channels_tied`).
In grey, patch PCA still scores 0.961-0.990 AUROC on CW-L2 kappa=10 for the three MNIST-32 models
(``bench/results/quality-*_32.md``): the same 8-bit texture as on LeNet-5.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from detector.capture import Capture
from detector.errors import InvalidInput
from detector.scorers.base import Scorer, ScorerContext
from detector.scorers.peers import _check_labels

__all__ = ["PatchPCAScorer"]


class PatchPCAScorer(Scorer):
    """Energy of each input's pixel patches outside the principal subspace of clean patches.

    Parameters
    ----------
    patch_size : int, default 4
        Side p of the square, non-overlapping patches (p x p pixels of every channel). Rows and columns
        beyond the last whole patch are not read.
    variance : float in (0, 1), default 0.99
        The leading principal components of clean patches that explain this share of their variance span
        the used subspace; the others are the tail.

    Notes
    -----
    An input x of shape (C, H, W) is cut into n_p = floor(H/p) floor(W/p) patches q_i in R^d, d = C p^2.
    With mu the mean of the clean fit patches and T (d, d - k) their principal axes beyond the first k,
    P = T T^T,

        s(x) = sum_i || T^T (q_i - mu) ||^2 = <S(x), P> - 2 m(x)^T P mu + n_p mu^T P mu,

    in squared pixel units (pixels in [0, 1]), where S(x) = sum_i q_i q_i^T and m(x) = sum_i q_i are the
    input's patch moments. Streaming keeps only those moments and n_p per input (d^2 + d + 1 numbers,
    :meth:`reduce`): the clean covariance, sum_x S(x) / N - mu mu^T with N patches in all, and every score
    follow from them. Higher = more suspicious.
    """

    kind = "patch_pca"
    score_names = ("patch_pca",)

    def __init__(self, patch_size: int = 4, variance: float = 0.99):
        self.patch_size = patch_size
        self.variance = variance

    def _moments(self, capture: Capture) -> np.ndarray:
        """Per input, S(x) flattened, m(x) and n_p: ndarray (n_samples, d^2 + d + 1), float64."""
        if self.kind in capture.features:
            return capture.features[self.kind]
        x = np.asarray(capture.inputs, dtype=np.float64)
        if x.ndim == 3:
            x = x[:, None]
        p = int(self.patch_size)
        if x.ndim != 4 or x.shape[2] < p or x.shape[3] < p:
            raise InvalidInput(f"patch_pca reads images (n, C, H, W) of at least {p}x{p} pixels, got shape {x.shape}")
        n, c, h, w = x.shape
        q = x[:, :, : h // p * p, : w // p * p].reshape(n, c, h // p, p, w // p, p)
        q = q.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        second = np.einsum("npi,npj->nij", q, q, optimize=True).reshape(n, -1)
        return np.concatenate([second, q.sum(axis=1), np.full((n, 1), float(q.shape[1]))], axis=1)

    @staticmethod
    def _split(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """S (n, d, d), m (n, d) and n_p (n,) from :meth:`_moments`' columns."""
        d = int(round((np.sqrt(4 * moments.shape[1] - 3) - 1) / 2))  # d^2 + d + 1 columns
        return moments[:, : d * d].reshape(-1, d, d), moments[:, d * d:-1], moments[:, -1]

    def reduce(self, capture: Capture) -> dict[str, np.ndarray]:
        """The patch moments of every input (a reduced capture drops the pixels)."""
        return {self.kind: self._moments(capture)}

    def fit(self, capture: Capture, labels: np.ndarray) -> "PatchPCAScorer":
        """Principal axes of the clean patches; ``labels`` are checked for length only. Returns self."""
        _check_labels(capture, labels)
        if not 0.0 < self.variance < 1.0:
            raise InvalidInput(f"variance must lie in (0, 1), got {self.variance!r}")
        if len(capture) == 0:
            raise InvalidInput("cannot fit on an empty capture")
        second, first, count = self._split(self._moments(capture))
        total = count.sum()
        self.mean_ = first.sum(axis=0) / total
        covariance = second.sum(axis=0) / total - np.outer(self.mean_, self.mean_)
        values, vectors = np.linalg.eigh(covariance)  # ascending
        variances, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]  # rounding can leave tiny negatives
        explained = np.cumsum(variances) / max(float(variances.sum()), 1e-300)
        k = int(np.searchsorted(explained, self.variance)) + 1
        tail = vectors[:, k:]
        self.projector_ = tail @ tail.T
        return self

    def scores(self, capture: Capture) -> dict[str, np.ndarray]:
        """Tail energy of the patches per input, ndarray (n_samples,), squared pixel units; higher = more suspicious."""
        self._check_fitted("projector_")
        second, first, count = self._split(self._moments(capture))
        if first.shape[1] != len(self.mean_):
            raise InvalidInput(f"patch_pca was fitted on patches of {len(self.mean_)} values, got {first.shape[1]}")
        pm = self.projector_ @ self.mean_
        energy = (np.einsum("nij,ij->n", second, self.projector_) - 2.0 * first @ pm
                  + count * float(self.mean_ @ pm))
        return {self.kind: np.maximum(energy, 0.0)}

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted("projector_")
        return ({"patch_size": int(self.patch_size), "variance": float(self.variance)},
                {"mean": self.mean_, "projector": self.projector_})

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray],
                   context: ScorerContext | None = None) -> "PatchPCAScorer":
        scorer = cls(**params)
        scorer.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        scorer.projector_ = np.asarray(arrays["projector"], dtype=np.float64)
        if scorer.projector_.shape != (len(scorer.mean_), len(scorer.mean_)):
            raise InvalidInput("inconsistent patch_pca arrays")
        return scorer
