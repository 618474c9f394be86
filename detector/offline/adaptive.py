"""Adaptive attacks on the detector: white-box through its mirror, score-based through its outputs.

An attacker who knows the detector wants an input that is misclassified **and** not flagged. Each attack
here optimises, per input,

    L(x) = max(m(x), -kappa) + lambda * max(T(x) / t - 0.8, 0),     m(x) = z_y(x) - max_{j != y} z_j(x),

where z are the logits, y the true class, T the flag's fused statistic (``adversarial_score``), t its
threshold at 5 % FPR and kappa a margin: once misclassified by kappa, and once T is 20 % below the
threshold, a term stops pulling (the hinge form of Carlini & Wagner's detector attacks). lambda = 0 is
the attack that ignores the detector.

- :func:`pgd_attack`: projected gradient descent through :class:`~detector.offline.mirror.DetectorMirror`
  in an L-inf ball (sign steps; optionally only on the pixels that are non-zero in the clean image, the
  digit) or an L2 ball (normalised steps). ``orthogonal=True`` is Orthogonal PGD (Bryniarski et al.
  2022): while the input is still classified correctly it steps on m orthogonally to the gradient of T,
  once misclassified on T orthogonally to the gradient of m.
- :func:`cw_l2_attack`: Carlini-Wagner L2 (Adam in tanh space, loss ||delta||^2 + c max(m, -kappa)) that
  ignores the detector; the median L2 of its successes sets the L2 budgets.
- :func:`square_attack`: the score-based Square attack (Andriushchenko et al. 2020) in an L-inf ball,
  querying the real :class:`~detector.pipeline.Detector` and reading only what the Open Inference
  Protocol returns: the probabilities and ``adversarial_score`` (the margin uses log-probabilities).

Every candidate is rounded to 8-bit pixels and judged on the **real** detector (ONNX Runtime + numba), not
on the mirror (:class:`Judge`); an input counts as evading at a false-positive rate if some iterate is
misclassified and its statistic is at most the threshold calibrated for that rate (the attacker keeps the
best iterate it has seen, as a white-box attacker who can run the detector would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from detector.offline.attacks import round_to_grid
from detector.offline.mirror import DetectorMirror
from detector.pipeline import Detector

__all__ = ["Budget", "Judge", "Outcome", "cw_l2_attack", "pgd_attack", "square_attack"]


@dataclass(frozen=True)
class Budget:
    """A perturbation budget: ``norm`` "linf" or "l2", radius ``eps`` (pixel units), ``foreground`` only or not."""

    norm: str
    eps: float
    foreground: bool = False

    def mask(self, x: np.ndarray) -> np.ndarray:
        """1 where a pixel may change (the clean image's non-zero pixels when ``foreground``), float32."""
        return (x > 0).astype(np.float32) if self.foreground else np.ones_like(x, dtype=np.float32)

    def project(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``delta`` (n, ...) masked and projected onto the ball of radius ``eps``."""
        delta = delta * mask
        if self.norm == "linf":
            return torch.clamp(delta, -self.eps, self.eps)
        norm = delta.reshape(len(delta), -1).norm(dim=1).clamp(min=1e-12)
        factor = torch.clamp(self.eps / norm, max=1.0)
        return delta * factor.reshape(-1, *([1] * (delta.dim() - 1)))


@dataclass
class Outcome:
    """What an attack achieved on each input, judged on the real detector (every field: ndarray (n,), bool).

    Attributes
    ----------
    misclassified : some iterate is misclassified.
    evaded : per false-positive rate, some iterate is misclassified and not flagged.
    evaded_scorer : per (score name, false-positive rate), some iterate is misclassified and that score's own
        conformal p-value is >= the rate (the score alone, thresholded at its p-value, would not flag it).
    """

    misclassified: np.ndarray
    evaded: dict[float, np.ndarray]
    evaded_scorer: dict[tuple[str, float], np.ndarray] = field(default_factory=dict)

    @staticmethod
    def union(outcomes: Sequence["Outcome"]) -> "Outcome":
        """Per input, the best of several attacks (the strongest attack is the best one on each input)."""
        first = outcomes[0]
        return Outcome(np.logical_or.reduce([o.misclassified for o in outcomes]),
                       {f: np.logical_or.reduce([o.evaded[f] for o in outcomes]) for f in first.evaded},
                       {k: np.logical_or.reduce([o.evaded_scorer[k] for o in outcomes]) for k in first.evaded_scorer})


class Judge:
    """Runs candidates through the real detector and remembers, per input, what some candidate achieved.

    Parameters
    ----------
    detector : Detector
    y : ndarray of shape (n,), int
        True classes.
    fprs : sequence of float
        Calibrated false-positive rates to judge at.
    rule : str
        The flag that must not fire.
    """

    def __init__(self, detector: Detector, y: np.ndarray, fprs: Sequence[float] = (0.01, 0.05), rule: str = "adversarial"):
        self.detector, self.y, self.fprs, self.rule = detector, np.asarray(y), tuple(fprs), rule
        flag = next(r for r in detector.manifest.flags if r.name == rule)
        self.thresholds = {f: Detector._threshold(flag, f) for f in self.fprs}
        n = len(self.y)
        self.outcome = Outcome(np.zeros(n, bool), {f: np.zeros(n, bool) for f in self.fprs},
                               {(s, f): np.zeros(n, bool) for s in detector.score_names for f in self.fprs})
        self.queries = 0

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Judge one candidate per input, ``x`` (n, ...) (8-bit already).

        Returns what the Open Inference Protocol would: probabilities (n, n_classes), the fused statistic (n,),
        and whether each candidate is misclassified (n,).
        """
        detections = self.detector.detect(x).detections
        self.queries += len(x)
        probabilities = np.stack([d.probabilities for d in detections])
        statistic = np.array([d.statistics[self.rule] for d in detections])
        wrong = np.array([d.predicted_class for d in detections]) != self.y
        self.outcome.misclassified |= wrong
        for f, t in self.thresholds.items():
            self.outcome.evaded[f] |= wrong & (statistic <= t)
            for s in self.detector.score_names:
                self.outcome.evaded_scorer[(s, f)] |= wrong & (np.array([d.p_values[s] for d in detections]) >= f)
        return probabilities, statistic, wrong


def _margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """max(z_y - max_{j != y} z_j, -kappa) per input: below 0 means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -torch.inf).max(dim=1).values
    return torch.clamp(true - other, min=-kappa)


def _flat(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(len(g), -1)


def _orthogonal(g: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """The component of each row of ``g`` orthogonal to the same row of ``against``."""
    a, b = _flat(g), _flat(against)
    coefficient = (a * b).sum(dim=1, keepdim=True) / (b * b).sum(dim=1, keepdim=True).clamp(min=1e-30)
    return (a - coefficient * b).reshape(g.shape)


def pgd_attack(mirror: DetectorMirror, judge: Judge, x: np.ndarray, budget: Budget, lam: float = 0.0,
               steps: int = 40, step_size: float | None = None, kappa: float = 1.0, orthogonal: bool = False,
               start: np.ndarray | None = None, rule: str = "adversarial") -> Outcome:
    """PGD (or Orthogonal PGD) on ``L = max(m, -kappa) + lam * max(T / t - 0.8, 0)`` through the mirror (module docstring).

    Parameters
    ----------
    mirror : DetectorMirror
    judge : Judge
        Holds the true classes; every iterate, rounded to 8-bit, is judged on the real detector.
    x : ndarray of shape (n, ...), float32
        Clean inputs in [0, 1].
    budget : Budget
    lam : float
        Weight of the detector term (0: the attack ignores the detector).
    steps : int
    step_size : float, optional
        Default eps / 8 (L-inf) or eps / 5 (L2); halved after half the steps and again after three quarters.
    kappa : float
        Logit margin beyond which misclassification stops paying.
    orthogonal : bool
        Orthogonal PGD (Bryniarski et al. 2022) instead of the summed loss; ``lam`` is then unused.
    start : ndarray like ``x``, optional
        Starting point (projected onto the budget; judged too); default ``x`` itself.

    Returns
    -------
    Outcome
        ``judge.outcome`` after the attack (it accumulates over calls).
    """
    y = torch.from_numpy(judge.y.astype(np.int64))
    mask = torch.from_numpy(budget.mask(x))
    x0 = torch.from_numpy(x)
    step = step_size if step_size is not None else budget.eps / (8.0 if budget.norm == "linf" else 5.0)
    threshold = mirror.threshold(rule, 0.05)
    members = list(mirror.rules[rule].scores)
    delta = torch.zeros_like(x0)
    if start is not None:
        delta = budget.project(torch.from_numpy(np.clip(start, 0.0, 1.0).astype(np.float32)) - x0, mask)
        judge(round_to_grid((x0 + delta).numpy()))
    for t in range(steps):
        size = step * 0.5 ** ((t >= steps // 2) + (t >= 3 * steps // 4))  # halved at 1/2 and 3/4 of the run
        xt = torch.clamp(x0 + delta, 0.0, 1.0).requires_grad_(True)
        if lam == 0.0 and not orthogonal:
            logits, _ = mirror.classify(xt)
            grad = torch.autograd.grad(_margin(logits, y, kappa).sum(), xt)[0]
        else:
            out = mirror(xt, scores=members)
            margin, detect = _margin(out.logits, y, kappa), out.statistics[rule] / threshold
            if orthogonal:
                g_margin = torch.autograd.grad(margin.sum(), xt, retain_graph=True)[0]
                g_detect = torch.autograd.grad(detect.sum(), xt)[0]
                wrong = (out.logits.detach().argmax(dim=1) != y).reshape(-1, *([1] * (x0.dim() - 1)))
                grad = torch.where(wrong, _orthogonal(g_detect, g_margin), _orthogonal(g_margin, g_detect))
            else:
                grad = torch.autograd.grad((margin + lam * torch.relu(detect - 0.8)).sum(), xt)[0]
        grad = grad * mask
        if budget.norm == "linf":
            delta = delta - size * torch.sign(grad)
        else:
            delta = delta - size * grad / _flat(grad).norm(dim=1).clamp(min=1e-12).reshape(-1, *([1] * (x0.dim() - 1)))
        delta = budget.project(torch.clamp(x0 + delta, 0.0, 1.0) - x0, mask).detach()
        judge(round_to_grid((x0 + delta).numpy()))
    return judge.outcome


def cw_l2_attack(mirror: DetectorMirror, detector: Detector, x: np.ndarray, y: np.ndarray, c: float = 10.0,
                 kappa: float = 0.0, steps: int = 100, learning_rate: float = 0.05) -> np.ndarray:
    """Carlini-Wagner L2 that ignores the detector: the smallest L2 of a misclassified 8-bit iterate per input.

    Minimises ||x' - x||^2 + c max(m(x'), -kappa) over x' = (tanh(w) + 1) / 2 with Adam; each iterate is
    rounded to 8-bit and classified by the real model (ONNX Runtime).

    Returns
    -------
    ndarray of shape (n,), float64
        L2 distance (pixel units) of the closest misclassified rounded iterate; inf where none was found.
    """
    x0 = torch.from_numpy(x)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    w = torch.atanh(torch.clamp(2.0 * x0 - 1.0, -1 + 1e-6, 1 - 1e-6)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=learning_rate)
    best = np.full(len(x), np.inf)
    for _ in range(steps):
        xt = (torch.tanh(w) + 1.0) / 2.0
        logits, _ = mirror.classify(xt)
        loss = ((xt - x0) ** 2).reshape(len(x), -1).sum(dim=1) + c * _margin(logits, yt, kappa)
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
        rounded = round_to_grid(((torch.tanh(w) + 1.0) / 2.0).detach().numpy())
        wrong = detector.classify(rounded).predicted != np.asarray(y)
        distance = np.linalg.norm((rounded - x).reshape(len(x), -1), axis=1)
        best = np.where(wrong, np.minimum(best, distance), best)
    return best


def square_attack(judge: Judge, x: np.ndarray, budget: Budget, lam: float = 0.0, queries: int = 1000,
                  p_init: float = 0.1, kappa: float = 1.0, seed: int = 0) -> Outcome:
    """Score-based Square attack (L-inf) on the real detector, seeing only probabilities and ``adversarial_score``.

    Loss per input: max(log p_y - max_{j != y} log p_j, -kappa) + lam * T / t (t: the threshold at 5 % FPR,
    which an operator's documentation or the flag itself reveals). A candidate changes a random square
    window to +-eps (masked to the budget's pixels) and is kept when it lowers the loss. The window's share
    of the image follows Andriushchenko et al.'s schedule from ``p_init``. One query = one input judged.

    Returns
    -------
    Outcome
        ``judge.outcome`` after the attack.
    """
    rng = np.random.default_rng(seed)
    threshold = judge.thresholds[0.05] if 0.05 in judge.thresholds else next(iter(judge.thresholds.values()))
    mask = budget.mask(x)
    n, h, w = len(x), x.shape[-2], x.shape[-1]
    y = judge.y

    def loss(probabilities: np.ndarray, statistic: np.ndarray) -> np.ndarray:
        log_p = np.log(np.clip(probabilities, 1e-300, None))
        true = log_p[np.arange(len(log_p)), y]
        log_p[np.arange(len(log_p)), y] = -np.inf
        return np.maximum(true - log_p.max(axis=1), -kappa) + lam * statistic / threshold

    delta = budget.eps * rng.choice([-1.0, 1.0], size=(n, *x.shape[1:-2], 1, w)).astype(np.float32) * mask
    current = round_to_grid(x + delta)
    best = loss(*judge(current)[:2])
    for i in range(1, queries):
        p = p_init * 0.5 ** int(np.searchsorted([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], i * 10000 // queries))
        side = max(int(round(np.sqrt(p * h * w))), 1)
        candidate = delta.copy()
        for k in range(n):
            r, c = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            sign = rng.choice([-1.0, 1.0], size=(*x.shape[1:-2], 1, 1))
            candidate[k, ..., r:r + side, c:c + side] = budget.eps * sign
        candidate = np.clip(x + candidate * mask, 0.0, 1.0) - x
        probabilities, statistic, _ = judge(round_to_grid(x + candidate))
        value = loss(probabilities, statistic)
        better = value < best
        delta[better], best[better] = candidate[better], value[better]
    return judge.outcome
