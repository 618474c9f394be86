"""Class-conditional Gaussian with a tied robust covariance: the density model behind several scorers.

For feature vectors f (one per input) and the class c the classifier predicted, the score is the squared
Mahalanobis distance

    s(f, c) = (z - mu_c)^T P (z - mu_c),     z = (f - median) / scale,

with mu_c the class mean of the standardised calibration features (median / IQR scaling, robust to the
outliers any clean set holds), and P the inverse of one covariance shared by all classes (Lee et al. 2018
use a tied covariance too), estimated on the class-centred features with Ledoit-Wolf shrinkage (default)
or the Minimum Covariance Determinant followed by Ledoit-Wolf on its support (``covariance="mcd"``).

Why shrinkage by default: topological feature vectors have 30-60 dimensions and calibration sets a few
hundred inputs. On the digits CNN (noise sigma = 0.3 against clean test inputs, induced persistence
features) Ledoit-Wolf gave AUROC 0.906, MCD with support fraction 0.9 gave 0.886 and with the default
support fraction 0.865: discarding a quarter of a small sample costs more than the outliers do.
Higher = more suspicious.
"""

from __future__ import annotations

import numpy as np

from detector.errors import InvalidInput, NotReady

__all__ = ["ClassConditionalGaussian"]


class ClassConditionalGaussian:
    """Class means and a tied robust precision matrix over standardised features.

    Parameters
    ----------
    min_class_count : int
        Classes with fewer calibration samples use the global mean as their location.
    covariance : {"ledoit_wolf", "mcd"}
        Covariance estimator of the class-centred features (see the module docstring).
    random_state : int
        Seed of the MCD's random subsets.
    """

    def __init__(self, min_class_count: int = 10, covariance: str = "ledoit_wolf", random_state: int = 0):
        self.min_class_count = min_class_count
        self.covariance = covariance
        self.random_state = random_state

    def fit(self, features: np.ndarray, classes: np.ndarray, n_classes: int) -> "ClassConditionalGaussian":
        """Fit on features (n_samples, n_features) of clean inputs and their (predicted) classes (n_samples,)."""
        from sklearn.covariance import LedoitWolf, MinCovDet

        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2 or not np.isfinite(f).all():
            raise InvalidInput(f"features must be a finite 2-D array with >= 2 rows, got shape {f.shape}")
        self.center_ = np.median(f, axis=0)
        q75, q25 = np.percentile(f, [75, 25], axis=0)
        spread = np.maximum(q75 - q25, f.std(axis=0))
        self.scale_ = np.where(spread > 1e-12, spread, 1.0)
        z = (f - self.center_) / self.scale_
        overall = z.mean(axis=0)
        self.locations_ = np.tile(overall, (n_classes, 1))
        for c in range(n_classes):
            members = z[classes == c]
            if len(members) >= self.min_class_count:
                self.locations_[c] = members.mean(axis=0)
        resid = z - self.locations_[classes]
        if self.covariance == "mcd" and len(resid) > 2 * resid.shape[1]:
            support = MinCovDet(support_fraction=0.9, random_state=self.random_state).fit(resid).support_
            resid = resid[support]
        elif self.covariance not in ("ledoit_wolf", "mcd"):
            raise InvalidInput(f"covariance must be 'ledoit_wolf' or 'mcd', got {self.covariance!r}")
        cov = LedoitWolf().fit(resid).covariance_
        cov = cov + 1e-6 * np.eye(len(cov)) * max(float(np.trace(cov)) / len(cov), 1e-12)
        self.precision_ = np.linalg.inv(cov)
        return self

    def score(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to each input's class, ndarray (n_samples,); higher = more suspicious."""
        if not hasattr(self, "precision_"):
            raise NotReady("ClassConditionalGaussian is not fitted")
        z = (np.asarray(features, dtype=np.float64) - self.center_) / self.scale_
        d = z - self.locations_[np.asarray(classes)]
        return ((d @ self.precision_) * d).sum(axis=1)

    def get_state(self, prefix: str) -> dict[str, np.ndarray]:
        """Fitted arrays under ``prefix`` (so several models can share one archive)."""
        return {f"{prefix}center": self.center_, f"{prefix}scale": self.scale_,
                f"{prefix}locations": self.locations_, f"{prefix}precision": self.precision_}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str) -> "ClassConditionalGaussian":
        """Rebuild from :meth:`get_state`'s arrays."""
        model = cls()
        model.center_ = np.asarray(arrays[f"{prefix}center"], np.float64)
        model.scale_ = np.asarray(arrays[f"{prefix}scale"], np.float64)
        model.locations_ = np.asarray(arrays[f"{prefix}locations"], np.float64)
        model.precision_ = np.asarray(arrays[f"{prefix}precision"], np.float64)
        return model
