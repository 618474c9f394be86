"""Fixtures shared by every test package: the embedded demo models and real data locations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.data import MNIST_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """Train the demo models once per test session (about 10 s): their folder and test accuracies."""
    from detector.offline.demo_models import build_demo_models

    out = tmp_path_factory.mktemp("demo_models")
    accuracies = build_demo_models(out, verbose=False)
    return out, accuracies


@pytest.fixture(scope="session")
def demo_models(demo_build: tuple[Path, dict[str, float]]) -> Path:
    """Folder with digits_{mlp,cnn}.onnx, digits_{mlp,cnn}.pt and digits_split.npz."""
    return demo_build[0]


@pytest.fixture(scope="session")
def digits_split_arrays(demo_models: Path) -> dict[str, np.ndarray]:
    """The arrays of digits_split.npz: x_train, y_train, x_calib, y_calib, x_test, y_test."""
    with np.load(demo_models / "digits_split.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder holding the real MNIST test set in IDX format (t10k-images/labels, gzipped)."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST data expected at {MNIST_DIR} (data/mnist in the repository)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def cnn_config():
    """Default settings but for the flags' default FPR, 5 % instead of 1 %: digits:calib keeps ~196 correct
    threshold inputs, so the 1 % threshold is their largest statistic, which a few far clean outliers set
    (16.1; the clean test digits' 99th percentile is 6.1; a disjoint half of the held-out inputs put it above
    10 for 30 of 40 seeds). Tests that serve the baseline and expect FGSM flagged use the 5 % threshold."""
    from detector.calibration import CalibrationConfig

    return CalibrationConfig(fprs=(0.05, 0.01), progress=False)


@pytest.fixture(scope="session")
def cnn_baseline(demo_models: Path, tmp_path_factory: pytest.TempPathFactory, cnn_config):
    """A baseline calibrated for the digits CNN on digits:calib (``cnn_config``): its folder and manifest."""
    from detector import load_dataset
    from detector.calibration import calibrate

    out = tmp_path_factory.mktemp("baseline_cnn")
    manifest = calibrate(demo_models / "digits_cnn.onnx", load_dataset("digits:calib"), out, cnn_config)
    return out, manifest
