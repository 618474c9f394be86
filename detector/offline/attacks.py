"""Adversarial attacks and a noise baseline, in plain torch, for the offline evaluation.

Every attack takes a classifier ``model`` (a ``torch.nn.Module`` or a TorchScript module from
``torch.jit.load``) mapping images ``x`` of shape (n_samples, ...) -- in this project (N, 1, H, W) --
with pixels in [0, 1] to logits of shape (n_samples, n_classes), plus the true labels ``y``; it
returns an :class:`AttackResult`. All attacks:

- keep ``x_adv`` in [0, 1];
- run the model in eval mode with its parameters' ``requires_grad`` switched off (both restored on
  exit), and differentiate with respect to the input only, so no parameter ``.grad`` is touched;
- are deterministic: the only randomness (PGD's random start, the noise) comes from a
  ``torch.Generator`` / ``numpy.random.Generator`` seeded by ``seed``;
- work on the whole batch at once; iterative attacks drop a sample from the batch as soon as it is done
  where the method allows it (DeepFool always, PGD when ``early_stop=True``, CW aborts a binary-search
  step once the batch loss stops improving).

Success means the model's prediction on ``x_adv`` differs from ``y`` (and for CW with confidence
``kappa`` the adversarial logit margin is at least ``kappa``). It is recomputed from the model on the
returned ``x_adv``, so ``success`` always describes the arrays handed back.

Attacks (see each function for the maths and the source):

========================  ======================================================================
name (:data:`ATTACKS`)    what
========================  ======================================================================
``fgsm``                  Fast Gradient Sign Method, one L-inf step (Goodfellow et al. 2015)
``pgd``                   projected gradient descent, L-inf, random start (Madry et al. 2018)
``pgd_foreground``        PGD restricted to the foreground pixels (background exactly unchanged)
``deepfool``              multi-class DeepFool, L2 (Moosavi-Dezfooli et al. 2016)
``cw_k0``, ``cw_k10``     Carlini-Wagner L2, confidence kappa = 0 / 10 logits (Carlini & Wagner 2017)
``noise``                 additive Gaussian noise, not an attack: a natural-corruption control
========================  ======================================================================

These are the attacks the design's "Honest evaluation" asks for: L-inf attacks change the blank
background of MNIST-like digits and give themselves away, so the detector is judged on high-confidence
CW-L2, DeepFool and foreground PGD, with FGSM/PGD and noise for completeness. Note that CW-L2 and
DeepFool perturbations are dense too (they move background pixels by small amounts); only
``pgd_foreground`` leaves the background bit-for-bit unchanged.

torch is imported at module level: this module lives in ``detector.offline`` and is never imported by
the serving path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import torch

from detector.errors import InvalidInput, ModelError

__all__ = [
    "AttackResult",
    "ATTACKS",
    "ATTACK_DEFAULTS",
    "MARGIN_TOL",
    "ProgressCallback",
    "cw_l2",
    "deepfool",
    "fgsm",
    "gaussian_noise",
    "noise_attack",
    "pgd_foreground",
    "pgd_linf",
    "run_attack",
]

#: ``progress(done, total)`` is called after each iteration of an iterative attack.
ProgressCallback = Callable[[int, int], None]
Progress = Union[bool, ProgressCallback, None]
ArrayLike = Union[np.ndarray, torch.Tensor]

#: Logit margin (logit units) by which an iterate must clear the decision boundary (or ``kappa``) before
#: an iterative attack counts it as fooled and stops working on it. Logits computed for another batch
#: composition, thread count or runtime (ONNX Runtime) differ in the last float32 bits; an iterate that
#: sits exactly on the boundary could then flip back. 1e-3 is far below any margin that matters.
MARGIN_TOL = 1e-3


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttackResult:
    """What an attack produced for a batch of n_samples inputs.

    Attributes
    ----------
    name : str
        The attack's name (the :data:`ATTACKS` key when run through :func:`run_attack`).
    x_adv : ndarray of shape (n_samples, ...), float32
        The perturbed inputs, pixels in [0, 1]. For a sample the attack could not fool this is the
        attack's last iterate (FGSM, PGD, DeepFool, noise) or the clean input itself (CW).
    success : ndarray of shape (n_samples,), bool
        ``argmax model(x_adv) != y``, and for CW with confidence kappa also
        ``max_{j != y} Z_j(x_adv) - Z_y(x_adv) >= kappa`` (Z = logits).
    l2 : ndarray of shape (n_samples,), float64
        ``||x_adv - x||_2`` per sample, in pixel units (pixels in [0, 1]).
    linf : ndarray of shape (n_samples,), float64
        ``||x_adv - x||_inf`` per sample, in pixel units.
    params : mapping
        The attack's parameters (JSON-able), for reports.

    The arrays are fresh copies owned by the result.
    """

    name: str
    x_adv: np.ndarray
    success: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        """Number of inputs attacked."""
        return int(self.success.shape[0])

    @property
    def success_rate(self) -> float:
        """Fraction of inputs whose attack succeeded, in [0, 1] (nan for an empty batch)."""
        return float(self.success.mean()) if self.n_samples else math.nan

    @property
    def mean_l2(self) -> float:
        """Mean L2 perturbation norm over the successful samples (nan if none succeeded)."""
        return float(self.l2[self.success].mean()) if self.success.any() else math.nan

    @property
    def mean_linf(self) -> float:
        """Mean L-inf perturbation norm over the successful samples (nan if none succeeded)."""
        return float(self.linf[self.success].mean()) if self.success.any() else math.nan

    def summary(self) -> dict[str, Any]:
        """Name, sample count, success rate and mean norms (over successes) as a JSON-able dict."""
        return {
            "name": self.name,
            "n_samples": self.n_samples,
            "success_rate": self.success_rate,
            "mean_l2": self.mean_l2,
            "mean_linf": self.mean_linf,
        }


# --------------------------------------------------------------------------------------------------
# Helpers: validation, model mode, progress, result assembly
# --------------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _as_images(x: ArrayLike) -> torch.Tensor:
    """Validate ``x`` (n_samples, ...) with finite pixels in [0, 1]; return a float32 CPU tensor."""
    if isinstance(x, torch.Tensor):
        xt = x.detach().to(device="cpu", dtype=torch.float32).clone()
    else:
        xa = np.asarray(x)
        if xa.dtype.kind not in "fiub":
            raise InvalidInput(f"x must be a numeric array of images in [0, 1], got dtype {xa.dtype}")
        xt = torch.from_numpy(np.array(xa, dtype=np.float32))  # a copy: never alias the caller's array
    if xt.ndim < 2:
        raise InvalidInput(f"x must have shape (n_samples, ...) e.g. (N, 1, H, W), got shape {tuple(xt.shape)}")
    if xt.shape[0] == 0:
        raise InvalidInput("x is empty: expected at least one sample")
    if not torch.isfinite(xt).all():
        raise InvalidInput("x contains NaN or Inf: expected finite pixels in [0, 1]")
    lo, hi = float(xt.min()), float(xt.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInput(f"x must hold pixels in [0, 1], got values in [{lo:g}, {hi:g}]")
    return xt.contiguous()


def _as_inputs(model: torch.nn.Module, x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert ``x`` (n_samples, ...) in [0, 1] and ``y`` (n_samples,) to tensors on the model's device."""
    xt = _as_images(x).to(_model_device(model))
    ya = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if ya.ndim != 1 or ya.shape[0] != xt.shape[0]:
        raise InvalidInput(f"y must have shape ({xt.shape[0]},) to match x, got shape {ya.shape}")
    if ya.dtype.kind not in "iu":
        if ya.dtype.kind == "f" and np.all(np.isfinite(ya)) and np.all(ya == np.round(ya)):
            ya = ya.astype(np.int64)
        else:
            raise InvalidInput(f"y must hold integer class labels, got dtype {ya.dtype}")
    if ya.min() < 0:
        raise InvalidInput(f"y must hold class labels >= 0, got {int(ya.min())}")
    return xt, torch.from_numpy(ya.astype(np.int64)).to(xt.device)


