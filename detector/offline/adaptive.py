"""Adaptive attacks on the detector: white-box through its mirror, score-based through its outputs.

An attacker who knows the detector wants an input that is misclassified **and** not flagged at the
operating point in use (a false-positive rate f and its threshold t_f, which the flag itself reveals).
The white-box attacks optimise, per input,

    L_f(x) = max(m(x), -kappa) + lambda * max(T(x) / t_f - (1 - s), 0),   m(x) = z_y(x) - max_{j != y} z_j(x),

where z are the logits, y the true class, T the flag's fused statistic (``adversarial_score``) through the
differentiable mirror and s = 0.1 a safety margin (0 in :func:`ddn_attack`): once misclassified by kappa,
and once T is 10 % under the threshold, a term stops pulling (the hinge form of Carlini & Wagner's detector
attacks). Each attack is run once per operating point. lambda = 0 is the plain attack that ignores the detector.

- :func:`pgd_attack`: projected gradient descent in an L-inf ball (sign steps; optionally only on the
  pixels that are non-zero in the clean image, the digit) or an L2 ball; step size halved at 1/2 and 3/4
  of the run; optional random start. ``orthogonal=True`` is Orthogonal PGD (Bryniarski et al. 2022):
  while still classified correctly it steps on m orthogonally to the gradient of T, once misclassified
  on T orthogonally to the gradient of m.
- :func:`cw_l2_attack`: Carlini-Wagner L2, Adam in tanh space on ||x' - x||^2 + c L_f(x') (lambda = 0:
  the plain CW-L2 whose median L2 sets the L2 budgets).
- :func:`ddn_attack`: Decoupled Direction and Norm (Rony et al. 2019), a minimum-L2 attack with normalised
  steps on a sphere that shrinks after each success; adaptive when success also needs T <= t_f.
- :func:`boundary_attack`: an unbounded-L2 attack from the other side: start at a clean image of another
  class that the detector does not flag (:func:`clean_starts`, the nearest such image; a standard
  boundary-attack initialisation), bisect the segment towards the input, then shrink the distance with
  PGD-L2 on L_f inside balls of decreasing radius, keeping every candidate that still evades.
- :func:`square_attack`: the score-based Square attack (Andriushchenko et al. 2020) in an L-inf ball,
  querying the real :class:`~detector.pipeline.Detector` and reading only what the Open Inference
  Protocol returns: the probabilities and ``adversarial_score``. ``staged=True`` first misclassifies
  (the plain attack's loss), then lowers ``adversarial_score`` among misclassified candidates only.

Every candidate is rounded to 8-bit pixels and judged on the **real** detector (ONNX Runtime + numba), not
on the mirror (:class:`Judge`). The judge keeps, per input and per outcome (misclassified; misclassified
and not flagged at f; misclassified and one score's own p-value >= f), the smallest L2 and L-inf distance
of a candidate that achieved it: an attacker keeps the best candidate it has seen, and an attack at budget
b counts as succeeding on an input when some candidate within b did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from detector.offline.attacks import round_to_grid
from detector.offline.mirror import DetectorMirror
from detector.pipeline import Detector

__all__ = ["Budget", "Judge", "Record", "boundary_attack", "clean_starts", "cw_l2_attack", "ddn_attack", "pgd_attack",
           "square_attack"]

#: Safety margin s of the detector hinge: the attack aims 10 % under the threshold (module docstring).
SLACK = 0.1
#: Tolerance of a budget check: rounding to 8-bit moves a pixel by at most half a grey level.
GRID_TOLERANCE = 0.5 / 255 + 1e-6


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
        return _project_l2(delta, torch.full((len(delta),), float(self.eps)))


def _per_input(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _flat(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(len(g), -1)


def _project_l2(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Each row of ``delta`` scaled into the L2 ball of its own ``radius`` (n,)."""
    norm = _flat(delta).norm(dim=1).clamp(min=1e-12)
    return delta * _per_input(torch.clamp(radius.to(delta.dtype) / norm, max=1.0), delta)


