"""The attack suite on the real digits CNN (TorchScript demo model) and closed-form answers on linear models.

Real-model checks: each attack flips most of 100 correctly classified test digits, respects its budget,
keeps pixels in [0, 1], reports norms that match its arrays, and is deterministic. Known answers on
affine classifiers, where the geometry is exact: FGSM/PGD go to the corner ``clip(x + eps sign(w))``,
DeepFool takes one step of length ``(1 + overshoot)(|f'| + 1e-4) / ||w||``, CW reaches the margin kappa
at distance ``(kappa - m(x)) / ||w||``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.errors import InvalidInput, ModelError
from detector.offline.attacks import (
    ATTACK_DEFAULTS,
    ATTACKS,
    MARGIN_TOL,
    AttackResult,
    cw_l2,
    deepfool,
    fgsm,
    gaussian_noise,
    pgd_foreground,
    pgd_linf,
    run_attack,
)

N_INPUTS = 100
MODEL_ATTACKS = ["fgsm", "pgd", "pgd_foreground", "deepfool", "cw_k0", "cw_k10"]


# --------------------------------------------------------------------------------------------------
# Fixtures: the TorchScript digits CNN, 100 correctly classified test digits, every attack run once
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads of tiny 8x8 convolutions run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn(demo_models):
    return torch.jit.load(str(demo_models / "digits_cnn.pt"))


def logits_of(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max_{j != y} Z_j - Z_y per row."""
    other = logits.copy()
    other[np.arange(len(y)), y] = -np.inf
    return other.max(axis=1) - logits[np.arange(len(y)), y]


@pytest.fixture(scope="module")
def clean(cnn, digits_split_arrays):
    """The first 100 test digits the CNN classifies correctly: x (100, 1, 8, 8) in [0, 1], y (100,)."""
    x, y = digits_split_arrays["x_test"], digits_split_arrays["y_test"]
    correct = logits_of(cnn, x).argmax(axis=1) == y
    assert correct.sum() >= N_INPUTS
    return x[correct][:N_INPUTS], y[correct][:N_INPUTS]


@pytest.fixture(scope="module")
def results(cnn, clean) -> dict[str, AttackResult]:
    x, y = clean
    return {name: run_attack(name, cnn, x, y) for name in ATTACKS}


# --------------------------------------------------------------------------------------------------
# The real CNN
# --------------------------------------------------------------------------------------------------