def _check_logits(logits: torch.Tensor, n: int, y: torch.Tensor | None) -> None:
    if logits.ndim != 2 or logits.shape[0] != n:
        raise ModelError(f"the model must return logits of shape ({n}, n_classes), got shape {tuple(logits.shape)}")
    if y is not None and int(y.max()) >= logits.shape[1]:
        raise InvalidInput(f"y holds label {int(y.max())} but the model has only {logits.shape[1]} classes")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidInput(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise InvalidInput(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter for the duration; both restored on exit."""
    if not isinstance(model, torch.nn.Module):  # ScriptModule is a Module subclass
        raise ModelError(f"model must be a torch.nn.Module or a TorchScript module, got {type(model).__name__}")
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _Progress:
    """Report ``(done, total)`` to a callback, a tqdm bar (``progress=True``) or nowhere (False/None)."""

    def __init__(self, progress: Progress, total: int, desc: str) -> None:
        self.total = total
        self.done = 0
        self._bar = None
        self._callback: ProgressCallback | None = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)
        elif callable(progress):
            self._callback = progress
        elif progress not in (False, None):
            raise InvalidInput(f"progress must be a bool or a callable(done, total), got {type(progress).__name__}")

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} Z_j - Z_y`` per row, shape (n_samples,): > 0 means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return other - true


def _is_success(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """The reported success: ``argmax != y`` and, if ``kappa > 0``, ``margin >= kappa``."""
    success = logits.argmax(dim=1) != y
    if kappa > 0:
        success &= _margins(logits, y) >= kappa
    return success


def _is_fooled(logits: torch.Tensor, y: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    """The criterion inside attack loops: ``margin >= kappa + MARGIN_TOL`` (implies :func:`_is_success`)."""
    return _margins(logits, y) >= kappa + MARGIN_TOL


def _finish(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    params: Mapping[str, Any],
    kappa: float = 0.0,
) -> AttackResult:
    """Recompute success on the returned ``x_adv`` and measure the perturbation norms."""
    x_adv = x_adv.detach().clamp(0.0, 1.0)
    with torch.no_grad():
        logits = model(x_adv)
    _check_logits(logits, x.shape[0], y)
    delta = (x_adv - x).flatten(1).double()
    return AttackResult(
        name=name,
        x_adv=x_adv.cpu().numpy().astype(np.float32, copy=False),
        success=_is_success(logits, y, kappa).cpu().numpy(),
        l2=delta.norm(dim=1).cpu().numpy(),
        linf=delta.abs().amax(dim=1).cpu().numpy(),
        params=dict(params),
    )


def _loss_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at ``x`` and the gradient of the summed cross-entropy with respect to ``x``."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    _check_logits(logits, x.shape[0], y)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return logits.detach(), grad


# --------------------------------------------------------------------------------------------------
# L-inf attacks
# --------------------------------------------------------------------------------------------------


def fgsm(model: torch.nn.Module, x: ArrayLike, y: ArrayLike, eps: float = 0.3) -> AttackResult:
    """Fast Gradient Sign Method: one L-inf step up the loss.

    Parameters
    ----------
    model : torch.nn.Module or TorchScript module
        Classifier mapping (n_samples, ...) in [0, 1] to logits (n_samples, n_classes).
    x : array-like of shape (n_samples, ...), float, in [0, 1]
        Clean inputs (in this project (N, 1, H, W)).
    y : array-like of shape (n_samples,), int
        True labels.
    eps : float, default 0.3
        L-inf budget in pixel units.

    Returns
    -------
    AttackResult
        ``linf <= eps`` for every sample.

    Notes
    -----
    ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)`` (Goodfellow, Shlens & Szegedy 2015,
    "Explaining and harnessing adversarial examples"; "move along the sign of the gradient of the
    loss" in the background lecture ``papers/004``). Deterministic, no randomness.
    """
    eps = _check_positive("eps", eps, allow_zero=True)
    xt, yt = _as_inputs(model, x, y)
    with _frozen_eval(model):
        _, grad = _loss_gradient(model, xt, yt)
        x_adv = (xt + eps * grad.sign()).clamp(0.0, 1.0)
        return _finish("fgsm", model, xt, x_adv, yt, {"eps": eps})


def _pgd(
    name: str,
    model: torch.nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: float,
    step: float | None,
    n_steps: int,
    random_start: bool,
    seed: int,
    early_stop: bool,
    progress: Progress,
    mask_threshold: float | None,
) -> AttackResult:
    eps = _check_positive("eps", eps, allow_zero=True)
    n_steps = _check_count("n_steps", n_steps, minimum=0)
    step = 2.5 * eps / max(n_steps, 1) if step is None else _check_positive("step", step, allow_zero=True)
    xt, yt = _as_inputs(model, x, y)
    params: dict[str, Any] = {
        "eps": eps, "step": step, "n_steps": n_steps, "random_start": bool(random_start),
        "seed": int(seed), "early_stop": bool(early_stop),
    }
    if mask_threshold is None:
        mask = None
    else:
        params["threshold"] = float(mask_threshold)
        mask = xt > mask_threshold  # foreground: the only pixels PGD may change

    lower, upper = (xt - eps).clamp(0.0, 1.0), (xt + eps).clamp(0.0, 1.0)
    view = (-1,) + (1,) * (xt.ndim - 1)

    def project(candidate: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        projected = torch.minimum(torch.maximum(candidate, lower[rows]), upper[rows])
        if mask is not None:  # exact: background pixels are copied, not re-computed
            projected = torch.where(mask[rows], projected, xt[rows])
        return projected

    x_adv = xt.clone()
    if random_start and eps > 0:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.empty(xt.shape, dtype=xt.dtype).uniform_(-eps, eps, generator=generator)
        x_adv = project(xt + noise.to(xt.device), slice(None))

    bar = _Progress(progress, n_steps, name)
    with _frozen_eval(model):
        # `best` holds, per sample, its latest fooled iterate (if any; `ever_fooled` says which do):
        # a late step can undo an earlier flip, and a flip is what the evaluation counts.
        best = x_adv.clone()
        ever_fooled = torch.zeros(xt.shape[0], dtype=torch.bool, device=xt.device)
        active = torch.ones(xt.shape[0], dtype=torch.bool, device=xt.device)
        try:
            for _ in range(n_steps):
                rows = active.nonzero()[:, 0]
                if rows.numel() == 0:
                    break
                logits, grad = _loss_gradient(model, x_adv[rows], yt[rows])
                fooled = _is_fooled(logits, yt[rows])
                best[rows] = torch.where(fooled.view(view), x_adv[rows], best[rows])
                ever_fooled[rows[fooled]] = True
                if early_stop:
                    active[rows[fooled]] = False
                    keep = ~fooled
                    rows, grad = rows[keep], grad[keep]
                x_adv[rows] = project(x_adv[rows] + step * grad.sign(), rows)
                bar.update()
        finally:
            bar.close()
        with torch.no_grad():
            fooled = _is_fooled(model(x_adv), yt)
        x_final = torch.where((ever_fooled & ~fooled).view(view), best, x_adv)  # keep an earlier flip
        return _finish(name, model, xt, x_final, yt, params)


def pgd_linf(
    model: torch.nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    eps: float = 0.3,
    step: float | None = None,
    n_steps: int = 40,
    random_start: bool = True,
    seed: int = 0,
    *,
    early_stop: bool = False,
    progress: Progress = False,
) -> AttackResult:
    """Projected gradient descent in the L-inf ball (untargeted, cross-entropy loss).

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm`.
    eps : float, default 0.3
        L-inf budget in pixel units.
    step : float, optional
        Step size in pixel units; default ``2.5 * eps / n_steps`` (Madry et al.'s rule: enough to cross
        the ball and back).
    n_steps : int, default 40
        Number of gradient steps.
    random_start : bool, default True
        Start from ``x + U(-eps, eps)`` (projected), drawn from a ``torch.Generator`` seeded by ``seed``.
    seed : int, default 0
        Seed of the random start; the same seed gives the same ``x_adv``.
    early_stop : bool, default False
        Stop updating a sample as soon as it is misclassified. Off by default: full-budget PGD is the
        standard attack and gives confident adversarials; stopping at the first flip leaves inputs
        on the decision boundary, which a max-softmax detector catches for free.
    progress : bool or callable, default False
        ``True`` for a tqdm bar, or ``progress(done, total)`` called after each step.

    Returns
    -------
    AttackResult
        ``linf <= eps``. Per sample, the final iterate, or the latest misclassified iterate if the
        final one is classified correctly again.

    Notes
    -----
    ``x_{t+1} = Proj_{B_inf(x, eps) cap [0,1]^d}(x_t + step * sign(grad_x CE(f(x_t), y)))``
    (Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks").
    """
    return _pgd(
        "pgd", model, x, y, eps=eps, step=step, n_steps=n_steps, random_start=random_start, seed=seed,
        early_stop=early_stop, progress=progress, mask_threshold=None,
    )


def pgd_foreground(
    model: torch.nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    eps: float = 0.3,
    step: float | None = None,
    n_steps: int = 40,
    random_start: bool = True,
    seed: int = 0,
    threshold: float = 0.0,
    *,
    early_stop: bool = False,
    progress: Progress = False,
) -> AttackResult:
    """PGD-L-inf restricted to the foreground pixels ``x > threshold``; the background is untouched.

    Parameters
    ----------
    model, x, y, step, n_steps, random_start, seed, early_stop, progress
        As in :func:`pgd_linf`.
    eps : float, default 0.3
        L-inf budget in pixel units, the same default as :func:`pgd_linf` so that the two differ only
        by the mask. Only the foreground (about half of an 8x8 digit, a fifth of an MNIST digit) may
        move; on 8x8 digits eps = 0.3 still flips nearly every prediction, on MNIST a larger eps may
        be needed.
    threshold : float, default 0.0
        A pixel is foreground when ``x > threshold``. Background pixels of ``x_adv`` are copied from
        ``x`` bit for bit.

    Returns
    -------
    AttackResult
        ``linf <= eps`` and ``x_adv == x`` wherever ``x <= threshold``.

    Notes
    -----
    The PGD update of :func:`pgd_linf` followed by ``x_adv = where(x > threshold, x_adv, x)``, i.e. a
    projection onto ``{x' : |x' - x| <= eps, x' in [0,1], x'_i = x_i for background i}``. The attack
    does not change the count or position of the non-zero pixels, so input statistics that flag plain
    L-inf attacks on MNIST-like data (background noise) do not see it (design, "Honest evaluation").
    """
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise InvalidInput(f"threshold must be finite, got {threshold!r}")
    return _pgd(
        "pgd_foreground", model, x, y, eps=eps, step=step, n_steps=n_steps, random_start=random_start,
        seed=seed, early_stop=early_stop, progress=progress, mask_threshold=threshold,
    )


# --------------------------------------------------------------------------------------------------
# DeepFool
# --------------------------------------------------------------------------------------------------


def deepfool(
    model: torch.nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    n_classes: int | None = None,
    overshoot: float = 0.02,
    max_iter: int = 50,
    *,
    progress: Progress = False,
) -> AttackResult:
    """Multi-class DeepFool (L2): iterate to the nearest linearised decision boundary.

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm`. The class to move away from is ``y`` (for the correctly classified inputs
        the evaluation uses, ``y`` is the model's prediction, as in the paper).
    n_classes : int, optional
        Consider only ``y`` and the ``n_classes - 1`` other classes with the highest clean logits (the
        reference implementation's ``num_classes``); default all classes.
    overshoot : float, default 0.02
        The accumulated perturbation is scaled by ``1 + overshoot`` to land past the boundary.
    max_iter : int, default 50
        Maximum number of linearisation steps.
    progress : bool or callable, default False
        ``True`` for a tqdm bar, or ``progress(done, total)`` called after each iteration.

    Returns
    -------
    AttackResult
        Per sample, the first iterate that is misclassified, or the last one after ``max_iter``.

    Notes
    -----
    Moosavi-Dezfooli, Fawzi & Frossard 2016, "DeepFool: a simple and accurate method to fool deep
    neural networks", Algorithm 2 ("go outside the convex polyhedral cone", ``papers/004``). At the
    current iterate x_i, with f the logits and k the candidate classes other than y:

    ``w_k = grad f_k(x_i) - grad f_y(x_i)``, ``f'_k = f_k(x_i) - f_y(x_i)``,
    ``l = argmin_k |f'_k| / ||w_k||_2``, ``r_i = (|f'_l| + 1e-4) / ||w_l||_2^2 * w_l``,
    ``x_{i+1} = clip(x + (1 + overshoot) * sum_i r_i, 0, 1)``.

    A sample leaves the loop once ``max_{j != y} f_j(x_i) - f_y(x_i) >= MARGIN_TOL`` (misclassified,
    robustly to float noise; the overshoot normally gives far more). One forward pass per iteration on the still
    active samples, then one backward pass per candidate class; all vectorised over the batch.
    """
    overshoot = _check_positive("overshoot", overshoot, allow_zero=True)
    max_iter = _check_count("max_iter", max_iter, minimum=1)
    xt, yt = _as_inputs(model, x, y)
    with _frozen_eval(model):
        with torch.no_grad():
            logits0 = model(xt)
        _check_logits(logits0, xt.shape[0], yt)
        n_total = logits0.shape[1]
        n_cand = n_total if n_classes is None else min(_check_count("n_classes", n_classes, minimum=2), n_total)
        others = logits0.scatter(1, yt[:, None], float("-inf")).argsort(dim=1, descending=True)
        candidates = torch.cat([yt[:, None], others[:, : n_cand - 1]], dim=1)  # (N, n_cand), y first
        params = {"n_classes": n_cand, "overshoot": overshoot, "max_iter": max_iter}

        x_adv = xt.clone()
        r_total = torch.zeros_like(xt)
        active = torch.ones(xt.shape[0], dtype=torch.bool, device=xt.device)
        bar = _Progress(progress, max_iter, "deepfool")
        try:
            for _ in range(max_iter):
                rows = active.nonzero()[:, 0]
                if rows.numel() == 0:
                    break
                xa = x_adv[rows].requires_grad_(True)
                logits = model(xa)
                fooled = _is_fooled(logits.detach(), yt[rows])
                active[rows[fooled]] = False
                if bool(fooled.all()):
                    break
                f = logits.gather(1, candidates[rows])  # (M, n_cand)
                grads = torch.stack(
                    [torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < n_cand - 1)[0] for j in range(n_cand)],
                    dim=1,
                )  # (M, n_cand, ...): sample m's logit depends on sample m only (eval mode)
                keep = ~fooled
                rows, f, grads = rows[keep], f[keep].detach(), grads[keep]
                w = (grads[:, 1:] - grads[:, :1]).flatten(2)  # (M, n_cand - 1, D)
                f_diff = (f[:, 1:] - f[:, :1]).abs()  # (M, n_cand - 1)
                w_norm = w.norm(dim=2).clamp_min(1e-12)
                nearest = (f_diff / w_norm).argmin(dim=1)
                pick = torch.arange(rows.numel(), device=xt.device)
                w_l, f_l, n_l = w[pick, nearest], f_diff[pick, nearest], w_norm[pick, nearest]
                r = ((f_l + 1e-4) / n_l.square())[:, None] * w_l
                r_total[rows] += r.view(-1, *xt.shape[1:])
                x_adv[rows] = (xt[rows] + (1.0 + overshoot) * r_total[rows]).clamp(0.0, 1.0)
                bar.update()
        finally:
            bar.close()
        return _finish("deepfool", model, xt, x_adv, yt, params)


# --------------------------------------------------------------------------------------------------
# Carlini-Wagner L2
# --------------------------------------------------------------------------------------------------


def cw_l2(
    model: torch.nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    kappa: float = 0.0,
    c: float = 1.0,
    steps: int = 100,
    lr: float = 0.1,
    binary_search_steps: int = 6,
    *,
    abort_early: bool = True,
    progress: Progress = False,
) -> AttackResult:
    """Carlini-Wagner L2 attack (untargeted) with confidence ``kappa`` and a binary search over ``c``.

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm`.
    kappa : float, default 0.0
        Confidence in logit units: a success needs ``max_{j != y} Z_j - Z_y >= kappa``.
    c : float, default 1.0
        Initial trade-off constant (per sample, then binary-searched). The default suits logits of
        order 10 and perturbations of L2 order 1 on [0, 1] images: Carlini & Wagner start at 1e-3 but
        run 9 search steps of up to 10,000 iterations at lr 0.01; we start nearer the answer and take
        larger steps. On the digits demo models, the defaults (6 x 100 steps, lr 0.1) find mean L2
        within 1 % of 9 x 1,000 steps at lr 0.01, 15 times faster.
    steps : int, default 100
        Adam iterations per binary-search step.
    lr : float, default 0.1
        Adam learning rate, in tanh-space units.
    binary_search_steps : int, default 6
        Outer iterations. After each, per sample: if it succeeded, ``upper = min(upper, c)``,
        else ``lower = max(lower, c)``; then ``c = (lower + upper) / 2`` once an upper bound exists,
        otherwise ``c = 10 c``.
    abort_early : bool, default True
        End a binary-search step when the batch loss has not decreased by 0.01 % over the last
        ``steps // 10`` iterations (as in the reference implementation). Adam moves every sample of
        the batch, so there is no per-sample stop.
    progress : bool or callable, default False
        ``True`` for a tqdm bar, or ``progress(done, total)`` called after each binary-search step.

    Returns
    -------
    AttackResult
        Per sample, the smallest-L2 iterate over all iterations and all ``c`` whose margin is at least
        ``kappa + MARGIN_TOL``;
        the clean input (``l2 = 0``, ``success = False``) where none was found.

    Notes
    -----
    Carlini & Wagner 2017, "Towards evaluating the robustness of neural networks", with their f_6 and
    the change of variables ``x' = (tanh(w) + 1) / 2``; minimise with Adam

    ``||x' - x||_2^2 + c * max(Z_y(x') - max_{j != y} Z_j(x') + kappa, 0)``.

    The hinge is placed at ``kappa + MARGIN_TOL`` (1e-3 logits), the margin an iterate needs to count
    as a success, so that the reported success survives re-evaluation in another runtime.
    To leave untouched pixels exactly as they were we use ``x' = clip(x + (tanh(w) - tanh(w_0)) / 2,
    0, 1)`` with ``w_0 = atanh((2x - 1)(1 - 1e-6))``: the same map up to a constant offset below 1e-6.
    """
    kappa = _check_positive("kappa", kappa, allow_zero=True)
    c = _check_positive("c", c)
    lr = _check_positive("lr", lr)
    steps = _check_count("steps", steps)
    binary_search_steps = _check_count("binary_search_steps", binary_search_steps)
    xt, yt = _as_inputs(model, x, y)
    n = xt.shape[0]
    view = (-1,) + (1,) * (xt.ndim - 1)
    params = {"kappa": kappa, "c": c, "steps": steps, "lr": lr, "binary_search_steps": binary_search_steps,
              "abort_early": bool(abort_early)}

    w0 = torch.atanh((2.0 * xt - 1.0) * (1.0 - 1e-6))
    tanh_w0 = torch.tanh(w0)
    const = torch.full((n,), c, dtype=torch.float64, device=xt.device)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, 1e10)
    best_l2sq = torch.full((n,), float("inf"), device=xt.device)
    best_adv = xt.clone()
    check_every = max(steps // 10, 1)
    target = kappa + MARGIN_TOL  # aim where a success is counted (see MARGIN_TOL)

    bar = _Progress(progress, binary_search_steps, f"cw_k{kappa:g}")
    with _frozen_eval(model):
        try:
            for _ in range(binary_search_steps):
                w = w0.clone().requires_grad_(True)
                optimiser = torch.optim.Adam([w], lr=lr)
                c_t = const.to(xt.dtype)
                found = torch.zeros(n, dtype=torch.bool, device=xt.device)
                previous = float("inf")
                for it in range(steps + 1):  # the last pass only evaluates the final iterate
                    x_new = (xt + (torch.tanh(w) - tanh_w0) / 2.0).clamp(0.0, 1.0)
                    logits = model(x_new)
                    if it == 0:
                        _check_logits(logits, n, yt)
                    margin = _margins(logits, yt)  # > 0: misclassified
                    l2sq = (x_new - xt).flatten(1).square().sum(dim=1)
                    with torch.no_grad():
                        success = margin >= target
                        better = success & (l2sq < best_l2sq)
                        best_l2sq = torch.where(better, l2sq, best_l2sq)
                        best_adv = torch.where(better.view(view), x_new, best_adv)
                        found |= success
                    if it == steps:
                        break
                    loss = (l2sq + c_t * (target - margin).clamp_min(0.0)).sum()
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if abort_early and (it + 1) % check_every == 0:
                        if loss.item() > previous * 0.9999:
                            break
                        previous = loss.item()
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                const = torch.where(upper < 1e9, (lower + upper) / 2.0, const * 10.0)
                bar.update()
        finally:
            bar.close()
        return _finish("cw_l2", model, xt, best_adv, yt, params, kappa=kappa)


# --------------------------------------------------------------------------------------------------
# Gaussian noise
# --------------------------------------------------------------------------------------------------


def gaussian_noise(x: ArrayLike, sigma: float = 0.1, seed: int = 0) -> np.ndarray:
    """Add i.i.d. Gaussian noise and clip: ``clip(x + sigma * N(0, I), 0, 1)``.

    Parameters
    ----------
    x : array-like of shape (n_samples, ...), float, in [0, 1]
        Clean inputs.
    sigma : float, default 0.1
        Standard deviation in pixel units (pixels in [0, 1]), before clipping.
    seed : int, default 0
        Seed of the ``numpy.random.Generator`` (PCG64); the same seed gives the same output.

    Returns
    -------
    ndarray of shape (n_samples, ...), float32, in [0, 1]
    """
    sigma = _check_positive("sigma", sigma, allow_zero=True)
    xa = _as_images(x).numpy()
    noise = np.random.default_rng(int(seed)).standard_normal(xa.shape, dtype=np.float32)
    return np.clip(xa + np.float32(sigma) * noise, 0.0, 1.0).astype(np.float32)


def noise_attack(
    model: torch.nn.Module, x: ArrayLike, y: ArrayLike, sigma: float = 0.1, seed: int = 0
) -> AttackResult:
    """:func:`gaussian_noise` wrapped as an :class:`AttackResult` (success = the noise flipped the label).

    Not an attack: a natural-corruption control for the detector, which should not flag it as much
    as real attacks. ``model`` is used only to compute ``success``.
    """
    xt, yt = _as_inputs(model, x, y)
    x_noisy = torch.from_numpy(gaussian_noise(xt.cpu(), sigma=sigma, seed=seed)).to(xt.device)
    with _frozen_eval(model):
        return _finish("noise", model, xt, x_noisy, yt, {"sigma": float(sigma), "seed": int(seed)})


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

#: Default parameters per attack name, for [0, 1] images (tuned on the 8x8 digits CNN, see below).
#:
#: - ``fgsm``/``pgd``: eps = 0.3, the standard MNIST L-inf budget (Madry et al. 2018); on 8x8 digits
#:   (pixel values k/16) it is a change of about 5 grey levels. PGD: 40 steps of 2.5 * eps / 40.
#: - ``pgd_foreground``: the same eps = 0.3 and steps as ``pgd``, so that the two differ only by the mask
#:   (on the digits CNN it flips about as many predictions: ~100 % vs 80 % at eps = 0.2).
#: - ``deepfool``: the paper's overshoot 0.02 and 50 iterations, all classes.
#: - ``cw_k0``/``cw_k10``: kappa 0 / 10 logits, c0 = 1, 6 binary-search steps of 100 Adam steps at
#:   lr 0.1: within 1 % of the mean L2 of 9 x 1,000 steps at lr 0.01 on the digits models, 15x faster.
#: - ``noise``: sigma = 0.1, a visible but label-preserving corruption for most digits.
ATTACK_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "fgsm": MappingProxyType({"eps": 0.3}),
        "pgd": MappingProxyType({"eps": 0.3, "n_steps": 40, "random_start": True, "seed": 0}),
        "pgd_foreground": MappingProxyType({"eps": 0.3, "n_steps": 40, "random_start": True, "seed": 0, "threshold": 0.0}),
        "deepfool": MappingProxyType({"overshoot": 0.02, "max_iter": 50}),
        "cw_k0": MappingProxyType({"kappa": 0.0, "c": 1.0, "steps": 100, "lr": 0.1, "binary_search_steps": 6}),
        "cw_k10": MappingProxyType({"kappa": 10.0, "c": 1.0, "steps": 100, "lr": 0.1, "binary_search_steps": 6}),
        "noise": MappingProxyType({"sigma": 0.1, "seed": 0}),
    }
)

_FUNCTIONS: dict[str, Callable[..., AttackResult]] = {
    "fgsm": fgsm,
    "pgd": pgd_linf,
    "pgd_foreground": pgd_foreground,
    "deepfool": deepfool,
    "cw_k0": cw_l2,
    "cw_k10": cw_l2,
    "noise": noise_attack,
}

#: ``name -> callable(model, x, y, **overrides) -> AttackResult`` with :data:`ATTACK_DEFAULTS` bound
#: (``functools.partial``: keyword overrides replace the defaults).
ATTACKS: Mapping[str, Callable[..., AttackResult]] = MappingProxyType(
    {name: functools.partial(_FUNCTIONS[name], **ATTACK_DEFAULTS[name]) for name in ATTACK_DEFAULTS}
)


def run_attack(name: str, model: torch.nn.Module, x: ArrayLike, y: ArrayLike, **overrides: Any) -> AttackResult:
    """Run the attack registered as ``name`` with its defaults, updated by ``overrides``.

    Parameters
    ----------
    name : str
        A key of :data:`ATTACKS`: ``fgsm``, ``pgd``, ``pgd_foreground``, ``deepfool``, ``cw_k0``,
        ``cw_k10``, ``noise``.
    model, x, y
        As in :func:`fgsm`.
    **overrides
        Keyword arguments of the underlying function (e.g. ``eps=0.2``, ``progress=True``).

    Returns
    -------
    AttackResult
        With ``name`` set to the registry name.
    """
    if name not in ATTACKS:
        raise InvalidInput(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    try:
        result = ATTACKS[name](model, x, y, **overrides)
    except TypeError as error:  # an override the function does not take
        if "unexpected keyword argument" in str(error):
            raise InvalidInput(f"attack {name!r}: {error}") from None
        raise
    return dataclasses.replace(result, name=name)
