"""Demo models reach their accuracy, LeNet-5 trains on real MNIST, and the CLI prints tables or clear errors."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from detector import OnnxClassifier, load_dataset
from detector.cli import main
from detector.data import Dataset


def test_demo_models_reach_95_percent(demo_build):
    folder, accuracies = demo_build
    assert set(accuracies) == {"digits_mlp", "digits_cnn"}
    assert min(accuracies.values()) >= 0.95, accuracies
    for name in accuracies:
        assert (folder / f"{name}.onnx").is_file() and (folder / f"{name}.pt").is_file()
        clf = OnnxClassifier(folder / f"{name}.onnx")  # the exported file agrees with the reported accuracy
        with np.load(folder / "digits_split.npz") as split:
            acc = float(np.mean(clf.run(split["x_test"]).predicted == split["y_test"]))
        assert abs(acc - accuracies[name]) < 1e-9


def test_demo_models_are_deterministic(demo_models, tmp_path):
    from detector.offline.demo_models import build_demo_models

    build_demo_models(tmp_path, verbose=False)
    x = np.load(demo_models / "digits_split.npz")["x_test"]
    a = OnnxClassifier(demo_models / "digits_cnn.onnx").run(x).logits
    b = OnnxClassifier(tmp_path / "digits_cnn.onnx").run(x).logits
    np.testing.assert_array_equal(a, b)


def test_lenet5_trains_on_real_mnist(mnist_dir, tmp_path):
    from detector.offline.demo_models import train_lenet5

    data = load_dataset(str(mnist_dir))
    train = Dataset(data.x[:3000], data.y[:3000], "mnist[:3000]")
    test = Dataset(data.x[3000:4000], data.y[3000:4000], "mnist[3000:4000]")
    trained = train_lenet5(train, test, tmp_path, epochs=6, verbose=False)
    assert trained.test_accuracy > 0.9
    clf = OnnxClassifier(tmp_path / "lenet5.onnx")
    assert [layer.shape for layer in clf.layers() if layer.post_activation] == [(6, 24, 24), (16, 8, 8), (120,), (84,)]


def test_cli_layers_prints_a_table(demo_models, capsys):
    assert main(["layers", "--model", str(demo_models / "digits_cnn.onnx")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^/1/Relu_output_0 +Relu +16x8x8 +1024 +whole +induced graph +topology, introspection, "
                     r"layerwise_knn, layerwise_mahalanobis, population$", out, re.M), out
    assert re.search(r"^/8/Relu_output_0 +Relu +64 +64 +whole +induced graph +topology, introspection, mahalanobis, knn, ",
                     out, re.M), out
    assert "10 classes" in out
    assert out.count("population") == 3 and "channel means" not in out.split("\n\n")[0]  # the three ReLUs, whole
    assert "outside the edge budget" not in out and "opaque" not in out  # the whole graph fits the budget
    assert main(["layers", "--model", str(demo_models / "digits_cnn.onnx"), "--max-edges", "10000"]) == 0
    small = capsys.readouterr().out
    assert re.search(r"^/1/Relu_output_0 .* outside the edge budget +introspection, ", small, re.M), small
    assert re.search(r"^logits +Gemm .* induced graph$", small, re.M), small


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("not onnx")
    proc = subprocess.run([sys.executable, "-m", "detector.cli", "layers", "--model", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "advdetect layers: error:" in proc.stderr and "not a valid ONNX model" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "detector.cli", "train-lenet5", "--data", "/no/such/dir",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "data not found" in proc.stderr and "Traceback" not in proc.stderr


def test_library_imports_without_torch():
    code = "import sys, detector, detector.model, detector.data, detector.topology.structure; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
