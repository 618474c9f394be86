"""The attack suite (ART on the ONNX digits CNN through onnx2torch): valid 8-bit images, honest success.

Each attack runs once on 60 correctly classified test digits (rounded to 8-bit first): its images are on
the 8-bit grid and in [0, 1], its success is what the ONNX model says about the rounded images, it respects
its budget (L-inf eps plus half a grey level of rounding), the foreground attack leaves the background as it
was, and it fools most digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.errors import InvalidInput
from detector.model import OnnxClassifier
from detector.offline.attacks import (ATTACK_DEFAULTS, ATTACKS, channels_tied, load_torch_classifier, offgrid_pixels,
                                      round_to_grid, run_attack)

N_INPUTS = 60
#: Smaller budgets than the defaults where they only cost time (the properties tested do not depend on them).
FAST = {"cw_k0": {"steps": 20, "binary_search_steps": 3}, "cw_k10": {"steps": 20, "binary_search_steps": 3},
        "square": {"max_iter": 100}}
#: Success-rate floors on the digits CNN after rounding (measured with these settings: fgsm, pgd,
#: pgd_foreground, deepfool 1.0, cw_k0 0.983, cw_k10 0.817, square 0.983; fgsm_foreground on 360 test digits 0.95,
#: fgsm_minimal_foreground 0.93).
FLOORS = {"fgsm": 0.9, "fgsm_foreground": 0.5, "fgsm_minimal_foreground": 0.5, "pgd": 0.95, "pgd_foreground": 0.9, "deepfool": 0.9, "cw_k0": 0.9, "cw_k10": 0.7, "square": 0.9}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn(demo_models):
    return load_torch_classifier(demo_models / "digits_cnn.onnx")


@pytest.fixture(scope="module")
def onnx_cnn(demo_models):
    return OnnxClassifier(demo_models / "digits_cnn.onnx")


@pytest.fixture(scope="module")
def clean(onnx_cnn, digits_split_arrays):
    x, y = round_to_grid(digits_split_arrays["x_test"]), digits_split_arrays["y_test"]
    correct = onnx_cnn.run_batches(x).predicted == y
    return x[correct][:N_INPUTS], y[correct][:N_INPUTS]


@pytest.fixture(scope="module")
def results(cnn, clean):
    x, y = clean
    return {name: run_attack(name, cnn, x, y, **FAST.get(name, {})) for name in ATTACKS}


def test_the_converted_model_matches_onnx_runtime(cnn, onnx_cnn, clean):
    x = clean[0]
    with torch.no_grad():
        torch_logits = cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_logits, onnx_cnn.run_batches(x).logits, rtol=1e-4, atol=1e-4)


def test_round_to_grid_and_offgrid_pixels_closed_form():
    x = np.array([[0.0, 1 / 255, 0.5, 0.3, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(offgrid_pixels(x), [2.0])  # 0.5 and 0.3 are between grey levels
    rounded = round_to_grid(x)
    np.testing.assert_allclose(rounded * 255, [[0, 1, 128, 76, 255]], atol=1e-4)
    assert offgrid_pixels(rounded)[0] == 0
    np.testing.assert_allclose(round_to_grid(x, 4), [[0, 0, 0.5, 0.25, 1]])
    np.testing.assert_array_equal(round_to_grid(x, None), x)
    with pytest.raises(InvalidInput, match="pixel_levels"):
        round_to_grid(x, 0)


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_give_valid_8bit_images_and_honest_success(name, results, onnx_cnn, clean):
    x, y = clean
    r = results[name]
    assert r.x_adv.shape == x.shape and r.x_adv.dtype == np.float32
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1 and not offgrid_pixels(r.x_adv).any()
    np.testing.assert_array_equal(r.success, onnx_cnn.run_batches(r.x_adv).predicted != y)
    delta = (r.x_adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(r.linf, np.abs(delta).max(axis=1), atol=1e-6)
    if "eps" in ATTACK_DEFAULTS[name]:
        assert r.linf.max() <= ATTACK_DEFAULTS[name]["eps"] + 0.5 / 255 + 1e-6
    if name.endswith("_foreground"):
        background = (x == 0).reshape(len(x), -1)
        assert not delta[background].any()
    if name == "fgsm_minimal_foreground":  # the smallest step that flips: mean Linf 0.15 on 354 test digits
        foreground = results["fgsm_foreground"]
        both = r.success & foreground.success
        assert (r.linf[both] <= foreground.linf[both] + 1e-6).all() and r.linf[both].mean() < 0.25
    if name == "noise":
        assert r.success_rate < 0.2
    else:
        assert r.success_rate >= FLOORS[name]


def test_pgd_is_deterministic_for_a_seed(cnn, clean, results):
    again = run_attack("pgd", cnn, *clean)
    np.testing.assert_array_equal(again.x_adv, results["pgd"].x_adv)


def test_unknown_attacks_and_parameters_are_refused(cnn, clean):
    with pytest.raises(InvalidInput, match="unknown attack 'bim'"):
        run_attack("bim", cnn, *clean)
    with pytest.raises(InvalidInput, match="has no parameter"):
        run_attack("fgsm", cnn, *clean, epsilon=0.1)
    with pytest.raises(InvalidInput, match="pixels in"):
        run_attack("fgsm", cnn, clean[0] * 2, clean[1])


class _ColourMix(torch.nn.Module):
    """The digits CNN on a weighted mix of three channels: on grey inputs it is the CNN, and its gradient differs
    between channels, so an untied attack changes them unequally."""

    def __init__(self, cnn: torch.nn.Module) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn(0.6 * x[:, :1] + 0.3 * x[:, 1:2] + 0.1 * x[:, 2:])


@pytest.mark.parametrize("name", ["pgd", "noise"])
def test_grey_inputs_stored_as_colour_are_attacked_in_grey(cnn, clean, results, name):
    x, y = clean
    grey, model = np.repeat(x, 3, axis=1), _ColourMix(cnn)
    assert channels_tied(grey) and not channels_tied(x)
    tied = run_attack(name, model, grey, y)
    assert tied.params["channels_tied"] and channels_tied(tied.x_adv)
    # the same attack on one channel through the CNN: the grey attack is that image, repeated
    np.testing.assert_array_equal(tied.x_adv, np.repeat(results[name].x_adv, 3, axis=1))
    np.testing.assert_array_equal(tied.success, results[name].success)
    coloured = grey.copy()
    coloured[:, 2] *= 0.5  # no longer grey: the attack is free to change the channels unequally
    free = run_attack(name, model, coloured, y)
    assert not free.params["channels_tied"] and not (free.x_adv[:, 0] == free.x_adv[:, 1]).all()
