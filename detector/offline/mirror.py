"""A differentiable mirror of a loaded :class:`~detector.pipeline.Detector`, for adaptive attacks only.

The serving detector is ONNX Runtime plus numpy and numba: no gradients. An attacker who knows it (the
threat model of Carlini & Wagner 2017 and Tramer et al. 2020) needs the gradient of the whole decision,
from pixels to the fused statistic. :class:`DetectorMirror` rebuilds every stage in torch from the same
files and the same fitted arrays:

- the classifier: the ONNX file through onnx2torch, with the captured tensors as extra outputs
  (:func:`detector.offline.torch_onnx.onnx_to_torch`);
- each scorer, by its ``kind`` (:data:`SCORE_MIRRORS`; a new scorer kind is mirrored by adding a
  factory there): induced persistence and Betti density (:mod:`detector.offline.mirror_topology`),
  introspection (its ONNX graph through onnx2torch), max-softmax, Mahalanobis, k-NN, the trust score and the
  non-zero pixel count;
- the conformal p-value of each score (:class:`SmoothConformal`): the step function
  p(s) = (1 + #{r >= s}) / (|R| + 1) (times the exponential tail above r_max) gets the smooth monotone
  surrogate with sigmoid((r - s) / h) in place of the indicator;
- each flag rule's fusion exactly as the manifest says (Fisher, min or harmonic; :func:`fuse`).

Discrete parts (the forest, Betti counts, the p-value's rank, the lit-pixel count) are straight-through
by default: the forward value is the serving detector's, the backward pass the surrogate's gradient. With
``straight_through=False`` the surrogates are used both ways (what finite differences can check).

Nothing here runs when serving: this module imports torch and lives under ``detector/offline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from detector.conformal import TINY, ConformalCalibrator
from detector.errors import InvalidInput
from detector.gaussian import ClassConditionalGaussian
from detector.manifest import FlagRule
from detector.offline.mirror_topology import TopologyMirror, straight_through
from detector.offline.torch_onnx import onnx_to_torch
from detector.pipeline import Detector
from detector.scorers.base import Scorer

__all__ = ["DetectorMirror", "MirrorOutput", "MirrorSettings", "SCORE_MIRRORS", "SmoothConformal", "fuse"]


@dataclass(frozen=True)
class MirrorSettings:
    """Smoothing of the mirror's discrete parts.

    Attributes
    ----------
    temperature : float
        tau of the Betti-count surrogate, in log-weight units (see :mod:`detector.offline.mirror_topology`).
    bandwidth : float
        Bandwidth of the smoothed conformal rank, as a fraction of the reference scores' standard deviation.
    pixel_temperature : float
        Width of the sigmoid that replaces "pixel > threshold" in the non-zero-pixel count (pixel units).
    straight_through : bool
        Exact forward values with surrogate gradients (True) or surrogates both ways (False).
    """

    temperature: float = 0.05
    bandwidth: float = 0.1
    pixel_temperature: float = 1.0 / 1020.0
    straight_through: bool = True


@dataclass
class MirrorPass:
    """One forward pass through the mirrored classifier, shared by the score mirrors.

    ``predicted`` is the arg-max class (numpy int64); ``cache`` lets two mirrors of the same features
    (induced persistence and Betti density) compute them once.
    """

    inputs: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    predicted: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MirrorOutput:
    """What :meth:`DetectorMirror.forward` returns; every tensor has the batch axis first.

    Attributes
    ----------
    logits : Tensor of shape (n, n_classes), float32
    predicted : ndarray of shape (n,), int64
    scores, log_p_values : dict of str to Tensor of shape (n,), float64
        Raw scores (higher = more suspicious) and the log of their (surrogate) conformal p-values (log
        space: a far-out input's p-value underflows, its log does not, so its gradient survives).
    statistics : dict of str to Tensor of shape (n,), float64
        Fused statistic of each flag rule computed (all rules whose scores were computed).
    """

    logits: torch.Tensor
    predicted: np.ndarray
    scores: dict[str, torch.Tensor]
    log_p_values: dict[str, torch.Tensor]
    statistics: dict[str, torch.Tensor]

    @property
    def p_values(self) -> dict[str, torch.Tensor]:
        """The conformal p-values themselves, exp(log p)."""
        return {n: torch.exp(v) for n, v in self.log_p_values.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


class _Gaussian:
    """:class:`~detector.gaussian.ClassConditionalGaussian` in torch: (z - mu_c)^T P (z - mu_c), z = (f - median) / scale."""

    def __init__(self, gaussian: ClassConditionalGaussian):
        self.center, self.scale = _tensor(gaussian.center_), _tensor(gaussian.scale_)
        self.locations, self.precision = _tensor(gaussian.locations_), _tensor(gaussian.precision_)

    def __call__(self, features: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        d = (features.to(torch.float64) - self.center) / self.scale - self.locations[torch.from_numpy(classes)]
        return ((d @ self.precision) * d).sum(dim=1)


def _channel_features(a: torch.Tensor) -> torch.Tensor:
    """:func:`detector.scorers.peers.layer_features` in torch: channel means of (n, C, ...) tensors, (n, d) as is."""
    return a.reshape(a.shape[0], a.shape[1], -1).mean(dim=2) if a.dim() > 2 else a.reshape(a.shape[0], -1)


ScoreMirror = Callable[[MirrorPass], dict[str, torch.Tensor]]


class _MirrorContext:
    """What score mirrors of one detector share: the settings, the mirrored classifier (``classify(x) -> (logits,
    activations)``) and one :class:`TopologyMirror` per feature extractor."""

    def __init__(self, settings: MirrorSettings,
                 classify: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]):
        self.settings = settings
        self.classify = classify
        self._topology: dict[int, TopologyMirror] = {}

    def topology(self, features: Any) -> TopologyMirror:
        if id(features) not in self._topology:
            self._topology[id(features)] = TopologyMirror(features, self.settings.temperature, self.settings.straight_through)
        return self._topology[id(features)]


def _induced_graph(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """Induced persistence / Betti density: Gaussian score of log1p(max(features, 0)) for the predicted class."""
    topology, gaussian, block, name = context.topology(scorer.features), _Gaussian(scorer.gaussian_), scorer.block, scorer.score_names[0]
    key = f"topology/{id(topology)}"

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        if key not in p.cache:
            p.cache[key] = topology.transform(p.inputs, p.logits, p.activations)
        return {name: gaussian(torch.log1p(torch.relu(p.cache[key][block])), p.predicted)}

    return run


def _max_softmax(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """1 - max softmax = r / (1 + r), r = sum_{j != m} exp(z_j - z_m), in float64."""

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        z = p.logits.to(torch.float64)
        top = torch.from_numpy(p.predicted)[:, None]
        e = torch.exp(z - z.gather(1, top)).scatter(1, top, 0.0)  # the arg-max term dropped, not subtracted
        r = e.sum(dim=1)
        return {"max_softmax": r / (1.0 + r)}

    return run


def _mahalanobis(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """Squared Mahalanobis distance of the layer's (channel-mean) features: to the predicted class, or the minimum."""
    gaussian, layer, distance = _Gaussian(scorer.gaussian_), scorer.layer_, scorer.distance

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        f = _channel_features(p.activations[layer])
        if distance == "predicted":
            return {"mahalanobis": gaussian(f, p.predicted)}
        n_classes = gaussian.locations.shape[0]
        every = torch.stack([gaussian(f, np.full(len(f), c)) for c in range(n_classes)], dim=1)
        return {"mahalanobis": every.min(dim=1).values}

    return run


def _normalised_sq_distances(reference: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f -> ||u - r||^2`` (n, n_references) for u = f / ||f|| (f = 0 kept) and the given normalised references."""
    ref = _tensor(reference)
    ref_sq = (ref * ref).sum(dim=1)

    def sq_distances(f: torch.Tensor) -> torch.Tensor:
        norm = f.norm(dim=1, keepdim=True)
        u = f / torch.where(norm > 0, norm, torch.ones_like(norm))
        return (u * u).sum(dim=1, keepdim=True) + ref_sq - 2.0 * (u @ ref.T)

    return sq_distances


def _knn(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """Distance of the L2-normalised features to their k-th nearest clean reference."""
    sq_distances, k, layer = _normalised_sq_distances(scorer.reference_), int(scorer.k), scorer.layer_

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        sq = sq_distances(_channel_features(p.activations[layer]).to(torch.float64))
        return {"knn": torch.sqrt(torch.clamp(sq.kthvalue(k, dim=1).values, min=1e-24))}

    return run


def _introspection(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """The introspection graph (onnx2torch) on the standardised activation vector: reconstruction and log10 e-hat."""
    network = onnx_to_torch(scorer.onnx_model_)
    layers, reduction = scorer.layers_, scorer.reduction
    mean, scale = _tensor(scorer.mean_), _tensor(scorer.scale_)

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        parts = []
        for name in layers:
            a = p.activations[name]
            parts.append(_channel_features(a) if a.dim() > 2 and reduction == "mean" else a.reshape(a.shape[0], -1))
        h = ((torch.cat(parts, dim=1).to(torch.float64) - mean) / scale).to(torch.float32)
        _, reconstruction, log10_error = network(h)
        return {"introspection_reconstruction": reconstruction.to(torch.float64),
                "introspection_error": log10_error.to(torch.float64)}

    return run


def _nonzero_pixels(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """|#{pixels > threshold} - clean median|; the count's surrogate is sum sigmoid((x - threshold) / tau)."""
    threshold, median = float(scorer.threshold), float(scorer.median_)
    settings = context.settings

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        x = p.inputs.reshape(len(p.inputs), -1).to(torch.float64)
        soft = torch.sigmoid((x - threshold) / settings.pixel_temperature).sum(dim=1)
        count = straight_through((x.detach() > threshold).sum(dim=1).to(torch.float64), soft) if settings.straight_through else soft
        return {"nonzero_pixels": torch.abs(count - median)}

    return run


def _patch_pca(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """sum over p x p patches q of ||T^T (q - mu)||^2 = (q - mu)^T P (q - mu), in squared pixel units."""
    p = int(scorer.patch_size)
    mean, projector = _tensor(scorer.mean_), _tensor(scorer.projector_)

    def run(pass_: MirrorPass) -> dict[str, torch.Tensor]:
        x = pass_.inputs.to(torch.float64)
        x = x[:, None] if x.ndim == 3 else x
        n, c, h, w = x.shape
        q = x[:, :, : h // p * p, : w // p * p].reshape(n, c, h // p, p, w // p, p)
        q = q.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p) - mean
        return {"patch_pca": torch.einsum("npi,ij,npj->n", q, projector, q)}

    return run


def _energy(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """Energy, -logsumexp(z) in logit units."""

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        return {"energy": -torch.logsumexp(p.logits.to(torch.float64), dim=1)}

    return run


def _squeezed(name: str, x: torch.Tensor) -> torch.Tensor:
    """:func:`detector.squeeze.squeeze` in torch; the bit-depth rounding passes gradients straight through (BPDA)."""
    if name.startswith("bit_depth_"):
        levels = float(2 ** int(name.removeprefix("bit_depth_")) - 1)
        return straight_through(torch.round(torch.clamp(x.detach(), 0.0, 1.0) * levels) / levels, x)
    if name == "median_2x2":
        # scipy's size-2 window covers the pixel and its upper/left neighbours (mode "reflect" repeats the edge
        # row and column) and takes the upper middle of the four sorted values
        padded = torch.cat([x[..., :1, :], x], dim=-2)
        padded = torch.cat([padded[..., :1], padded], dim=-1)
        windows = torch.stack([padded[..., :-1, :-1], padded[..., :-1, 1:], padded[..., 1:, :-1], padded[..., 1:, 1:]])
        return windows.sort(dim=0).values[2]
    raise InvalidInput(f"the mirror knows the squeezers bit_depth_<b> and median_2x2, not {name!r}")


def _feature_squeezing(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """max_s || softmax(z(x)) - softmax(z(squeeze_s(x))) ||_1, the squeezed copies run through the mirrored model."""
    squeezers = list(scorer.squeezers)

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        q = torch.softmax(p.logits.to(torch.float64), dim=1)
        distances = [(q - torch.softmax(context.classify(_squeezed(name, p.inputs))[0].to(torch.float64), dim=1))
                     .abs().sum(dim=1) for name in squeezers]
        return {"feature_squeezing": torch.stack(distances, dim=1).max(dim=1).values}

    return run


def _layerwise_knn_statistic(model: Any, k: int) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
    """Distance of normalised features to their k-th nearest reference of the predicted class (its farthest when
    it has fewer than k; 2 when it has none), as :class:`~detector.scorers.layerwise.LayerwiseKNNScorer`."""
    sq_distances, labels = _normalised_sq_distances(model.reference), model.labels

    def statistic(f: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        sq = sq_distances(f).masked_fill(torch.from_numpy(labels[None, :] != classes[:, None]), float("inf"))
        counts = np.bincount(labels, minlength=int(classes.max(initial=0)) + 1)[classes]
        kth = torch.from_numpy(np.minimum(k, np.maximum(counts, 1)) - 1)[:, None]
        d = sq.sort(dim=1).values.gather(1, kth)[:, 0]
        return torch.sqrt(torch.clamp(torch.where(torch.isfinite(d), d, torch.full_like(d, 4.0)), min=1e-24))

    return statistic


def _layerwise(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """Layer-wise k-NN / Mahalanobis: -2 sum_l log p_l of each layer's statistic, p_l its smoothed conformal p-value."""
    if scorer.kind == "layerwise_knn":
        statistics = [_layerwise_knn_statistic(model, int(scorer.k)) for model in scorer.models_]
    else:
        statistics = [_Gaussian(model) for model in scorer.models_]
    conformal = [SmoothConformal(cal, context.settings) for cal in scorer.calibrators_]
    layers, name = list(scorer.layers_), scorer.kind

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        log_p = [smooth(stat(_channel_features(p.activations[layer]).to(torch.float64), p.predicted), p.predicted)
                 for layer, stat, smooth in zip(layers, statistics, conformal)]
        return {name: -2.0 * torch.stack(log_p, dim=1).sum(dim=1)}

    return run


def _trust_score(scorer: Any, context: _MirrorContext) -> ScoreMirror:
    """-log trust score: (log d^2 to the predicted class - log min over other classes of d^2) / 2, class distances
    to the k-th nearest normalised reference of each class, as :class:`~detector.scorers.trust.TrustScoreScorer`."""
    sq_distances, layer = _normalised_sq_distances(scorer.reference_), scorer.layer_
    members, kth = scorer._members, scorer._kth

    def run(p: MirrorPass) -> dict[str, torch.Tensor]:
        sq = sq_distances(_channel_features(p.activations[layer]).to(torch.float64))
        d = torch.stack([sq[:, m].kthvalue(int(k) + 1, dim=1).values if len(m) else torch.full_like(sq[:, 0], 4.0)
                         for m, k in zip(members, kth)], dim=1).clamp(1e-12, 4.0)
        top = torch.from_numpy(p.predicted)[:, None]
        own = d.gather(1, top)[:, 0]
        other = d.scatter(1, top, float("inf")).min(dim=1).values
        return {"trust_score": 0.5 * (torch.log(own) - torch.log(other))}

    return run


#: Score mirror factory of each scorer kind (``Scorer.kind``): ``factory(scorer, context) -> mirror``, where
#: ``mirror(MirrorPass)`` returns the scorer's named scores as float64 tensors (n,), higher = more suspicious.
SCORE_MIRRORS: dict[str, Callable[[Any, _MirrorContext], ScoreMirror]] = {
    "induced_persistence": _induced_graph,
    "betti_density": _induced_graph,
    "introspection": _introspection,
    "max_softmax": _max_softmax,
    "mahalanobis": _mahalanobis,
    "knn": _knn,
    "nonzero_pixels": _nonzero_pixels,
    "energy": _energy,
    "feature_squeezing": _feature_squeezing,
    "layerwise_knn": _layerwise,
    "layerwise_mahalanobis": _layerwise,
    "trust_score": _trust_score,
    "patch_pca": _patch_pca,
}


class SmoothConformal:
    """A conformal calibrator's log p-values with a smooth monotone surrogate for the rank.

    Parameters
    ----------
    calibrator : ConformalCalibrator
        Fitted; its references (per class where conditional, else global) and tails are used as they are.
    settings : MirrorSettings

    Notes
    -----
    With R the references of the input's predicted class, r_max their largest and beta the tail scale,

        log p~(s) = log(1 + sum_{r in R} sigmoid((r - s) / h)) - log(|R| + 1) - max(s - r_max, 0) / beta,

    h = ``bandwidth`` * std(R). p~ is decreasing in s and tends to the serving p-value as h -> 0. The
    serving tail stops at exp(-700) (float64); the surrogate's does not, so that an input far beyond every
    reference still has a gradient back towards them (no masking by saturation).
    """

    def __init__(self, calibrator: ConformalCalibrator, settings: MirrorSettings):
        self.calibrator = calibrator
        self.settings = settings
        self._classes = []
        for k in range(calibrator.n_classes_):
            ref = (calibrator.class_values_[calibrator.class_offsets_[k]:calibrator.class_offsets_[k + 1]]
                   if calibrator.conditional_[k] else calibrator.global_)
            h = max(settings.bandwidth * float(np.std(ref)), 1e-12)
            beta = float(calibrator.tail_beta_[k]) if calibrator.tail else np.inf
            self._classes.append((_tensor(ref), h, float(calibrator.tail_max_[k]), beta))

    def __call__(self, scores: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        """log p-values (n,) float64 of ``scores`` (n,) for the inputs' ``classes`` (n,)."""
        parts = []
        for k in np.unique(classes):
            rows = torch.from_numpy(np.flatnonzero(classes == k))
            ref, h, r_max, beta = self._classes[int(k)]
            s = scores[rows]
            log_p = torch.log1p(torch.sigmoid((ref[None, :] - s[:, None]) / h).sum(dim=1)) - np.log(len(ref) + 1.0)
            if np.isfinite(beta):
                log_p = log_p - torch.relu(s - r_max) / beta
            parts.append((rows, log_p))
        soft = torch.zeros_like(scores).index_put((torch.cat([r for r, _ in parts]),), torch.cat([p for _, p in parts]))
        if not self.settings.straight_through:
            return soft
        hard = np.log(self.calibrator.p_values(scores.detach().numpy(), classes))
        return straight_through(hard, soft)


def fuse(rule: FlagRule, log_p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A flag rule's statistic of log p-values, as :class:`detector.conformal.Fusion`: higher = more suspicious.

    ``"fisher"``: T = -2 sum_j w_j log p_j (w_j = 1 without ``weights``); ``"min"``: T = -log min p = max(-log p);
    ``"harmonic"``: T = mean 1 / p = mean exp(-log p). With a screen s of share c: -log min(P(T) / (1 - c), p_s / c),
    P(T) the group's p-value under independence (:meth:`detector.conformal.Fusion.log_group_p_value`).
    """
    group = torch.stack([log_p[n] for n in rule.scores], dim=1)
    if rule.fusion == "fisher":
        t = -2.0 * (group if rule.weights is None else group * _tensor(np.asarray(rule.weights))).sum(dim=1)
    elif rule.fusion == "min":
        t = -group.min(dim=1).values
    elif rule.fusion == "harmonic":
        t = torch.exp(-group).mean(dim=1)
    else:
        raise InvalidInput(f"the mirror knows the fusions fisher, min and harmonic, not {rule.fusion!r}")
    if rule.screen is None:
        return t
    k, share = len(rule.scores), rule.screen_share
    if rule.fusion == "fisher":
        a, x = float(k if rule.weights is None else sum(rule.weights)), t / 2.0
        q = torch.special.gammaincc(torch.tensor(a, dtype=t.dtype), x)
        log_group_p = torch.where(q > TINY, torch.log(torch.clamp(q, min=TINY)),
                                  (a - 1.0) * torch.log(torch.clamp(x, min=1.0)) - x - math.lgamma(a))
    elif rule.fusion == "min":
        log_group_p = torch.clamp(np.log(k) - t, max=0.0)
    else:
        log_group_p = torch.clamp(-torch.log(t), max=0.0)
    return -torch.minimum(log_group_p - np.log1p(-share), log_p[rule.screen] - np.log(share))


class DetectorMirror:
    """The whole detector in torch: pixels -> logits, scores, p-values and each flag's fused statistic.

    Parameters
    ----------
    detector : Detector
        Loaded with :meth:`Detector.load`; its ONNX file, scorers, calibrators and flag rules are mirrored.
    settings : MirrorSettings, optional

    Raises
    ------
    NotImplementedError
        A scorer kind has no entry in :data:`SCORE_MIRRORS` (add one to attack that scorer).
    """

    def __init__(self, detector: Detector, settings: MirrorSettings = MirrorSettings()):
        missing = sorted({s.kind for s in detector.scorers} - set(SCORE_MIRRORS))
        if missing:
            raise NotImplementedError(f"no differentiable mirror for the scorer kinds {missing}: add them to SCORE_MIRRORS")
        self.detector = detector
        self.settings = settings
        self.capture = list(detector.model.capture)
        self.network = onnx_to_torch(detector.model.capture_model(), self.capture)  # channel means included
        context = _MirrorContext(settings, self.classify)
        self._scorers: list[tuple[Scorer, ScoreMirror]] = [(s, SCORE_MIRRORS[s.kind](s, context)) for s in detector.scorers]
        self._conformal = {name: SmoothConformal(detector.calibrators[name], settings) for name in detector.score_names}
        self.rules = {rule.name: rule for rule in detector.manifest.flags}

    @property
    def score_names(self) -> list[str]:
        """Every score the detector gives, in its order."""
        return list(self.detector.score_names)

    def threshold(self, rule: str, fpr: float) -> float:
        """The serving threshold of flag ``rule`` at the calibrated false-positive rate ``fpr``."""
        return Detector._threshold(self.rules[rule], fpr)

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (n, n_classes) and the captured activations of a float32 batch ``x`` (n, ...)."""
        out = self.network(x)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        return out[0], dict(zip(self.capture, out[1:]))

    def forward(self, x: torch.Tensor, scores: Sequence[str] | None = None) -> MirrorOutput:
        """Mirror the detector on the batch ``x`` (n, ...) float32, differentiably.

        Parameters
        ----------
        x : Tensor
            Pixels as the ONNX model takes them; set ``requires_grad`` to get input gradients.
        scores : sequence of str, optional
            Compute only the scorers giving these scores (default: all). Statistics are returned for the
            flag rules whose scores are all computed.
        """
        wanted = set(self.score_names if scores is None else scores)
        unknown = wanted - set(self.score_names)
        if unknown:
            raise InvalidInput(f"unknown scores {sorted(unknown)}; the detector gives {self.score_names}")
        logits, activations = self.classify(x)
        run = MirrorPass(x, logits, activations, logits.detach().argmax(dim=1).numpy().astype(np.int64))
        raw: dict[str, torch.Tensor] = {}
        for scorer, mirror in self._scorers:
            if wanted & set(scorer.score_names):
                raw.update(mirror(run))
        raw = {n: s for n, s in raw.items() if n in wanted}
        log_p = {n: self._conformal[n](s, run.predicted) for n, s in raw.items()}
        statistics = {name: fuse(rule, log_p) for name, rule in self.rules.items() if set(rule.members) <= set(log_p)}
        return MirrorOutput(logits, run.predicted, raw, log_p, statistics)

    __call__ = forward