def test_registry_names_and_defaults():
    assert set(ATTACKS) == {"fgsm", "pgd", "pgd_foreground", "deepfool", "cw_k0", "cw_k10", "noise"}
    assert set(ATTACK_DEFAULTS) == set(ATTACKS)
    assert ATTACK_DEFAULTS["cw_k10"]["kappa"] == 10.0 and ATTACK_DEFAULTS["cw_k0"]["kappa"] == 0.0


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_attack_flips_most_predictions(results, cnn, clean, name):
    x, y = clean
    result = results[name]
    assert result.name == name
    assert result.success_rate > 0.5, result.summary()
    # success is what the model says about the returned arrays (recomputed here independently)
    predicted = logits_of(cnn, result.x_adv).argmax(axis=1)
    np.testing.assert_array_equal(result.success & (predicted != y), result.success)
    if name != "cw_k10":
        np.testing.assert_array_equal(result.success, predicted != y)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_outputs_are_images_in_unit_interval_with_matching_norms(results, clean, name):
    x, _ = clean
    result = results[name]
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == np.float32
    assert result.success.shape == result.l2.shape == result.linf.shape == (len(x),)
    assert result.success.dtype == bool
    assert np.all(np.isfinite(result.x_adv)) and result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    delta = (result.x_adv.astype(np.float64) - x).reshape(len(x), -1)
    np.testing.assert_allclose(result.l2, np.linalg.norm(delta, axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.linf, np.abs(delta).max(axis=1), rtol=1e-6, atol=1e-7)
    if result.success.any():
        assert result.mean_l2 == pytest.approx(result.l2[result.success].mean())
        assert result.mean_linf == pytest.approx(result.linf[result.success].mean())
    assert result.success_rate == pytest.approx(result.success.mean())


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_foreground"])
def test_linf_attacks_stay_within_eps(results, name):
    eps = ATTACK_DEFAULTS[name]["eps"]
    assert results[name].linf.max() <= eps + 1e-6
    assert results[name].linf.max() >= eps - 1e-6  # and use it: sign steps land on the budget


def test_fgsm_moves_every_pixel_by_eps_or_to_the_box(results, clean):
    x, _ = clean
    eps = ATTACK_DEFAULTS["fgsm"]["eps"]
    x_adv = results["fgsm"].x_adv
    up, down = np.clip(x + eps, 0, 1), np.clip(x - eps, 0, 1)
    on_grid = np.isclose(x_adv, up, atol=1e-6) | np.isclose(x_adv, down, atol=1e-6) | (x_adv == x)
    assert on_grid.all()


def test_pgd_foreground_leaves_background_bit_for_bit(results, clean, cnn):
    x, y = clean
    x_adv = results["pgd_foreground"].x_adv
    background = x <= 0.0
    assert background.mean() > 0.3  # digits have a real background to protect
    np.testing.assert_array_equal(x_adv[background], x[background])
    assert np.abs(x_adv - x)[~background].max() > 0.1  # the foreground did move
    assert not np.any((x_adv > 0) & background)  # the non-zero pixel set can only shrink
    # plain PGD, by contrast, writes into the background
    assert np.abs(results["pgd"].x_adv - x)[background].max() > 0.1
    # another threshold: everything at or below it is kept
    result = pgd_foreground(cnn, x[:20], y[:20], eps=0.3, n_steps=5, threshold=0.5)
    kept = x[:20] <= 0.5
    np.testing.assert_array_equal(result.x_adv[kept], x[:20][kept])
    assert result.params["threshold"] == 0.5


def test_cw_k10_reaches_confidence_10_in_torch_and_onnx_runtime(results, clean, cnn, demo_models):
    from detector.model import OnnxClassifier

    x, y = clean
    result = results["cw_k10"]
    adv = result.success
    assert margins(logits_of(cnn, result.x_adv), y)[adv].min() >= 10.0
    # the serving runtime agrees (MARGIN_TOL absorbs float32 differences between runtimes)
    onnx_logits = OnnxClassifier(demo_models / "digits_cnn.onnx").run(result.x_adv).logits
    assert margins(onnx_logits, y)[adv].min() >= 10.0
    assert MARGIN_TOL <= 1e-3
    # confidence costs distortion, and the search did not stop at the boundary of a weaker attack
    assert result.mean_l2 > 1.3 * results["cw_k0"].mean_l2
    # failures are handed back unperturbed
    np.testing.assert_array_equal(result.x_adv[~adv], x[~adv])
    assert np.all(result.l2[~adv] == 0)


def test_cw_returns_the_smallest_success_over_the_binary_search(results, clean, cnn):
    x, y = clean
    # the first binary-search step is computed identically in both runs; later steps can only improve on it
    one_step = run_attack("cw_k0", cnn, x, y, binary_search_steps=1)
    full = results["cw_k0"]
    assert full.success[one_step.success].all()
    assert np.all(full.l2[one_step.success] <= one_step.l2[one_step.success] + 1e-7)
    assert full.mean_l2 < one_step.mean_l2


def test_minimal_attacks_need_far_less_l2_than_sign_attacks(results):
    # DeepFool and CW-L2 look for the nearest boundary; FGSM/PGD spend the whole L-inf budget
    for minimal in ("deepfool", "cw_k0"):
        assert results[minimal].mean_l2 < 0.5 * results["fgsm"].mean_l2
    assert results["cw_k0"].mean_l2 <= 1.1 * results["deepfool"].mean_l2


def test_noise_is_a_control_not_an_attack(results):
    noise = results["noise"]
    assert noise.success_rate < 0.2  # sigma = 0.1 rarely changes a digit's class
    assert noise.l2.min() > 0


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_foreground", "deepfool", "cw_k10", "noise"])
def test_attacks_are_deterministic(cnn, clean, results, name):
    x, y = clean
    again = run_attack(name, cnn, x, y)  # a fresh run, same default seed
    np.testing.assert_array_equal(again.x_adv, results[name].x_adv)
    np.testing.assert_array_equal(again.success, results[name].success)


@pytest.mark.parametrize("name", ["pgd", "pgd_foreground", "noise"])
def test_seed_changes_the_random_part(cnn, clean, results, name):
    x, y = clean
    other = run_attack(name, cnn, x, y, seed=1)
    assert not np.array_equal(other.x_adv, results[name].x_adv)


def test_pgd_early_stop_freezes_samples_at_their_first_flip(cnn, clean, results):
    x, y = clean
    early = run_attack("pgd", cnn, x, y, early_stop=True)
    assert early.success_rate >= 0.9 * results["pgd"].success_rate
    assert early.mean_l2 < results["pgd"].mean_l2  # frozen after the first flip, so less perturbation
    assert early.linf.max() <= ATTACK_DEFAULTS["pgd"]["eps"] + 1e-6


def test_deepfool_candidate_classes_and_early_exit(cnn, clean):
    x, y = clean
    calls = []
    result = deepfool(cnn, x[:30], y[:30], n_classes=3, progress=lambda done, total: calls.append((done, total)))
    assert result.success_rate > 0.5 and result.params["n_classes"] == 3
    # every sample stops once fooled, so the loop ends long before max_iter = 50
    assert 0 < len(calls) < 50 and calls[-1][1] == 50
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))


