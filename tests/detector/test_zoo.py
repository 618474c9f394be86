"""Real architectures end to end: narrow ResNet-18, MobileNetV2 (SE gates, HardSwish) and ViT, trained briefly on
MNIST padded to 32x32 and repeated to 3 channels, calibrate and flag FGSM inputs, not clean ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detector import load_dataset
from detector.calibration import CalibrationConfig, calibrate
from detector.data import Dataset
from detector.offline.demo_models import accuracy, export_onnx, train_classifier
from detector.offline.zoo import MobileNetV2, ResNet, ViT, mnist32
from detector.pipeline import Detector

#: narrow model factory and training epochs (a few seconds each)
_NARROW = {
    "resnet18": (lambda: ResNet.resnet18(width=4), 3),
    "mobilenetv2": (lambda: MobileNetV2(width=0.5, se=True, act=nn.Hardswish,
                                       settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2))), 3),
    "vit": (lambda: ViT(dim=32, depth=2, heads=2), 10),
}


@pytest.fixture(scope="module")
def mnist_32() -> dict[str, Dataset]:
    data = mnist32(load_dataset("mnist"))
    part = lambda a, b: Dataset(data.x[a:b], data.y[a:b], f"mnist-32[{a}:{b}]")  # noqa: E731
    return {"train": part(0, 1500), "calib": part(1500, 1900), "test": part(1900, 2100)}


def test_mnist32_is_padded_and_repeated(mnist_32):
    x = mnist_32["train"].x
    assert x.shape[1:] == (3, 32, 32) and x.dtype == np.float32
    assert (x[:, :, :2] == 0).all() and (x[:, :, :, -2:] == 0).all()
    np.testing.assert_array_equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize("name", list(_NARROW))
def test_narrow_real_architecture_calibrates_and_flags_fgsm(tmp_path, mnist_32, name):
    torch.set_num_threads(1)
    factory, epochs = _NARROW[name]
    model = train_classifier(factory(), mnist_32["train"], epochs=epochs, seed=0, lr=3e-3)
    test = mnist_32["test"]
    assert accuracy(model, test) > 0.6
    export_onnx(model, test.x, tmp_path / "model.onnx")
    calibrate(tmp_path / "model.onnx", mnist_32["calib"], tmp_path / "baseline",
              CalibrationConfig(fprs=(0.05,), window_size=32, introspection_hidden=(32, 32), max_edges=100_000,
                                progress=False))
    detector = Detector.load(tmp_path / "model.onnx", tmp_path / "baseline")
    x = torch.from_numpy(test.x).requires_grad_(True)
    nn.functional.cross_entropy(model(x), torch.from_numpy(test.y)).backward()
    adversarial = np.clip(test.x + 0.2 * np.sign(x.grad.numpy()), 0, 1).astype(np.float32)
    clean, attacked = detector.detect(test.x, fpr=0.05), detector.detect(adversarial, fpr=0.05)
    fooled = np.array([d.predicted_class for d in attacked.detections]) != test.y
    right = np.array([d.predicted_class for d in clean.detections]) == test.y
    # the target rate is on clean inputs the model gets right; 3 sd of the test rate and of the threshold,
    # a quantile of the ~170 correct held-out inputs' statistics
    clean_rate = np.mean(["adversarial" in d.flags for d, r in zip(clean.detections, right) if r])
    caught = np.mean(["adversarial" in d.flags for d, f in zip(attacked.detections, fooled) if f])
    assert fooled.mean() > 0.5
    n_threshold = right.mean() * detector.manifest.data.n_threshold
    assert clean_rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / right.sum() + 0.05 * 0.95 / (n_threshold + 2)), clean_rate
    assert caught > 0.4, caught
    assert set(clean.stage_seconds) == {"inference", "topology", "introspection", "peers", "fusion"}
