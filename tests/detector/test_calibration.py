"""Calibration on digits: a deterministic baseline that loads without code execution and flags noise, not clean data."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile

import numpy as np
import pytest

from detector import BaselineError, Dataset, DataError, load_dataset
from detector.baseline import read_baseline
from detector.calibration import ADVERSARIAL_SCORES, CalibrationConfig, calibrate, fit_split
from detector.conformal import split_held_out
from detector.manifest import FlagRule
from detector.cli import main
from detector.pipeline import Detector

@pytest.fixture(scope="module")
def detector(demo_models, cnn_baseline):
    return Detector.load(demo_models / "digits_cnn.onnx", cnn_baseline[0])


def test_artifact_layout_and_manifest(cnn_baseline):
    out, manifest = cnn_baseline
    assert {p.name for p in out.iterdir()} >= {"manifest.json", "arrays.npz", "introspection.onnx"}
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["schema_version"] == 2 and raw["model"]["sha256"] == manifest.model.sha256
    assert [s["kind"] for s in raw["scorers"]] == ["induced_persistence", "betti_density", "introspection",
                                                   "max_softmax", "mahalanobis", "knn", "nonzero_pixels", "energy",
                                                   "feature_squeezing", "layerwise_knn", "layerwise_mahalanobis",
                                                   "trust_score", "patch_pca"]
    assert {f["name"] for f in raw["flags"]} == {"adversarial", "likely_misclassified"}
    for rule in manifest.flags:
        for t in rule.thresholds:  # the conformal quantile keeps the held-out FPR at or below target
            assert t.heldout_fpr <= t.target_fpr
    # thresholds are set on the correctly classified threshold inputs; over all of them, the model's errors
    # count too, and likely_misclassified flags them
    mis = next(r for r in manifest.flags if r.name == "likely_misclassified").thresholds[0]
    assert manifest.heldout_metrics[f"likely_misclassified_flag_rate_all_clean@{mis.target_fpr}"] > mis.heldout_fpr
    with zipfile.ZipFile(out / "arrays.npz") as z:  # plain .npy members, no pickles
        assert all(name.endswith(".npy") for name in z.namelist())
    assert manifest.data.n_fit + manifest.data.n_reference == 539  # every held-out input is a reference;
    # all but the quarter the fusion choice read set the thresholds
    assert manifest.data.n_threshold == 199 and manifest.data.n_reference == 269 and manifest.data.threshold_folds == 10


def test_same_seed_same_artifact(demo_models, cnn_baseline, cnn_config, tmp_path):
    with pytest.warns(UserWarning, match=r"thresholds at FPR 0.01 rest on the top 2 of 19\d clean held-out statistics"):
        again = calibrate(demo_models / "digits_cnn.onnx", load_dataset("digits:calib"), tmp_path, cnn_config)
    a, b = read_baseline(cnn_baseline[0]), read_baseline(tmp_path)
    assert sorted(a[1]) == sorted(b[1])
    for key in a[1]:
        np.testing.assert_array_equal(a[1][key], b[1][key], err_msg=key)
    assert a[2] == b[2]  # introspection.onnx byte for byte
    assert again.model_dump(exclude={"created_at"}) == cnn_baseline[1].model_dump(exclude={"created_at"})


def test_clean_inputs_pass_and_noise_is_flagged(detector):
    test = load_dataset("digits:test")
    clean = detector.detect(test.x, fpr=0.05)
    noisy_x = np.clip(test.x + np.random.default_rng(0).normal(0, 0.3, test.x.shape), 0, 1).astype(np.float32)
    noisy = detector.detect(noisy_x, fpr=0.05)
    clean_rate = np.mean(["adversarial" in d.flags for d in clean.detections])
    noise_rate = np.mean(["adversarial" in d.flags for d in noisy.detections])
    # 5 % target: 360 clean inputs give a binomial standard deviation of 1.1 %; allow 3 sigma
    assert clean_rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(test)), clean_rate
    assert noise_rate > 0.5, noise_rate  # measured 0.66 (clean: 0.02)
    flagged = [d for d in noisy.detections if "adversarial" in d.flags]
    assert all(d.flags["adversarial"] for d in flagged)  # every flag names its reasons
    assert set(clean.stage_seconds) == {"inference", "topology", "introspection", "peers", "fusion"}
    d = clean.detections[0]
    assert 0 < min(d.p_values.values()) and max(d.p_values.values()) <= 1
    assert d.predicted_class == int(np.argmax(d.probabilities))


def test_likely_misclassified_flag_prefers_the_models_errors(detector):
    test = load_dataset("digits:test")
    batch = detector.detect(test.x, fpr=0.05)
    wrong = np.array([d.predicted_class for d in batch.detections]) != test.y
    stat = np.array([d.statistics["likely_misclassified"] for d in batch.detections])
    assert wrong.sum() >= 3
    assert stat[wrong].mean() > stat[~wrong].mean()


def test_detect_gives_the_p_values_and_statistics_of_the_checked_calls(detector):
    """detect() fuses with the unchecked kernels; they must agree with the public, validating methods."""
    x = load_dataset("digits:test").x[:64]
    batch = detector.detect(x)
    capture = detector.classify(x)
    p_values = detector.p_values(detector.raw_scores(capture), capture.predicted)
    statistics = detector.statistics(p_values)
    for i, d in enumerate(batch.detections):
        assert d.p_values == {n: p[i] for n, p in p_values.items()}
        assert d.statistics == pytest.approx({n: s[i] for n, s in statistics.items()}, rel=1e-12)
    assert any(d.flags for d in detector.detect(np.ones_like(x[:8])).detections)  # blank-white frames do flag


def test_a_nan_score_is_refused_with_its_name(detector, monkeypatch):
    from detector import InvalidInput

    knn = next(s for s in detector.scorers if s.kind == "knn")
    monkeypatch.setattr(knn, "scores", lambda capture: {"knn": np.full(len(capture), np.nan)})
    with pytest.raises(InvalidInput, match=r"the scores \['knn'\] are NaN"):
        detector.detect(load_dataset("digits:test").x[:2])


def test_uncalibrated_fpr_is_refused(detector):
    from detector import InvalidInput

    with pytest.raises(InvalidInput, match="no threshold calibrated for false-positive rate 0.2"):
        detector.detect(load_dataset("digits:test").x[:2], fpr=0.2)


def test_a_flag_rule_names_its_screen_with_a_share():
    rule = dict(name="f", scores=["a", "b"], fusion="fisher", thresholds=[], default_fpr=0.01)
    with pytest.raises(ValueError, match="screen and screen_share go together"):
        FlagRule(**rule, screen="c")
    screened = FlagRule(**rule, screen="c", screen_share=0.25)
    assert screened.members == ["a", "b", "c"] and FlagRule(**rule).members == ["a", "b"]
    assert screened.describe() == "fisher over a, b OR screen c (share 0.25)"


def test_a_baseline_for_another_model_is_refused(demo_models, cnn_baseline):
    with pytest.raises(BaselineError, match="calibrated for model digits_cnn.onnx.*calibrate a baseline for this model"):
        Detector.load(demo_models / "digits_mlp.onnx", cnn_baseline[0])


def test_newer_schema_missing_and_corrupt_files_are_refused(demo_models, cnn_baseline, tmp_path):
    model = demo_models / "digits_cnn.onnx"
    broken = tmp_path / "b"
    shutil.copytree(cnn_baseline[0], broken)
    raw = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(BaselineError, match="schema_version 99, newer than the 2 this advdetect reads"):
        Detector.load(model, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BaselineError, match="corrupt: not valid JSON"):
        Detector.load(model, broken)
    (broken / "manifest.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(BaselineError, match="invalid: surprise"):
        Detector.load(model, broken)
    (broken / "manifest.json").write_text(json.dumps(raw))
    (broken / "arrays.npz").write_bytes(b"garbage")
    with pytest.raises(BaselineError, match="arrays.npz is corrupt"):
        Detector.load(model, broken)
    np.savez(broken / "arrays.npz", evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BaselineError, match="would need pickle to load; refused"):
        Detector.load(model, broken)
    (broken / "introspection.onnx").unlink()
    shutil.copy(cnn_baseline[0] / "arrays.npz", broken / "arrays.npz")
    with pytest.raises(BaselineError, match="introspection.onnx is missing"):
        Detector.load(model, broken)
    arrays = dict(np.load(cnn_baseline[0] / "arrays.npz"))
    np.savez(broken / "arrays.npz", **{k: v for k, v in arrays.items() if k != "population/threshold_mean"})
    shutil.copy(cnn_baseline[0] / "introspection.onnx", broken / "introspection.onnx")
    with pytest.raises(BaselineError, match="population monitor's state is missing or corrupt"):
        Detector.load(model, broken)
    rules = [{**raw["flags"][0], "fusion": "median"}, *raw["flags"][1:]]
    (broken / "manifest.json").write_text(json.dumps({**raw, "flags": rules}))
    shutil.copy(cnn_baseline[0] / "arrays.npz", broken / "arrays.npz")
    with pytest.raises(BaselineError, match="unknown fusion 'median'"):
        Detector.load(model, broken)
    (broken / "manifest.json").write_text(json.dumps({**raw, "flags": [{**raw["flags"][0], "scores": ["psychic"]}]}))
    with pytest.raises(BaselineError, match=r"fuses scores \['psychic'\]"):
        Detector.load(model, broken)
    name = raw["scorers"][0]["score_names"][0]
    prefix = f"conformal/{name}/"
    offsets = arrays[prefix + "class_offsets"][:6]  # references of classes 0-4 only
    np.savez(broken / "arrays.npz", **{**arrays, prefix + "conditional": arrays[prefix + "conditional"][:5],
                                       prefix + "class_offsets": offsets,
                                       prefix + "class_values": arrays[prefix + "class_values"][:offsets[-1]]})
    (broken / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BaselineError, match=f"conformal references of {{'{name}': 5}} classes .* for a 10-class model"):
        Detector.load(model, broken)
    with pytest.raises(BaselineError, match="baseline directory not found"):
        Detector.load(model, tmp_path / "nowhere")


def test_cli_score_writes_every_score_and_flag(demo_models, cnn_baseline, tmp_path, capsys):
    test = load_dataset("digits:test")
    np.savez(tmp_path / "inputs.npz", x=test.x[:20])  # no labels: allowed for scoring
    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(demo_models / "digits_cnn.onnx"), "--baseline", str(cnn_baseline[0]),
                 "--inputs", str(tmp_path / "inputs.npz"), "--out", str(out), "--batch-size", "8"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 20 and rows[0]["label"] == "-1"
    for col in ("score_induced_persistence", "p_betti_density", "stat_adversarial", "flag_likely_misclassified"):
        assert col in rows[0]


def test_cli_calibrate_rejects_too_little_data(demo_models, tmp_path, capsys):
    np.savez(tmp_path / "small.npz", x=load_dataset("digits:test").x[:100], y=load_dataset("digits:test").y[:100])
    code = main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", str(tmp_path / "small.npz"),
                 "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 2
    assert "too few" in capsys.readouterr().err


def test_calibrate_refuses_data_the_model_mostly_gets_wrong(demo_models, tmp_path):
    data = load_dataset("digits:calib")
    wrong = Dataset(data.x, (data.y + 1) % 10, "digits:calib, labels shifted by one")
    with pytest.raises(DataError, match=r"the model classifies \d+ of the \d+ threshold inputs correctly; "
                                        r"thresholds at FPR 0.01 need >= 99"):
        calibrate(demo_models / "digits_cnn.onnx", wrong, tmp_path / "b", CalibrationConfig(progress=False))


def test_cli_calibrate_rejects_bad_settings(demo_models, tmp_path, capsys):
    code = main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "b"), "--fpr", "0.01,1.5", "--top-q", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid calibration settings" in err and "fprs.1" in err and "top_q" in err


def test_cli_evaluate_writes_the_results_table(demo_models, cnn_baseline, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(demo_models / "digits_cnn.onnx"),
                 "--baseline", str(cnn_baseline[0]), "--data", "digits:test",
                 "--attacks", "fgsm,misclassified", "--limit", "120", "--out", str(out), "--quiet"]) == 0
    table = json.loads((out / "results.json").read_text())
    assert table["model"] == "digits_cnn" and set(table["attacks"]) == {"fgsm", "misclassified"}
    fgsm = table["attacks"]["fgsm"]
    assert fgsm["n"] == round(fgsm["success_rate"] * table["n_clean"]) and fgsm["n"] > 100
    assert {"fused", "induced_persistence", "betti_density", "introspection_reconstruction", "introspection_error",
            "max_softmax", "mahalanobis", "knn", "nonzero_pixels", "offgrid_pixels"} <= set(fgsm["detectors"])
    assert table["pixel_levels"] == 255 and fgsm["detectors"]["offgrid_pixels"]["auroc"] == 0.5  # all on the grid
    assert table["channels_tied"] is False  # one channel: nothing to tie
    assert fgsm["detectors"]["fused"]["auroc"] > 0.9  # FGSM changes the background: easy to see
    assert set(fgsm["detectors"]["fused"]) == {"auroc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.05"}
    served = fgsm["served"]  # what the adversarial flag's calibrated thresholds flag
    # at 1 % the threshold is the largest of ~196 clean threshold statistics, which clean outliers set
    assert set(served) == {"0.01", "0.05"} and served["0.05"]["positives"] > 0.5
    assert served["0.05"]["positives"] >= served["0.01"]["positives"]
    assert served["0.05"]["clean"] >= served["0.01"]["clean"] and served["0.05"]["clean"] < 0.15
    assert "Served flag at its calibrated thresholds: target FPR 0.05: flags" in (out / "results.md").read_text()
    assert (out / "roc_fgsm.png").is_file() and "## fgsm" in (out / "results.md").read_text()
    assert main(["evaluate", "--model", str(demo_models / "digits_cnn.onnx"),
                 "--baseline", str(cnn_baseline[0]), "--data", "digits:test",
                 "--attacks", "nope", "--out", str(out), "--quiet"]) == 2
    assert "unknown attack(s) ['nope']" in capsys.readouterr().err


def test_cli_calibrate_without_tuning_attacks_keeps_the_default_fusion(demo_models, tmp_path, capsys):
    assert main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "b"), "--tuning-attacks", "none", "--quiet"]) == 0
    rule = next(r for r in read_baseline(tmp_path / "b")[0].flags if r.name == "adversarial")
    assert rule.scores == list(ADVERSARIAL_SCORES) and rule.fusion == "fisher" and rule.weights is None
    assert rule.selection == "default members (no tuning attacks)"
    assert (rule.screen, rule.screen_share) == ("patch_pca", 0.05)  # the screen does not need attacks
    assert ("flag adversarial: fisher over induced_persistence, betti_density, introspection_reconstruction, "
            "max_softmax OR screen patch_pca (share 0.05)") in capsys.readouterr().out
    assert main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "c"), "--tuning-attacks", "none", "--screen", "none", "--quiet"]) == 0
    unscreened = next(r for r in read_baseline(tmp_path / "c")[0].flags if r.name == "adversarial")
    assert unscreened.screen is None and unscreened.members == rule.scores
    assert main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "d"), "--screen-share", "1.5", "--quiet"]) == 2
    assert "screen_share: Input should be less than 1" in capsys.readouterr().err


def test_the_fit_split_is_capped_per_class_and_the_rest_is_held_out():
    labels = load_dataset("digits:calib").y
    uncapped = split_held_out(labels, fraction=0.5, seed=0)
    for got, want in zip(fit_split(labels, CalibrationConfig()), uncapped):  # 270 < 100 x 10: unchanged
        np.testing.assert_array_equal(got, want)
    fit, held = fit_split(labels, CalibrationConfig(max_fit_per_class=10))
    assert 95 <= len(fit) <= 105  # 10 per class on average, rounded per class
    assert np.isin(fit, uncapped[0]).all()  # the cap moves fit inputs to the held-out rows, nothing else
    np.testing.assert_array_equal(np.sort(np.r_[fit, held]), np.arange(len(labels)))
    share = np.bincount(labels[fit], minlength=10) / np.bincount(labels[uncapped[0]], minlength=10)
    assert share.min() > 0.3 and share.max() < 0.45  # stratified: about 100/270 of each class
    three = labels[labels < 3]  # the classes present count, not the model's ten
    assert 27 <= len(fit_split(three, CalibrationConfig(max_fit_per_class=10))[0]) <= 33


def test_cli_calibrate_with_a_fit_cap_fits_on_fewer_inputs_and_still_flags_noise(demo_models, tmp_path, capsys):
    assert main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "b"), "--tuning-attacks", "none", "--max-fit-per-class", "15",
                 "--quiet"]) == 0
    manifest = read_baseline(tmp_path / "b")[0]
    assert 145 <= manifest.data.n_fit <= 155
    assert manifest.data.n_reference == 539 - manifest.data.n_fit
    assert (f"fit {manifest.data.n_fit}, held-out {539 - manifest.data.n_fit} (references; thresholds on "
            f"{manifest.data.n_threshold} of them, cross-fitted in 10 folds)") in capsys.readouterr().out
    assert main(["calibrate", "--model", str(demo_models / "digits_cnn.onnx"), "--data", "digits:calib",
                 "--out", str(tmp_path / "c"), "--max-fit-per-class", "10", "--quiet"]) == 2
    assert "fewer than one population window of 128: raise max_fit_per_class (now 10)" in capsys.readouterr().err
    det = Detector.load(demo_models / "digits_cnn.onnx", tmp_path / "b")
    test = load_dataset("digits:test")
    noisy_x = np.clip(test.x + np.random.default_rng(0).normal(0, 0.3, test.x.shape), 0, 1).astype(np.float32)
    rate = {name: np.mean(["adversarial" in d.flags for d in det.detect(x, fpr=0.05).detections])
            for name, x in (("clean", test.x), ("noise", noisy_x))}
    # as test_clean_inputs_pass_and_noise_is_flagged, with a fit split of 150 inputs instead of 270
    assert rate["clean"] <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(test)) and rate["noise"] > 0.5, rate


def test_the_trust_score_is_ranked_against_every_class_the_others_within_theirs(demo_models, tmp_path):
    calibrate(demo_models / "digits_cnn.onnx", load_dataset("digits:calib"), tmp_path,
              CalibrationConfig(min_class_count=5, tuning_attacks=(), progress=False))  # ~13 references per class
    arrays = read_baseline(tmp_path)[1]
    assert arrays["conformal/max_softmax/conditional"].all()
    assert not arrays["conformal/trust_score/conditional"].any()  # GLOBAL_P_VALUES
