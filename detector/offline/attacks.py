"""Adversarial attacks for the offline evaluation: IBM's Adversarial Robustness Toolbox on the ONNX model.

The classifier under attack is the deployed ONNX file itself, converted to a ``torch.nn.Module`` by
``onnx2torch`` (:func:`load_torch_classifier`), so a user needs nothing but that file. The attacks are
those of the Adversarial Robustness Toolbox (ART 1.20, MIT), run through its ``PyTorchClassifier``:

===========================  ======================================================================
name (:data:`ATTACKS`)       what (ART class)
===========================  ======================================================================
``fgsm``                     one L-inf step, eps 0.3 (``FastGradientMethod``; Goodfellow et al. 2015)
``fgsm_foreground``          the same step on the pixels lit in the clean input only (``mask``)
``fgsm_minimal_foreground``  the smallest such foreground step that flips the class, eps searched in steps
                             of ``eps_step`` up to 0.3 (``minimal=True``): a fast minimum-perturbation attack
                             whose examples sit just across the boundary, as CW kappa=0's do
``pgd``                      L-inf PGD, eps 0.3, random start (``ProjectedGradientDescent``; Madry et al.)
``pgd_foreground``           the same PGD with ``mask`` = the pixels lit in the clean input
``deepfool``                 multi-class DeepFool, L2 (``DeepFool``; Moosavi-Dezfooli et al. 2016)
``cw_k0``, ``cw_k10``        Carlini-Wagner L2, confidence kappa = 0 / 10 logits (``CarliniL2Method``)
``square``                   score-based black-box L-inf attack, eps 0.3 (``SquareAttack``; Andriushchenko
                             et al. 2020)
``noise``                    additive Gaussian noise, sigma 0.1: a natural-corruption control, not an attack
===========================  ======================================================================

Valid images. Images reach a service as 8-bit pixels, so every adversarial example is rounded to the
pixel grid ``k / pixel_levels`` (255 by default: 8-bit; ``None`` leaves float inputs as they are) and its
success is recomputed on the rounded image: only examples still misclassified after rounding count. An
attack that leaves sub-1/255 noise on a blank background loses that noise here instead of being caught by
it. Rounding moves a pixel by at most half a grey level, so an L-inf budget eps holds to within
eps + 1/510. :func:`offgrid_pixels` is the matching sanity statistic.

Greyscale stored as colour. When every input of a batch has identical channels (grey images repeated to
three channels, as MNIST-32), the attack runs on one channel through the model with that channel repeated
(:func:`channels_tied`), so the adversarial images stay grey. An attack that changed the channels unequally
would land in directions that clean inputs never use, where any pixel statistic sees it at no cost to the
detector; an attacker who knows the data keeps the channels equal, as one who knows the service rounds to 8-bit.

Determinism: numpy's and torch's global generators are seeded with ``seed`` before each attack (ART draws
its random starts and Square's patches from them) and restored afterwards. torch is imported at module
level: this module lives in ``detector.offline`` and is never imported by the serving path.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from detector.errors import InvalidInput, ModelError
from detector.offline.torch_onnx import onnx_to_torch

__all__ = [
    "AttackResult",
    "ATTACKS",
    "ATTACK_DEFAULTS",
    "channels_tied",
    "load_torch_classifier",
    "offgrid_pixels",
    "round_to_grid",
    "run_attack",
]

#: Default parameters per attack name, for [0, 1] images.
#:
#: - ``fgsm``/``fgsm_foreground``/``pgd``/``pgd_foreground``/``square``: eps = 0.3, the standard MNIST L-inf budget (Madry et al.
#:   2018). PGD: 40 steps of 2.5 * eps / 40 from one random start; the foreground variant only moves pixels
#:   above ``threshold`` in the clean image (the background stays exactly as it was).
#: - ``fgsm_minimal_foreground``: foreground FGSM steps of eps 0.01, 0.02, ... up to 0.3, each input keeping the
#:   first that flips its class (ART's ``minimal=True``; the 8-bit rounding then undoes a few).
#: - ``deepfool``: the paper's overshoot 0.02, 50 iterations, gradients of all 10 classes.
#: - ``cw_k0``/``cw_k10``: kappa 0 / 10 logits, initial constant 1, 5 binary-search steps of 50 iterations at
#:   learning rate 0.1 (ART's defaults of 10 x 10 at 0.01 with c = 0.01 fail on most MNIST digits).
#: - ``square``: 300 queries per input, p_init 0.8 (MNIST setting of Andriushchenko et al.: 0.8).
#: - ``noise``: sigma = 0.1, a visible but label-preserving corruption for most digits.
ATTACK_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "fgsm": MappingProxyType({"eps": 0.3}),
    "fgsm_foreground": MappingProxyType({"eps": 0.3, "threshold": 0.0}),
    "fgsm_minimal_foreground": MappingProxyType({"eps": 0.3, "eps_step": 0.01, "threshold": 0.0}),
    "pgd": MappingProxyType({"eps": 0.3, "n_steps": 40, "seed": 0}),
    "pgd_foreground": MappingProxyType({"eps": 0.3, "n_steps": 40, "seed": 0, "threshold": 0.0}),
    "deepfool": MappingProxyType({"overshoot": 0.02, "max_iter": 50}),
    "cw_k0": MappingProxyType({"kappa": 0.0, "c": 1.0, "steps": 50, "lr": 0.1, "binary_search_steps": 5}),
    "cw_k10": MappingProxyType({"kappa": 10.0, "c": 1.0, "steps": 50, "lr": 0.1, "binary_search_steps": 5}),
    "square": MappingProxyType({"eps": 0.3, "max_iter": 300, "p_init": 0.8, "seed": 0}),
    "noise": MappingProxyType({"sigma": 0.1, "seed": 0}),
})
ATTACKS = tuple(ATTACK_DEFAULTS)


@dataclass(frozen=True, eq=False)
class AttackResult:
    """What an attack produced for a batch of n_samples inputs, after rounding to the pixel grid.

    Attributes
    ----------
    name : str
        The attack's name (a key of :data:`ATTACK_DEFAULTS`).
    x_adv : ndarray of shape (n_samples, ...), float32
        The perturbed inputs, rounded to the grid, pixels in [0, 1].
    success : ndarray of shape (n_samples,), bool
        ``argmax model(x_adv) != y`` on the rounded images.
    success_unrounded : ndarray of shape (n_samples,), bool
        The same before rounding (what the attack itself achieved).
    l2, linf : ndarray of shape (n_samples,), float64
        ``||x_adv - x||_2`` and ``||x_adv - x||_inf`` per sample, in pixel units (pixels in [0, 1]).
    params : mapping
        The attack's parameters and the grid (JSON-able), for reports.
    """

    name: str
    x_adv: np.ndarray
    success: np.ndarray
    success_unrounded: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Fraction of inputs still misclassified after rounding, in [0, 1] (nan for an empty batch)."""
        return float(self.success.mean()) if len(self.success) else math.nan

    def summary(self) -> dict[str, Any]:
        """Success rates (after and before rounding) and mean norms over the successes, JSON-able."""
        ok = self.success
        return {"name": self.name, "n_samples": int(len(ok)), "success_rate": self.success_rate,
                "success_rate_unrounded": float(self.success_unrounded.mean()) if len(ok) else math.nan,
                "mean_l2": float(self.l2[ok].mean()) if ok.any() else math.nan,
                "mean_linf": float(self.linf[ok].mean()) if ok.any() else math.nan}