@dataclass
class Record:
    """The smallest distance at which an attack achieved each outcome on each input (inf: never).

    Keys: ``"misclassified"``; ``"fused@<f>"`` (misclassified and the flag does not fire at false-positive
    rate f); ``"<score>@<f>"`` (misclassified and that score's own conformal p-value is >= f: the score
    alone, thresholded at its p-value, would not flag it). Values: ndarray (n,) float64 of L2 (``l2``) or
    L-inf (``linf``) distances to the clean input, pixel units.
    """

    l2: dict[str, np.ndarray]
    linf: dict[str, np.ndarray]

    def achieved(self, key: str, norm: str, eps: float) -> np.ndarray:
        """Inputs (n,) bool on which some candidate within ``eps`` (``norm`` "l2" or "linf") achieved ``key``."""
        return (self.l2 if norm == "l2" else self.linf)[key] <= eps + GRID_TOLERANCE

    @staticmethod
    def best(records: Sequence["Record"]) -> "Record":
        """Per input and outcome, the closest candidate of several attacks (an attacker runs them all)."""
        first = records[0]
        return Record({k: np.minimum.reduce([r.l2[k] for r in records]) for k in first.l2},
                      {k: np.minimum.reduce([r.linf[k] for r in records]) for k in first.linf})


class Judge:
    """Runs candidates through the real detector and keeps, per input, the closest candidate of each outcome.

    Parameters
    ----------
    detector : Detector
    x : ndarray of shape (n, ...), float32
        The clean inputs the distances are measured from.
    y : ndarray of shape (n,), int
        True classes.
    fprs : sequence of float
        Calibrated false-positive rates to judge at.
    rule : str
        The flag that must not fire.
    """

    def __init__(self, detector: Detector, x: np.ndarray, y: np.ndarray, fprs: Sequence[float] = (0.01, 0.05),
                 rule: str = "adversarial"):
        self.detector, self.x, self.y, self.fprs, self.rule = detector, np.asarray(x, np.float32), np.asarray(y), tuple(fprs), rule
        flag = next(r for r in detector.manifest.flags if r.name == rule)
        self.thresholds = {f: Detector._threshold(flag, f) for f in self.fprs}
        keys = ["misclassified", *(f"{s}@{f:g}" for s in ("fused", *detector.score_names) for f in self.fprs)]
        n = len(self.y)
        self.record = Record({k: np.full(n, np.inf) for k in keys}, {k: np.full(n, np.inf) for k in keys})
        self.queries = 0

    def __call__(self, x: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Judge one 8-bit candidate per input (``index``: which inputs ``x`` belongs to; default all, in order).

        Returns what the Open Inference Protocol would: probabilities (m, n_classes), the fused statistic (m,),
        and whether each candidate is misclassified (m,).
        """
        index = np.arange(len(self.y)) if index is None else np.asarray(index)
        capture = self.detector.classify(x)
        p_values = self.detector.p_values(self.detector.raw_scores(capture), capture.predicted)
        statistic = self.detector.statistics(p_values)[self.rule]
        self.queries += len(x)
        wrong = capture.predicted != self.y[index]
        diff = (np.asarray(x, np.float64) - self.x[index]).reshape(len(x), -1)
        l2, linf = np.linalg.norm(diff, axis=1), np.abs(diff).max(axis=1)
        reached = {"misclassified": wrong}
        for f, t in self.thresholds.items():
            reached[f"fused@{f:g}"] = wrong & (statistic <= t)
            reached |= {f"{s}@{f:g}": wrong & (p_values[s] >= f) for s in self.detector.score_names}
        for key, hit in reached.items():
            rows = index[hit]
            self.record.l2[key][rows] = np.minimum(self.record.l2[key][rows], l2[hit])
            self.record.linf[key][rows] = np.minimum(self.record.linf[key][rows], linf[hit])
        return capture.probabilities, statistic, wrong

    def evades(self, fpr: float) -> np.ndarray:
        """Inputs (n,) bool on which some candidate so far evaded at ``fpr``."""
        return np.isfinite(self.record.l2[f"fused@{fpr:g}"])


def _margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """max(z_y - max_{j != y} z_j, -kappa) per input: below 0 means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -torch.inf).max(dim=1).values
    return torch.clamp(true - other, min=-kappa)


