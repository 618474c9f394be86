"""Fixtures of the adaptive-attack tests: the digits CNN's detector and its differentiable mirror."""

from __future__ import annotations

import pytest

from detector.pipeline import Detector


@pytest.fixture(scope="module")
def cnn_detector(demo_models, cnn_baseline) -> Detector:
    """The digits CNN with its default baseline, one ONNX Runtime thread."""
    return Detector.load(demo_models / "digits_cnn.onnx", cnn_baseline[0], intra_op_threads=1)


@pytest.fixture(scope="module")
def cnn_mirror(cnn_detector):
    """:class:`detector.offline.mirror.DetectorMirror` of :func:`cnn_detector` (imports torch)."""
    import torch

    from detector.offline.mirror import DetectorMirror

    torch.set_num_threads(1)
    return DetectorMirror(cnn_detector)