def round_to_grid(x: np.ndarray, pixel_levels: int | None = 255) -> np.ndarray:
    """Round pixels in [0, 1] to the grid ``k / pixel_levels`` (255: 8-bit); ``None`` returns a float32 copy."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    if pixel_levels is None:
        return x.copy()
    if int(pixel_levels) != pixel_levels or pixel_levels < 1:
        raise InvalidInput(f"pixel_levels must be a positive integer or None, got {pixel_levels!r}")
    return (np.rint(x * np.float32(pixel_levels)) / np.float32(pixel_levels)).astype(np.float32)


def offgrid_pixels(x: np.ndarray, pixel_levels: int = 255) -> np.ndarray:
    """Number of pixels per input that are not on the grid ``k / pixel_levels``, ndarray (n_samples,).

    The sanity statistic beside the non-zero-pixel count: an attack that was not rounded to the grid shows
    itself here. A pixel is off the grid when ``|x L - round(x L)| > 1e-3`` (float32 slack).
    """
    scaled = np.asarray(x, dtype=np.float64).reshape(len(x), -1) * pixel_levels
    return (np.abs(scaled - np.rint(scaled)) > 1e-3).sum(axis=1).astype(np.float64)


def channels_tied(x: np.ndarray) -> bool:
    """True when ``x`` is (n_samples, C, H, W) with C > 1 and every channel equal to the first: grey stored as colour."""
    return x.ndim == 4 and x.shape[1] > 1 and bool((x[:, 1:] == x[:, :1]).all())


def load_torch_classifier(onnx_path: str | os.PathLike[str]) -> torch.nn.Module:
    """The ONNX classifier at ``onnx_path`` as a ``torch.nn.Module`` (:func:`~detector.offline.torch_onnx.onnx_to_torch`).

    The module maps (n_samples, ...) float32 inputs to the model's first output, the logits.
    Raises :class:`~detector.errors.ModelError` when the file cannot be read or converted.
    """
    import onnx

    try:
        graph = onnx.load(str(onnx_path))
        module = onnx_to_torch(graph)
    except Exception as exc:  # noqa: BLE001 - onnx and onnx2torch raise many types; say which file failed
        raise ModelError(f"cannot convert {onnx_path} to torch with onnx2torch: {str(exc).splitlines()[0]}") from None
    if len(graph.graph.output) == 1:
        return module
    return _FirstOutput(module)


class _RepeatedChannel(torch.nn.Module):
    """The classifier on one-channel inputs, repeated to the ``channels`` it expects (greyscale attacks)."""

    def __init__(self, module: torch.nn.Module, channels: int) -> None:
        super().__init__()
        self.module, self.channels = module, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.expand(-1, self.channels, -1, -1))


class _FirstOutput(torch.nn.Module):
    """Keeps the first output (the logits) of a converted multi-output graph."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[0]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global generators (ART draws from them); restore both on exit."""
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def _check_inputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    if x.ndim < 2 or len(x) == 0:
        raise InvalidInput(f"x must have shape (n_samples, ...) with n_samples >= 1, got {x.shape}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InvalidInput("x must hold finite pixels in [0, 1]")
    if y.shape != (len(x),) or y.dtype.kind not in "iu":
        raise InvalidInput(f"y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _art_attack(name: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int,
                params: Mapping[str, Any], batch_size: int, verbose: bool) -> np.ndarray:
    """Run one ART attack; returns the unrounded adversarial images."""
    from art.attacks.evasion import (CarliniL2Method, DeepFool, FastGradientMethod, ProjectedGradientDescent,
                                     SquareAttack)
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=x.shape[1:],
                                   nb_classes=n_classes, clip_values=(0.0, 1.0), device_type="cpu")
    p = dict(params)
    if name in ("fgsm", "fgsm_foreground"):
        mask = (x > p["threshold"]).astype(np.float32) if name == "fgsm_foreground" else None
        return FastGradientMethod(classifier, eps=p["eps"], batch_size=batch_size).generate(x, y, mask=mask)
    if name == "fgsm_minimal_foreground":
        return FastGradientMethod(classifier, eps=p["eps"], eps_step=p["eps_step"], minimal=True,
                                  batch_size=batch_size).generate(x, y, mask=(x > p["threshold"]).astype(np.float32))
    if name in ("pgd", "pgd_foreground"):
        attack = ProjectedGradientDescent(classifier, eps=p["eps"], eps_step=2.5 * p["eps"] / p["n_steps"],
                                          max_iter=p["n_steps"], num_random_init=1, batch_size=batch_size,
                                          verbose=verbose)
        mask = (x > p["threshold"]).astype(np.float32) if name == "pgd_foreground" else None
        with _seeded(p["seed"]):
            return attack.generate(x, y, mask=mask)
    if name == "deepfool":
        return DeepFool(classifier, max_iter=p["max_iter"], epsilon=p["overshoot"], nb_grads=n_classes,
                        batch_size=batch_size, verbose=verbose).generate(x)
    if name in ("cw_k0", "cw_k10"):
        return CarliniL2Method(classifier, confidence=p["kappa"], learning_rate=p["lr"], max_iter=p["steps"],
                               binary_search_steps=p["binary_search_steps"], initial_const=p["c"],
                               batch_size=batch_size, verbose=verbose).generate(x, y)
    if name == "square":
        attack = SquareAttack(classifier, norm=np.inf, eps=p["eps"], max_iter=p["max_iter"], p_init=p["p_init"],
                              nb_restarts=1, batch_size=batch_size, verbose=verbose)
        with _seeded(p["seed"]):
            return attack.generate(x, y)
    raise AssertionError(name)  # unreachable: run_attack checks the name


