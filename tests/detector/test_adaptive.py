"""Adaptive attacks: every candidate is an 8-bit image inside the budget, judged on the real detector; the
adaptive attacks are at least as strong as the plain ones; ``advdetect evaluate --adaptive`` writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits(cnn_detector, digits_split_arrays) -> tuple[np.ndarray, np.ndarray]:
    """12 correctly classified test digits (8-bit rounded) and their labels."""
    from detector.offline.attacks import round_to_grid

    x, y = round_to_grid(digits_split_arrays["x_test"][:40]), digits_split_arrays["y_test"][:40]
    keep = np.flatnonzero(cnn_detector.classify(x).predicted == y)[:12]
    return x[keep], y[keep]


def _recording_judge(detector, x, y):
    """A Judge that also keeps every candidate it saw and, per input, the lowest statistic of a misclassified one."""
    from detector.offline.adaptive import Judge

    class Recording(Judge):
        def __init__(self, *args):
            super().__init__(*args)
            self.seen: list[np.ndarray] = []
            self.lowest = np.full(len(self.y), np.inf)

        def __call__(self, candidates, index=None):
            self.seen.append(candidates.copy())
            probabilities, statistic, wrong = super().__call__(candidates, index)
            self.lowest = np.where(wrong, np.minimum(self.lowest, statistic), self.lowest)
            return probabilities, statistic, wrong

    return Recording(detector, x, y)


def test_budgets_project_onto_their_ball_and_mask():
    from detector.offline.adaptive import Budget

    x = np.zeros((2, 1, 4, 4), np.float32)
    x[:, :, 1:3, 1:3] = 0.5
    delta = torch.from_numpy(np.random.default_rng(1).normal(0, 1, x.shape).astype(np.float32))
    fg = Budget("linf", 0.3, foreground=True)
    projected = fg.project(delta, torch.from_numpy(fg.mask(x))).numpy()
    assert np.abs(projected).max() <= 0.3 + 1e-7 and np.all(projected[x == 0] == 0)
    l2 = Budget("l2", 0.7)
    norms = np.linalg.norm(l2.project(delta, torch.from_numpy(l2.mask(x))).numpy().reshape(2, -1), axis=1)
    assert np.all(norms <= 0.7 + 1e-5) and np.allclose(norms, 0.7, rtol=1e-4)


def test_the_judge_keeps_the_closest_candidate_of_each_outcome(cnn_detector, digits):
    from detector.offline.adaptive import Judge

    x, y = digits
    judge = Judge(cnn_detector, x, y)
    judge(x)  # clean and correctly classified: nothing achieved
    assert np.all(np.isinf(judge.record.l2["misclassified"]))
    other = np.roll(x, 1, axis=0)  # another digit, mostly of another class
    _, statistic, wrong = judge(other)
    distance = np.linalg.norm((other - x).reshape(len(x), -1), axis=1)
    assert np.allclose(judge.record.l2["misclassified"][wrong], distance[wrong])
    evaded = wrong & (statistic <= judge.thresholds[0.05])
    assert np.array_equal(np.isfinite(judge.record.l2["fused@0.05"]), evaded)
    assert np.all(judge.record.l2["fused@0.01"] <= judge.record.l2["fused@0.05"])  # 1 % FPR flags less


def test_pgd_candidates_are_8_bit_inside_the_foreground_budget_and_misclassify(cnn_detector, cnn_mirror, digits):
    from detector.offline.adaptive import Budget, pgd_attack

    x, y = digits
    judge = _recording_judge(cnn_detector, x, y)
    record = pgd_attack(cnn_mirror, judge, x, Budget("linf", 0.3, foreground=True), steps=10)
    assert judge.queries == 10 * len(x)
    for candidate in judge.seen:
        assert np.allclose(candidate * 255, np.round(candidate * 255), atol=1e-4)
        assert np.all(candidate[x == 0] == 0)  # the background is never touched
        assert np.abs(candidate - x).max() <= 0.3 + 0.5 / 255 + 1e-6
    assert record.achieved("misclassified", "linf", 0.3).mean() >= 0.5
    assert np.all(record.achieved("fused@0.01", "linf", 0.3) >= record.achieved("fused@0.05", "linf", 0.3))
    assert np.all(record.achieved("misclassified", "linf", 0.3) >= record.achieved("fused@0.01", "linf", 0.3))


@pytest.fixture(scope="module")
def default_fusion_detector(demo_models, tmp_path_factory):
    """The digits CNN with a baseline whose ``adversarial`` flag is the default Fisher (no tuning attacks)."""
    from detector import load_dataset
    from detector.calibration import CalibrationConfig, calibrate
    from detector.pipeline import Detector

    out = tmp_path_factory.mktemp("baseline_default_fusion")
    calibrate(demo_models / "digits_cnn.onnx", load_dataset("digits:calib"), out,
              CalibrationConfig(tuning_attacks=(), progress=False))
    return Detector.load(demo_models / "digits_cnn.onnx", out, intra_op_threads=1)


def test_the_detector_term_lowers_the_statistic_of_misclassified_candidates(default_fusion_detector, digits):
    """On the default four-member Fisher, aiming under the 5 % threshold."""
    from detector.offline.adaptive import Budget, pgd_attack
    from detector.offline.mirror import DetectorMirror

    mirror = DetectorMirror(default_fusion_detector)
    x, y = digits
    budget = Budget("linf", 0.3, foreground=True)
    plain, aware = _recording_judge(default_fusion_detector, x, y), _recording_judge(default_fusion_detector, x, y)
    pgd_attack(mirror, plain, x, budget, steps=10)
    pgd_attack(mirror, aware, x, budget, lam=3.0, fpr=0.05, steps=10)
    both = np.isfinite(plain.lowest) & np.isfinite(aware.lowest)
    assert both.sum() >= 4
    assert np.median(aware.lowest[both]) < np.median(plain.lowest[both])


def test_orthogonal_pgd_and_square_use_their_budgets(cnn_detector, cnn_mirror, digits):
    from detector.offline.adaptive import Budget, Judge, pgd_attack, square_attack

    x, y = digits
    record = pgd_attack(cnn_mirror, Judge(cnn_detector, x, y), x, Budget("l2", 1.5), steps=5, orthogonal=True)
    reached = record.l2["misclassified"][np.isfinite(record.l2["misclassified"])]
    assert len(reached) >= 3 and np.all(reached <= 1.5 + 8 * 0.5 / 255)  # rounding moves 64 pixels by <= 1/510
    recording = _recording_judge(cnn_detector, x, y)
    square_attack(recording, x, Budget("linf", 0.3, foreground=True), staged=True, queries=30)
    assert recording.queries == 30 * len(x)
    for candidate in recording.seen:
        assert np.all(candidate[x == 0] == 0) and np.abs(candidate - x).max() <= 0.3 + 0.5 / 255 + 1e-6


def test_staged_square_evades_at_least_as_often_as_plain_square(cnn_detector, digits):
    """Same seeded proposals; the staged loss keeps a misclassified candidate and then lowers the statistic."""
    from detector.offline.adaptive import Budget, Judge, square_attack

    x, y = digits
    budget = Budget("linf", 0.3, foreground=True)
    plain = square_attack(Judge(cnn_detector, x, y), x, budget, queries=60)
    staged = square_attack(Judge(cnn_detector, x, y), x, budget, staged=True, queries=60)
    assert np.isfinite(plain.l2["misclassified"]).sum() >= 3
    for f in (0.01, 0.05):
        assert np.isfinite(staged.l2[f"fused@{f:g}"]).sum() >= np.isfinite(plain.l2[f"fused@{f:g}"]).sum()


def test_cw_l2_finds_close_misclassified_8_bit_images(cnn_detector, cnn_mirror, digits):
    from detector.offline.adaptive import Judge, cw_l2_attack

    x, y = digits
    distance = cw_l2_attack(cnn_mirror, Judge(cnn_detector, x, y), x, steps=60).l2["misclassified"]
    assert np.isfinite(distance).mean() >= 0.5
    assert np.all(distance[np.isfinite(distance)] > 0)


def test_ddn_on_the_digit_changes_only_its_pixels_and_the_adaptive_run_evades_more(cnn_detector, cnn_mirror, digits):
    """Plain DDN misclassifies within the digit's pixels; the adaptive run (success = misclassified and under the
    5 % threshold) evades on at least as many inputs at 5 % FPR."""
    from detector.offline.adaptive import Judge, ddn_attack
    from detector.offline.attacks import round_to_grid

    x, y = digits
    seen = []

    class Recording(Judge):
        def __call__(self, candidates, index=None):
            seen.append(candidates)
            return super().__call__(candidates, index)

    plain = ddn_attack(cnn_mirror, Recording(cnn_detector, x, y), x, steps=40, foreground=True)
    assert np.isfinite(plain.l2["misclassified"]).mean() >= 0.5
    background = np.broadcast_to(x == 0, seen[0].shape)
    assert all(np.all(c[background] == 0) and np.array_equal(c, round_to_grid(c)) for c in seen)
    adaptive = ddn_attack(cnn_mirror, Judge(cnn_detector, x, y), x, lam=1.0, fpr=0.05, steps=40, foreground=True)
    assert np.isfinite(adaptive.l2["fused@0.05"]).sum() >= np.isfinite(plain.l2["fused@0.05"]).sum()


def test_the_boundary_attack_starts_unflagged_and_comes_closer(cnn_detector, cnn_mirror, digits, digits_split_arrays):
    from detector.offline.adaptive import Judge, boundary_attack, clean_starts
    from detector.offline.attacks import round_to_grid

    x, y = digits
    pool_x, pool_y = round_to_grid(digits_split_arrays["x_test"][40:]), digits_split_arrays["y_test"][40:]
    starts = clean_starts(cnn_detector, x, y, pool_x, pool_y, fpr=0.05)
    detections = cnn_detector.detect(starts, fpr=0.05).detections
    assert all(d.predicted_class != label and "adversarial" not in d.flags for d, label in zip(detections, y))
    record = boundary_attack(cnn_mirror, Judge(cnn_detector, x, y), x, starts, fpr=0.05, rounds=3, steps=3)
    start_distance = np.linalg.norm((starts - x).reshape(len(x), -1), axis=1)
    assert np.all(record.l2["fused@0.05"] <= start_distance + 1e-6)  # every input evades, at most that far
    assert np.median(record.l2["fused@0.05"] / start_distance) < 0.8


def test_evaluate_adaptive_writes_the_report_with_its_sanity_checks(demo_models, cnn_baseline, tmp_path):
    from detector.cli import main

    out = tmp_path / "adaptive"
    status = main(["evaluate", "--adaptive", "--model", str(demo_models / "digits_cnn.onnx"), "--baseline",
                   str(cnn_baseline[0]), "--data", "digits:test", "--out", str(out), "--max-attacked", "6",
                   "--steps", "4", "--queries", "40", "--budgets", "0.3", "--quiet"])
    assert status == 0
    text = (out / "adaptive.md").read_text()
    assert "adaptive >= plain at every budget and FPR: **" in text
    assert "unbounded budget (any L2) reaches 100 % evasion: **" in text
    assert (out / "adaptive.png").stat().st_size > 0
    table = json.loads((out / "adaptive.json").read_text())
    assert table["n_inputs"] == 6 and table["model"] == "digits_cnn"
    assert table["checks"]["unbounded_full_evasion"]  # the boundary attack starts at unflagged clean images
    for row in table["rows"]:  # adaptive at least as strong as plain
        for f in ("0.01", "0.05"):
            assert row["adaptive"]["evaded"][f] >= row["plain"]["evaded"][f], (row["family"], row["budget"], f)
    assert table["checks"]["adaptive_at_least_plain"]
    assert text.count("**pass**") == 2 and "FAIL" not in text and "The attack is broken" not in text
