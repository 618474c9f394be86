"""Population monitor: scores on the clean scale, state round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

from detector import InvalidInput, NotReady, OnnxClassifier, load_dataset
from detector.population import PopulationMonitor


@pytest.fixture(scope="module")
def monitor_and_model(demo_models):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    return PopulationMonitor(window_size=128, n_windows=12).fit(clf.run(load_dataset("digits:calib").x).activations), clf


def test_windows_get_finite_scores_on_the_clean_scale(monitor_and_model):
    # Measured, not asserted as a separation: on the digits CNN, clean test windows score 0.7-1.8 and FGSM,
    # foreground-PGD and CW windows 1.1-1.9 (see the service issue's note), so the monitor does not yet tell
    # attack campaigns from clean traffic at this window size.
    monitor, clf = monitor_and_model
    assert monitor.clean_scores_.shape == (12,) and abs(monitor.clean_scores_.mean() - 1.0) < 1e-9
    test = load_dataset("digits:test").x
    scores = [monitor.score(monitor.node_values(clf.run(test[i : i + 128]).activations)) for i in (0, 128, 232)]
    assert all(np.isfinite(s) and 0 <= s < 10 * monitor.clean_scores_.max() for s in scores), scores


def test_state_round_trip_and_errors(monitor_and_model):
    monitor, clf = monitor_and_model
    values = monitor.node_values(clf.run(load_dataset("digits:test").x[:128]).activations)
    restored = PopulationMonitor.from_state(*monitor.get_state())
    assert restored.score(values) == monitor.score(values)
    with pytest.raises(NotReady):
        PopulationMonitor().score(values)
    with pytest.raises(InvalidInput, match="fewer than one window"):
        PopulationMonitor(window_size=128).fit({k: v[:50] for k, v in clf.run(load_dataset("digits:test").x[:50]).activations.items()})