def run_attack(name: str, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, pixel_levels: int | None = 255,
               batch_size: int = 128, verbose: bool = False, **overrides: Any) -> AttackResult:
    """Run the attack registered as ``name``, round its images to the pixel grid and recompute success.

    Parameters
    ----------
    name : str
        A key of :data:`ATTACK_DEFAULTS`.
    model : torch.nn.Module
        The classifier (e.g. :func:`load_torch_classifier`), mapping (n_samples, ...) in [0, 1] to logits.
    x : ndarray of shape (n_samples, ...), float, in [0, 1]
        Clean inputs.
    y : ndarray of shape (n_samples,), int
        True labels.
    pixel_levels : int or None, default 255
        The adversarial images are rounded to ``k / pixel_levels`` (255 = 8-bit); None: no rounding.
    batch_size : int, default 128
        Batch size of the ART attacks.
    verbose : bool, default False
        ART's progress bars.
    **overrides
        Replace entries of the attack's :data:`ATTACK_DEFAULTS`.

    Returns
    -------
    AttackResult
        Its ``params`` say whether the channels were tied (``channels_tied``, see :func:`channels_tied`).
    """
    if name not in ATTACK_DEFAULTS:
        raise InvalidInput(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    unknown = sorted(set(overrides) - set(ATTACK_DEFAULTS[name]))
    if unknown:
        raise InvalidInput(f"attack {name!r} has no parameter(s) {unknown}; it takes {sorted(ATTACK_DEFAULTS[name])}")
    params = {**ATTACK_DEFAULTS[name], **overrides}
    x, y = _check_inputs(x, y)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    n_classes = _logits(model, x[:1]).shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise InvalidInput(f"y must hold labels in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    tied = channels_tied(x)
    x_attacked, attacked = (np.ascontiguousarray(x[:, :1]), _RepeatedChannel(model, x.shape[1])) if tied else (x, model)
    if name == "noise":
        noise = np.random.default_rng(int(params["seed"])).standard_normal(x_attacked.shape, dtype=np.float32)
        raw = np.clip(x_attacked + np.float32(params["sigma"]) * noise, 0.0, 1.0)
    else:
        raw = np.asarray(_art_attack(name, attacked, x_attacked, y, n_classes, params, batch_size, verbose),
                         dtype=np.float32)
    if tied:
        raw = np.repeat(raw, x.shape[1], axis=1)
    x_adv = round_to_grid(raw, pixel_levels)
    delta = (x_adv - x).reshape(len(x), -1).astype(np.float64)
    return AttackResult(
        name=name, x_adv=x_adv,
        success=_logits(model, x_adv).argmax(axis=1) != y,
        success_unrounded=_logits(model, np.ascontiguousarray(raw)).argmax(axis=1) != y,
        l2=np.linalg.norm(delta, axis=1), linf=np.abs(delta).max(axis=1),
        params={**params, "pixel_levels": pixel_levels, "channels_tied": tied},
    )
