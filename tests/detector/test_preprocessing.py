"""Folders of images, their preprocessing in the manifest, and normalisation written into the model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from detector.cli import main
from detector.data import load_dataset
from detector.errors import DataError, ModelError
from detector.model import OnnxClassifier
from detector.preprocessing import Preprocessing, add_normalization, read_image_folder
from detector.topology.graph_features import InducedGraphFeatures
from detector.topology.induced_graph import InducedGraph


def _write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Grey PNGs in one subfolder per class (named so that sorted order is the label order); returns the
    pixels as the PNGs hold them (8-bit)."""
    pixels = np.round(x[:, 0] * 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, y)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
    return pixels[:, None].astype(np.float32) / 255


def test_a_folder_of_digits_calibrates_and_scores_with_the_stored_preprocessing(demo_models: Path, tmp_path: Path) -> None:
    calib, test = load_dataset("digits:calib"), load_dataset("digits:test")
    _write_folder(tmp_path / "calib", calib.x, calib.y)
    expected = _write_folder(tmp_path / "test", test.x[:40], test.y[:40])
    model = demo_models / "digits_cnn.onnx"

    read = load_dataset(str(tmp_path / "test"), preprocessing=Preprocessing(channels=1))
    order = np.argsort(test.y[:40], kind="stable")  # files are read class by class
    np.testing.assert_array_equal(read.x, expected[order])
    np.testing.assert_array_equal(read.y, test.y[:40][order])

    baseline = tmp_path / "baseline"
    assert main(["calibrate", "--model", str(model), "--data", str(tmp_path / "calib"), "--out", str(baseline),
                 "--tuning-attacks", "none", "--quiet"]) == 0
    manifest = (baseline / "manifest.json").read_text()
    assert '"preprocessing": {' in manifest and '"channels": 1' in manifest

    out = tmp_path / "scores.csv"
    assert main(["score", "--model", str(model), "--baseline", str(baseline), "--inputs", str(tmp_path / "test"),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    predicted = OnnxClassifier(model).run(read.x).predicted
    assert [int(r["predicted_class"]) for r in rows] == predicted.tolist()
    assert [int(r["label"]) for r in rows] == read.y.tolist()


def test_a_large_folder_is_decoded_batch_by_batch(tmp_path: Path, monkeypatch) -> None:
    import detector.data

    test = load_dataset("digits:test")
    expected = _write_folder(tmp_path / "test", test.x[:30], test.y[:30])
    eager = load_dataset(str(tmp_path / "test"), preprocessing=Preprocessing(channels=1))
    assert isinstance(eager.x, np.ndarray)
    monkeypatch.setattr(detector.data, "LAZY_BYTES", 0)
    lazy = load_dataset(str(tmp_path / "test"), preprocessing=Preprocessing(channels=1))
    assert isinstance(lazy.x, detector.data.FolderImages) and lazy.x.shape == eager.x.shape == expected.shape
    np.testing.assert_array_equal(lazy.y, eager.y)
    np.testing.assert_array_equal(lazy.x[4:11], eager.x[4:11])
    np.testing.assert_array_equal(lazy.x[np.array([29, 0, 3])], eager.x[[29, 0, 3]])
    np.testing.assert_array_equal(lazy.x.head(5)[:], eager.x[:5])
    Image.fromarray(np.zeros((9, 9), np.uint8), mode="L").save(tmp_path / "test" / "class_00" / "zz_odd.png")
    odd = load_dataset(str(tmp_path / "test"), preprocessing=Preprocessing(channels=1))
    with pytest.raises(DataError, match="give a resize and a centre crop"):
        odd.x[:]


def test_resize_and_centre_crop_keep_the_middle_of_an_rgb_image(tmp_path: Path) -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 30:50] = (255, 0, 0)  # a red band in the middle 20 columns
    (tmp_path / "a").mkdir()
    Image.fromarray(image).save(tmp_path / "a" / "wide.png")
    Image.fromarray(image[:, :60]).save(tmp_path / "a" / "narrower.jpg", quality=100)

    with pytest.raises(DataError, match="different sizes"):
        read_image_folder(tmp_path, Preprocessing())
    x, y, classes = read_image_folder(tmp_path, Preprocessing(resize=20, crop=20))
    assert x.shape == (2, 3, 20, 20) and y.tolist() == [0, 0] and classes == ["a"]
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    wide = x[1]  # sorted file names: narrower.jpg, wide.png
    # 40x80 -> 20x40, whose centre columns 10..30 hold the band (now at 15..25) at 5..15: red, black around.
    assert wide[0, :, 6:14].min() > 0.9 and wide[1:, :, 6:14].max() < 0.05
    assert wide[:, :, :3].max() < 0.05 and wide[:, :, -3:].max() < 0.05


def test_an_unlabelled_folder_is_for_scoring_only(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "one.png")
    assert load_dataset(str(tmp_path), require_labels=False).y.tolist() == [-1]
    with pytest.raises(DataError, match="one subfolder of images per class"):
        load_dataset(str(tmp_path))


def test_normalisation_written_into_the_model_matches_normalising_the_input(demo_models: Path, tmp_path: Path) -> None:
    model = demo_models / "digits_cnn.onnx"
    copy = add_normalization(model, (0.5,), (0.25,), tmp_path / "normalised.onnx")
    x = load_dataset("digits:test").x[:32]

    def logits(path: Path, inputs: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]

    np.testing.assert_allclose(logits(copy, x), logits(model, (x - 0.5) / 0.25), rtol=1e-5, atol=1e-5)
    original, normalised = OnnxClassifier(model), OnnxClassifier(copy)
    assert normalised.input_name == original.input_name
    assert normalised.default_capture() == original.default_capture()
    # The induced graph starts from the normalised tensor: the topology features of the copy on pixels are
    # those of the original model on normalised pixels.
    features = []
    for classifier, inputs in ((original, (x[:5] - 0.5) / 0.25), (normalised, x[:5])):
        graph = InducedGraph.from_classifier(classifier)
        classifier.set_capture(graph.required_tensors)
        features.append(InducedGraphFeatures(graph).transform(classifier.run(inputs)))
    assert features[1]["persistence"].any()
    for name in features[0]:
        np.testing.assert_array_equal(features[1][name], features[0][name])

    with pytest.raises(ModelError, match="one value per input channel"):
        add_normalization(model, (0.5, 0.5, 0.5), (0.25,), tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match="std must be > 0"):
        add_normalization(model, (0.5,), (0.0,), tmp_path / "bad.onnx")