def _orthogonal(g: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """The component of each row of ``g`` orthogonal to the same row of ``against``."""
    a, b = _flat(g), _flat(against)
    coefficient = (a * b).sum(dim=1, keepdim=True) / (b * b).sum(dim=1, keepdim=True).clamp(min=1e-30)
    return (a - coefficient * b).reshape(g.shape)


def _objective(mirror: DetectorMirror, xt: torch.Tensor, y: torch.Tensor, lam: float, threshold: float,
               kappa: float, rule: str, slack: float = SLACK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """L_f per input (module docstring, with safety margin s = ``slack``), the detached "misclassified" mask of
    the mirror's logits, and the detached mirrored statistic T (None when ``lam`` = 0: the plain attack never
    computes it)."""
    if lam == 0.0:
        logits, _ = mirror.classify(xt)
        return _margin(logits, y, kappa), logits.detach().argmax(dim=1) != y, None
    out = mirror(xt, scores=mirror.rules[rule].members)
    statistic = out.statistics[rule]
    detect = torch.relu(statistic / threshold - (1.0 - slack))
    return _margin(out.logits, y, kappa) + lam * detect, out.logits.detach().argmax(dim=1) != y, statistic.detach()


def _gradient(mirror: DetectorMirror, xt: torch.Tensor, y: torch.Tensor, lam: float, threshold: float, kappa: float,
              orthogonal: bool, rule: str) -> torch.Tensor:
    if not orthogonal:
        return torch.autograd.grad(_objective(mirror, xt, y, lam, threshold, kappa, rule)[0].sum(), xt)[0]
    out = mirror(xt, scores=mirror.rules[rule].members)
    margin, detect = _margin(out.logits, y, kappa), out.statistics[rule] / threshold
    g_margin = torch.autograd.grad(margin.sum(), xt, retain_graph=True)[0]
    g_detect = torch.autograd.grad(detect.sum(), xt)[0]
    wrong = _per_input(out.logits.detach().argmax(dim=1) != y, xt)
    return torch.where(wrong, _orthogonal(g_detect, g_margin), _orthogonal(g_margin, g_detect))


def pgd_attack(mirror: DetectorMirror, judge: Judge, x: np.ndarray, budget: Budget, lam: float = 0.0,
               fpr: float = 0.05, steps: int = 40, step_size: float | None = None, kappa: float = 1.0,
               orthogonal: bool = False, random_start: bool = False, seed: int = 0, rule: str = "adversarial") -> Record:
    """PGD (or Orthogonal PGD) on L_f through the mirror (module docstring); every iterate judged in 8-bit.

    Parameters
    ----------
    mirror : DetectorMirror
    judge : Judge
        Holds the clean inputs and true classes; every iterate, rounded to 8-bit, is judged on the real detector.
    x : ndarray of shape (n, ...), float32
        Clean inputs in [0, 1] (the judge's).
    budget : Budget
    lam : float
        Weight of the detector term (0: the attack ignores the detector).
    fpr : float
        Operating point the detector term aims under (its threshold t_f).
    steps : int
    step_size : float, optional
        Default eps / 4 (L-inf) or eps / 5 (L2); halved after half the steps and again after three quarters.
    kappa : float
        Logit margin beyond which misclassification stops paying.
    orthogonal : bool
        Orthogonal PGD (Bryniarski et al. 2022) instead of the summed loss; ``lam`` is then unused.
    random_start : bool
        Start at a uniformly random point of the budget (seeded by ``seed``) instead of ``x``.

    Returns
    -------
    Record
        ``judge.record`` after the attack (it accumulates over calls).
    """
    y = torch.from_numpy(judge.y.astype(np.int64))
    mask = torch.from_numpy(budget.mask(x))
    x0 = torch.from_numpy(x)
    step = step_size if step_size is not None else budget.eps / (4.0 if budget.norm == "linf" else 5.0)
    threshold = mirror.threshold(rule, fpr)
    delta = torch.zeros_like(x0)
    if random_start:
        noise = np.random.default_rng(seed).uniform(-1.0, 1.0, size=x.shape).astype(np.float32)
        if budget.norm == "l2":
            noise *= budget.eps / np.sqrt(noise[0].size)
        delta = budget.project(torch.clamp(x0 + budget.eps * torch.from_numpy(noise) if budget.norm == "linf"
                                           else x0 + torch.from_numpy(noise), 0.0, 1.0) - x0, mask)
    for t in range(steps):
        size = step * 0.5 ** ((t >= steps // 2) + (t >= 3 * steps // 4))
        xt = torch.clamp(x0 + delta, 0.0, 1.0).requires_grad_(True)
        grad = _gradient(mirror, xt, y, lam, threshold, kappa, orthogonal, rule) * mask
        if budget.norm == "linf":
            delta = delta - size * torch.sign(grad)
        else:
            delta = delta - size * grad / _per_input(_flat(grad).norm(dim=1).clamp(min=1e-12), grad)
        delta = budget.project(torch.clamp(x0 + delta, 0.0, 1.0) - x0, mask).detach()
        judge(round_to_grid((x0 + delta).numpy()))
    return judge.record


def cw_l2_attack(mirror: DetectorMirror, judge: Judge, x: np.ndarray, lam: float = 0.0, fpr: float = 0.05,
                 c: float = 10.0, kappa: float = 0.0, steps: int = 100, learning_rate: float = 0.05,
                 rule: str = "adversarial") -> Record:
    """Carlini-Wagner L2: Adam in tanh space on ||x' - x||^2 + c L_f(x'), x' = (tanh(w) + 1) / 2.

    ``lam`` = 0 is the plain CW-L2 that ignores the detector (``judge.record.l2["misclassified"]`` then holds
    the L2 of its closest misclassified 8-bit iterate per input). Every iterate is rounded and judged.

    Returns
    -------
    Record
        ``judge.record`` after the attack.
    """
    x0 = torch.from_numpy(x)
    yt = torch.from_numpy(judge.y.astype(np.int64))
    threshold = mirror.threshold(rule, fpr)
    w = torch.atanh(torch.clamp(2.0 * x0 - 1.0, -1 + 1e-6, 1 - 1e-6)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=learning_rate)
    for _ in range(steps):
        xt = (torch.tanh(w) + 1.0) / 2.0
        loss = _flat((xt - x0) ** 2).sum(dim=1) + c * _objective(mirror, xt, yt, lam, threshold, kappa, rule)[0]
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
        judge(round_to_grid(((torch.tanh(w) + 1.0) / 2.0).detach().numpy()))
    return judge.record


def ddn_attack(mirror: DetectorMirror, judge: Judge, x: np.ndarray, lam: float = 0.0, fpr: float = 0.05,
               steps: int = 100, gamma: float = 0.05, init_norm: float = 1.0, kappa: float = 0.0,
               foreground: bool = False, rule: str = "adversarial") -> Record:
    """Decoupled Direction and Norm (Rony et al. 2019), a minimum-L2 attack, on L_f through the mirror.

    Each step moves delta by alpha_t (L2, pixel units; cosine-annealed from 1 to 0.01) along
    -grad L_f / ||grad L_f||, then rescales it to the norm eps of the current sphere: eps shrinks by
    (1 - ``gamma``) after an iterate that succeeds and grows by (1 + ``gamma``) otherwise; ``foreground``
    restricts every step to the clean image's non-zero pixels (the digit). Success is "misclassified" for
    ``lam`` = 0 (the plain attack) and "misclassified and the mirrored statistic at most t_f" otherwise, so the
    adaptive attack searches for the smallest sphere on which it evades. The normalised step makes the search
    insensitive to the scale of the detector term, whose large gradients once it fires swamp
    Adam's moment estimates in :func:`cw_l2_attack`. Every iterate is rounded to 8-bit and judged.

    The detector term has no safety margin here (s = 0): it pulls only once T exceeds t_f, so the adaptive
    search follows the plain one wherever the plain iterate is not flagged. The margin of the bounded attacks
    keeps their last iterate under the threshold after rounding; this search judges every iterate, and with
    the margin it turned away from plain iterates that would have evaded, ending farther than plain CW-L2
    and DDN on some inputs at 1 % FPR (LeNet-5, 50 inputs: 1 input farther with s = 0.1, none with s = 0).

    Returns
    -------
    Record
        ``judge.record`` after the attack.
    """
    x0 = torch.from_numpy(x)
    y = torch.from_numpy(judge.y.astype(np.int64))
    mask = torch.from_numpy(Budget("l2", np.inf, foreground).mask(x))
    threshold = mirror.threshold(rule, fpr)
    delta = torch.zeros_like(x0)
    norm = torch.full((len(x),), float(init_norm))
    for t in range(steps):
        alpha = 0.01 + 0.99 * (1.0 + np.cos(np.pi * t / steps)) / 2.0
        xt = torch.clamp(x0 + delta, 0.0, 1.0).requires_grad_(True)
        objective, wrong, statistic = _objective(mirror, xt, y, lam, threshold, kappa, rule, slack=0.0)
        grad = torch.autograd.grad(objective.sum(), xt)[0] * mask
        success = wrong if statistic is None else wrong & (statistic <= threshold)
        unit = grad / _per_input(_flat(grad).norm(dim=1).clamp(min=1e-12), grad)
        norm = torch.where(success, norm * (1.0 - gamma), norm * (1.0 + gamma))
        step = delta - alpha * unit
        delta = step * _per_input(norm / _flat(step).norm(dim=1).clamp(min=1e-12), step)
        delta = (torch.clamp(x0 + delta, 0.0, 1.0) - x0).detach()
        judge(round_to_grid((x0 + delta).numpy()))
    return judge.record


def clean_starts(detector: Detector, x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, pool_y: np.ndarray,
                 fpr: float = 0.05, rule: str = "adversarial") -> np.ndarray:
    """Per input, the nearest (L2) image of ``pool_x`` that is classified as its own label, not as ``y``, and
    not flagged at ``fpr`` (so not at any lower rate either): a point that already evades, for
    :func:`boundary_attack`. Returns ndarray like ``x``; raises ``ValueError`` when the pool has none."""
    capture = detector.classify(pool_x)
    statistic = detector.statistics(detector.p_values(detector.raw_scores(capture), capture.predicted))[rule]
    flag = next(r for r in detector.manifest.flags if r.name == rule)
    usable = (capture.predicted == pool_y) & (statistic <= Detector._threshold(flag, fpr))
    candidates, labels = pool_x[usable].reshape(int(usable.sum()), -1), pool_y[usable]
    flat = x.reshape(len(x), -1)
    distance = (flat ** 2).sum(1)[:, None] + (candidates ** 2).sum(1)[None, :] - 2.0 * flat @ candidates.T
    distance[labels[None, :] == np.asarray(y)[:, None]] = np.inf
    if not np.isfinite(distance.min(axis=1)).all():
        raise ValueError("the pool holds no unflagged, correctly classified image of another class for some input")
    return pool_x[usable][distance.argmin(axis=1)].astype(np.float32)


def boundary_attack(mirror: DetectorMirror, judge: Judge, x: np.ndarray, start: np.ndarray, fpr: float = 0.05,
                    lam: float = 10.0, rounds: int = 8, steps: int = 5, bisections: int = 8, shrink: float = 0.85,
                    kappa: float = 0.5, rule: str = "adversarial") -> Record:
    """Unbounded L2: from ``start`` (evading points, e.g. :func:`clean_starts`) towards ``x``, keeping evasion at ``fpr``.

    1. Bisect the segment x + a (start - x), a in [0, 1], for the smallest a whose 8-bit image still evades
       (``bisections`` queries per input).
    2. ``rounds`` times: shrink the current best perturbation to ``shrink`` times its L2 radius r, then run
       ``steps`` PGD-L2 steps on L_f inside the ball of radius shrink * r (step size r / 10); an input whose
       round found no evading candidate keeps its radius and tries again at (1 + shrink) / 2 of it.

    Returns
    -------
    Record
        ``judge.record`` after the attack (its ``l2["fused@<fpr>"]`` is the closest evading candidate).
    """
    x0 = torch.from_numpy(x)
    y = torch.from_numpy(judge.y.astype(np.int64))
    threshold, served = mirror.threshold(rule, fpr), judge.thresholds[fpr]

    def evades(candidate: np.ndarray) -> np.ndarray:
        _, statistic, wrong = judge(candidate)
        return wrong & (statistic <= served)

    def distance(candidate: np.ndarray) -> np.ndarray:
        return np.linalg.norm((candidate - x).reshape(len(x), -1), axis=1)

    best = round_to_grid(start)
    if not evades(best).all():
        raise ValueError("every start must evade (misclassified and not flagged at fpr): see clean_starts")
    low, high = np.zeros(len(x)), np.ones(len(x))
    for _ in range(bisections):
        mid = (low + high) / 2.0
        candidate = round_to_grid(x + _per_input(torch.from_numpy(mid), x0).numpy() * (start - x))
        hit = evades(candidate)
        high, low = np.where(hit, mid, high), np.where(hit, low, mid)
        best[hit] = candidate[hit]
    factor = np.full(len(x), shrink)
    for _ in range(rounds):
        radius = torch.from_numpy((distance(best) * factor).astype(np.float32))
        delta = _project_l2(torch.from_numpy(best) - x0, radius)
        improved = np.zeros(len(x), bool)
        for _ in range(steps):
            xt = torch.clamp(x0 + delta, 0.0, 1.0).requires_grad_(True)
            grad = torch.autograd.grad(_objective(mirror, xt, y, lam, threshold, kappa, rule)[0].sum(), xt)[0]
            unit = grad / _per_input(_flat(grad).norm(dim=1).clamp(min=1e-12), grad)
            delta = delta - _per_input(radius / 10.0, grad) * unit
            delta = _project_l2(torch.clamp(x0 + delta, 0.0, 1.0) - x0, radius).detach()
            candidate = round_to_grid((x0 + delta).numpy())
            closer = evades(candidate) & (distance(candidate) < distance(best))
            best[closer], improved = candidate[closer], improved | closer
        factor = np.where(improved, shrink, (1.0 + factor) / 2.0)
    return judge.record


def square_attack(judge: Judge, x: np.ndarray, budget: Budget, staged: bool = False, queries: int = 1000,
                  p_init: float = 0.1, kappa: float = 1.0, seed: int = 0) -> Record:
    """Score-based Square attack (L-inf) on the real detector, seeing only probabilities and ``adversarial_score``.

    Loss per input: max(log p_y - max_{j != y} log p_j, -kappa) (the plain attack). ``staged``: once a
    candidate is misclassified, the loss becomes T / t - C (t: the threshold at the judge's largest FPR,
    C a constant above any margin), so a misclassified candidate is only replaced by a misclassified one
    with a lower ``adversarial_score``; until then the attack is the plain one (same seeded proposals). A
    candidate changes a random square window to +-eps (masked to the budget's pixels) and is kept when it
    lowers the loss; the window's share of the image follows Andriushchenko et al.'s schedule from
    ``p_init``. One query = one input judged.

    Returns
    -------
    Record
        ``judge.record`` after the attack.
    """
    rng = np.random.default_rng(seed)
    threshold = judge.thresholds[max(judge.thresholds)]
    mask = budget.mask(x)
    n, h, w = len(x), x.shape[-2], x.shape[-1]
    y = judge.y

    def loss(probabilities: np.ndarray, statistic: np.ndarray, wrong: np.ndarray) -> np.ndarray:
        log_p = np.log(np.clip(probabilities, 1e-300, None))
        true = log_p[np.arange(len(log_p)), y]
        log_p[np.arange(len(log_p)), y] = -np.inf
        margin = np.maximum(true - log_p.max(axis=1), -kappa)
        return np.where(wrong, statistic / threshold - 1e6, margin) if staged else margin

    delta = budget.eps * rng.choice([-1.0, 1.0], size=(n, *x.shape[1:-2], 1, w)).astype(np.float32) * mask
    delta = np.clip(x + delta, 0.0, 1.0) - x
    best = loss(*judge(round_to_grid(x + delta)))
    for i in range(1, queries):
        p = p_init * 0.5 ** int(np.searchsorted([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], i * 10000 // queries))
        side = max(int(round(np.sqrt(p * h * w))), 1)
        candidate = delta.copy()
        for k in range(n):
            r, c = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            sign = rng.choice([-1.0, 1.0], size=(*x.shape[1:-2], 1, 1))
            candidate[k, ..., r:r + side, c:c + side] = budget.eps * sign
        candidate = np.clip(x + candidate * mask, 0.0, 1.0) - x
        value = loss(*judge(round_to_grid(x + candidate)))
        better = value < best
        delta[better], best[better] = candidate[better], value[better]
    return judge.record
