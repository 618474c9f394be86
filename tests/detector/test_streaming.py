"""The default capture of real architectures and streaming: block outputs, wide layers as channel means computed in
the ONNX graph, reduced captures that score exactly as full ones, calibration from a lazily read .npz, and a
detector that computes only the scores its flags fuse."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from detector import InvalidInput, load_dataset
from detector.calibration import CalibrationConfig, calibrate
from detector.capture import Capture, channel_means, mean_source
from detector.model import MAX_DEFAULT_FEATURES, WIDE_LAYER_UNITS, OnnxClassifier
from detector.offline.demo_models import LeNet5, export_onnx
from detector.offline.zoo import ResNet
from detector.pipeline import Detector
from detector.stream import reduced_capture, reduced_chunks


@pytest.fixture(scope="module")
def narrow_resnet(tmp_path_factory) -> OnnxClassifier:
    """ResNet-18 of width 8 at 32x32 with seeded random weights: stage 1 maps have 8,192 units, stage 4 1,024."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18_w8.onnx"
    export_onnx(ResNet.resnet18(width=8), np.zeros((1, 3, 32, 32), np.float32), path)
    return OnnxClassifier(path)


def test_default_capture_reads_block_outputs_and_averages_wide_ones_in_the_graph(narrow_resnet):
    clf = narrow_resnet
    blocks = clf.block_outputs()
    assert len(blocks) == 8 and all(b.endswith("relu_1/Relu_output_0") for b in blocks)  # the ReLU after each Add
    stem = next(layer.name for layer in clf.layers() if layer.post_activation)
    tensors = [mean_source(k) or k for k in clf.default_capture()]
    assert tensors == [stem, *blocks]
    sizes = {layer.name: layer.size for layer in clf.layers()}
    assert all(mean_source(key) for key in clf.default_capture())  # block outputs as channel means, whatever their size
    assert min(sizes[mean_source(key)] for key in clf.default_capture()) <= WIDE_LAYER_UNITS
    assert clf.default_capture()[0] == channel_means(stem) and clf.capture_shape(channel_means(stem)) == (8,)

    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    clf.set_capture([stem, channel_means(stem), blocks[-1], channel_means(blocks[-1])])
    capture = clf.run(x)
    for name in (stem, blocks[-1]):
        whole = capture.activations[name]
        means = capture.activations[channel_means(name)]
        assert means.shape == whole.shape[:2]
        np.testing.assert_allclose(means, whole.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_too_many_block_features_keep_the_last_block_of_each_stage(tmp_path):
    """A bottleneck ResNet (3, 4, 6, 3) of width 32 has 16 blocks giving 7,584 channel means: the default reads the
    stem and the end of each stage (1,952), as Lee et al. do."""
    torch.manual_seed(0)
    export_onnx(ResNet((3, 4, 6, 3), bottleneck=True, width=32), np.zeros((1, 3, 32, 32), np.float32), tmp_path / "r.onnx")
    clf = OnnxClassifier(tmp_path / "r.onnx")
    blocks = clf.block_outputs()
    shapes = {layer.name: layer.shape for layer in clf.layers()}
    assert len(blocks) == 16 and sum(shapes[b][0] for b in blocks) > MAX_DEFAULT_FEATURES
    stem = next(layer.name for layer in clf.layers() if layer.post_activation)
    ends = [blocks[i] for i in (2, 6, 12, 15)]
    assert [mean_source(k) or k for k in clf.default_capture()] == [stem, *ends]
    assert sum(clf.capture_shape(k)[0] for k in clf.default_capture()) == 32 + 128 + 256 + 512 + 1024


def test_capture_keys_are_checked(narrow_resnet):
    with pytest.raises(InvalidInput, match=r"unknown layer name\(s\) \['mean\(/nope\)'\]"):
        narrow_resnet.set_capture(["mean(/nope)"])
    with pytest.raises(InvalidInput, match="without a channel axis"):
        narrow_resnet.set_capture([channel_means("logits")])


def test_small_models_capture_every_post_activation_layer_whole(demo_models, tmp_path):
    """LeNet-5 and the digits models keep the capture they had before channel means and block outputs."""
    export_onnx(LeNet5(), np.zeros((1, 1, 28, 28), np.float32), tmp_path / "lenet5.onnx")
    for path in (tmp_path / "lenet5.onnx", demo_models / "digits_cnn.onnx", demo_models / "digits_mlp.onnx"):
        clf = OnnxClassifier(path)
        post = [layer.name for layer in clf.layers() if layer.post_activation and layer.name != clf.output_name]
        assert clf.default_capture() == post and not clf.block_outputs()


def _batchwise(detector: Detector, x: np.ndarray, size: int) -> Capture:
    return Capture.concatenate([detector.classify(x[i:i + size]) for i in range(0, len(x), size)])


def test_a_reduced_capture_scores_exactly_as_the_full_one(demo_models, cnn_baseline):
    detector = Detector.load(demo_models / "digits_cnn.onnx", cnn_baseline[0])
    x = load_dataset("digits:test").x[:200]
    hidden = detector.manifest.model.captured_layers
    reduced = reduced_capture(detector.model, x, detector.scorers, keep=hidden, batch_size=50)
    full = _batchwise(detector, x, 50)
    assert reduced.inputs is None and not reduced.squeezed_logits
    assert set(reduced.features) == {"induced_persistence", "betti_density", "nonzero_pixels", "feature_squeezing",
                                     "patch_pca"}
    assert set(reduced.activations) <= set(full.activations) and set(hidden) <= set(reduced.activations)
    assert "/6/Flatten_output_0" in full.activations and "/6/Flatten_output_0" not in reduced.activations  # topology's
    for scorer in detector.scorers:
        for name, values in scorer.scores(full).items():
            np.testing.assert_array_equal(scorer.scores(reduced)[name], values, err_msg=name)


def test_a_reduced_capture_of_a_wide_model_keeps_neither_pixels_nor_wide_maps(narrow_resnet):
    """What calibration keeps of an input of the width-8 ResNet-18: logits, the default layers (channel means) and the
    topology and feature-squeezing features; the whole tensors of
    the edge-budget window and the squeezed copies' logits are dropped once their features are computed."""
    from detector.calibration import build_scorers

    clf = OnnxClassifier(narrow_resnet.path)
    hidden = clf.default_capture()
    scorers = build_scorers(clf, CalibrationConfig(max_edges=100_000), ["bit_depth_1", "median_2x2"])
    window = [t for t in scorers[0].required_tensors() if t not in hidden]
    clf.set_capture(list(dict.fromkeys(hidden + [t for s in scorers for t in s.required_tensors()])))
    x = np.random.default_rng(1).random((6, 3, 32, 32), dtype=np.float32)
    reduced = reduced_capture(clf, x, scorers, keep=hidden, batch_size=4)
    assert len(reduced) == 6 and reduced.inputs is None and window
    assert set(reduced.activations) == set(hidden) and not set(window) & set(reduced.activations)
    assert all(a.ndim == 2 for a in reduced.activations.values())  # channel means only
    assert not reduced.squeezed_logits and reduced.features["feature_squeezing"].shape == (6,)
    assert reduced.features["induced_persistence"].shape[0] == 6


def test_calibration_streams_a_lazily_read_npz_in_small_chunks_to_the_same_baseline(demo_models, cnn_baseline,
                                                                                    cnn_config, tmp_path, monkeypatch):
    import detector.calibration
    import detector.data

    data = load_dataset("digits:calib")
    np.savez(tmp_path / "calib.npz", x=data.x, y=data.y)  # stored uncompressed: read row by row
    monkeypatch.setattr(detector.data, "LAZY_BYTES", 0)
    # held-out inputs captured 100 at a time instead of 256: the chunk bounds memory and changes no score
    monkeypatch.setattr(detector.calibration, "reduced_chunks", functools.partial(reduced_chunks, chunk_size=100))
    lazy = load_dataset(str(tmp_path / "calib.npz"))
    assert isinstance(lazy.x, detector.data.NpzImages)
    manifest = calibrate(demo_models / "digits_cnn.onnx", lazy, tmp_path / "baseline", cnn_config)
    reference = cnn_baseline[1]
    assert manifest.data.sha256 == reference.data.sha256
    # the same rules; scores and thresholds equal up to the last bits of matrix products of other shapes
    assert [r.model_dump(exclude={"thresholds"}) for r in manifest.flags] == \
        [r.model_dump(exclude={"thresholds"}) for r in reference.flags]
    assert [t.value for r in manifest.flags for t in r.thresholds] == \
        pytest.approx([t.value for r in reference.flags for t in r.thresholds], rel=1e-12)
    with np.load(tmp_path / "baseline" / "arrays.npz") as got, np.load(cnn_baseline[0] / "arrays.npz") as want:
        assert set(got.files) == set(want.files)
        for key in want.files:
            if key.startswith(("conformal/", "population/", "scorer/induced_persistence/", "scorer/layerwise")):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=0, err_msg=key)
    assert "Captured layers and their readers" in (tmp_path / "baseline" / "report.html").read_text()
    assert json.loads((tmp_path / "baseline" / "manifest.json").read_text())["model"]["captured_layers"] == \
        reference.model.captured_layers


def test_a_detector_of_the_flagged_scores_only_flags_the_same(demo_models, cnn_baseline):
    full = Detector.load(demo_models / "digits_cnn.onnx", cnn_baseline[0])
    lean = Detector.load(demo_models / "digits_cnn.onnx", cnn_baseline[0], flagged_scores_only=True)
    flagged = {n for rule in full.manifest.flags for n in rule.members}
    assert flagged <= set(lean.score_names) < set(full.score_names)
    assert all(flagged & set(s.score_names) for s in lean.scorers)
    x = load_dataset("digits:test").x
    a, b = full.detect(x), lean.detect(x)
    for d, e in zip(a.detections, b.detections):
        assert d.flags == e.flags and d.statistics == e.statistics
        assert {n: d.p_values[n] for n in flagged} == {n: e.p_values[n] for n in flagged}