# --------------------------------------------------------------------------------------------------
# Model state, inputs, errors
# --------------------------------------------------------------------------------------------------


class Noisy(torch.nn.Module):
    """A small CNN with dropout, to show that attacks run it in eval mode and restore its state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5),
            torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10),
        )

    def forward(self, x):
        return self.body(x)


def test_attacks_use_eval_mode_and_leave_parameters_alone(clean):
    x, y = clean
    model = Noisy().train()
    before = [p.detach().clone() for p in model.parameters()]
    first = pgd_linf(model, x[:20], y[:20], n_steps=5)
    second = pgd_linf(model, x[:20], y[:20], n_steps=5)
    np.testing.assert_array_equal(first.x_adv, second.x_adv)  # dropout off during the attack
    for name in ("deepfool", "cw_k0", "fgsm"):
        run_attack(name, model, x[:10], y[:10], **({"steps": 5, "binary_search_steps": 1} if name == "cw_k0" else {}))
    assert model.training  # restored
    for p, b in zip(model.parameters(), before):
        assert p.requires_grad and p.grad is None
        assert torch.equal(p, b)


def test_torch_tensors_and_caller_arrays(cnn, clean, results):
    x, y = clean
    x_copy = x.copy()
    result = fgsm(cnn, torch.from_numpy(x), torch.from_numpy(y), eps=ATTACK_DEFAULTS["fgsm"]["eps"])
    np.testing.assert_array_equal(result.x_adv, results["fgsm"].x_adv)
    np.testing.assert_array_equal(x, x_copy)  # inputs are never modified


def test_invalid_inputs_raise_clear_errors(cnn, clean):
    x, y = clean
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        fgsm(cnn, x * 16, y)
    with pytest.raises(InvalidInput, match="shape"):
        fgsm(cnn, x, y[:-1])
    with pytest.raises(InvalidInput, match="empty"):
        fgsm(cnn, x[:0], y[:0])
    with pytest.raises(InvalidInput, match="NaN"):
        fgsm(cnn, np.full_like(x, np.nan), y)
    with pytest.raises(InvalidInput, match="only 10 classes"):
        fgsm(cnn, x, np.full_like(y, 10))
    with pytest.raises(InvalidInput, match="eps"):
        pgd_linf(cnn, x, y, eps=-0.1)
    with pytest.raises(InvalidInput, match="unknown attack 'bim'"):
        run_attack("bim", cnn, x, y)
    with pytest.raises(InvalidInput, match="epsilon"):
        run_attack("fgsm", cnn, x, y, epsilon=0.1)
    with pytest.raises(ModelError, match="logits of shape"):
        fgsm(torch.nn.Flatten(0), x, y)  # a 1-D output is not (N, n_classes) logits
    with pytest.raises(InvalidInput, match="sigma"):
        gaussian_noise(x, sigma=float("nan"))


# --------------------------------------------------------------------------------------------------
# Gaussian noise
# --------------------------------------------------------------------------------------------------


def test_gaussian_noise_has_the_requested_spread_and_is_clipped():
    x = np.full((200, 1, 8, 8), 0.5, dtype=np.float32)
    noisy = gaussian_noise(x, sigma=0.05, seed=3)  # 0.5 +- 10 sigma never reaches the box
    assert noisy.dtype == np.float32
    assert np.std(noisy - x) == pytest.approx(0.05, rel=0.02)
    assert abs(np.mean(noisy - x)) < 0.002
    np.testing.assert_array_equal(noisy, gaussian_noise(x, sigma=0.05, seed=3))
    wide = gaussian_noise(x, sigma=2.0, seed=3)
    assert wide.min() == 0.0 and wide.max() == 1.0  # clipped at both ends


# --------------------------------------------------------------------------------------------------
# Closed-form answers on affine classifiers
# --------------------------------------------------------------------------------------------------


def affine(weights: np.ndarray, bias: np.ndarray) -> torch.nn.Module:
    """Logits = W vec(x) + b for (N, 1, 2, 2) inputs; weights (K, 4)."""
    layer = torch.nn.Linear(4, len(bias))
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weights, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return torch.nn.Sequential(torch.nn.Flatten(), layer)


@pytest.fixture
def binary_affine():
    """Two classes, margin m(x) = (W_1 - W_0) . x + b_1 - b_0 with w = W_1 - W_0 = (2, -1, 1, -2)."""
    weights = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 1.0, -2.0]])
    model = affine(weights, np.array([0.0, -1.0]))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.35, 0.65, size=(16, 1, 2, 2)).astype(np.float32)
    w = weights[1] - weights[0]
    m = x.reshape(16, 4).astype(np.float64) @ w - 1.0  # all < 0: class 0 everywhere
    assert np.all(m < -0.2)
    return model, x, np.zeros(16, dtype=np.int64), w, m


def test_fgsm_and_pgd_go_to_the_corner_on_a_linear_model(binary_affine):
    model, x, y, w, _ = binary_affine
    corner = np.clip(x + 0.3 * np.sign(w).reshape(1, 1, 2, 2), 0, 1)
    np.testing.assert_allclose(fgsm(model, x, y, eps=0.3).x_adv, corner, atol=1e-6)
    # every PGD step has the same sign, and 2.5 eps of travel reaches the corner from any random start
    np.testing.assert_allclose(pgd_linf(model, x, y, eps=0.3, n_steps=10, seed=5).x_adv, corner, atol=1e-6)


def test_deepfool_takes_one_exact_step_on_a_linear_model(binary_affine):
    model, x, y, w, m = binary_affine
    result = deepfool(model, x, y, overshoot=0.02)
    expected = 1.02 * (np.abs(m) + 1e-4) / np.linalg.norm(w)
    np.testing.assert_allclose(result.l2, expected, rtol=1e-4)
    direction = (result.x_adv - x).reshape(16, 4) / result.l2[:, None]
    np.testing.assert_allclose(direction, np.tile(w / np.linalg.norm(w), (16, 1)), atol=1e-4)
    assert result.success.all()


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_cw_finds_the_distance_to_the_kappa_level_set_on_a_linear_model(binary_affine, kappa):
    model, x, y, w, m = binary_affine
    result = cw_l2(model, x, y, kappa=kappa)  # the defaults
    assert result.success.all()
    exact = (kappa - m) / np.linalg.norm(w)  # the nearest point with margin kappa
    assert np.all(result.l2 >= exact - 1e-5)  # nothing can beat the closed form
    np.testing.assert_allclose(result.l2, exact, rtol=0.02)
    assert margins(logits_of(model, result.x_adv), y).min() >= kappa
