"""Population monitor: clean windows on the clean scale, a broken stream far above, state round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

from detector import InvalidInput, NotReady, OnnxClassifier, load_dataset
from detector.topology.population import PopulationMonitor


@pytest.fixture(scope="module")
def monitor_and_model(demo_models):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    return PopulationMonitor(window_size=128, n_windows=12).fit(clf.run(load_dataset("digits:calib").x).activations), clf


def test_clean_windows_stay_on_the_clean_scale_and_a_broken_stream_stands_out(monitor_and_model):
    monitor, clf = monitor_and_model
    assert monitor.clean_scores_.shape == (12,) and abs(monitor.clean_scores_.mean() - 1.0) < 1e-9
    test = load_dataset("digits:test").x
    clean = [monitor.score(monitor.node_values(clf.run(test[i : i + 128]).activations)) for i in (0, 128, 232)]
    assert all(np.isfinite(c) and c >= 0 for c in clean), clean
    # a stream of nearly blank frames (a broken camera): the units stop co-varying as they do on digits
    blank = np.clip(np.random.default_rng(0).normal(0.02, 0.01, (128, 1, 8, 8)), 0, 1).astype(np.float32)
    broken = monitor.score(monitor.node_values(clf.run(blank).activations))
    assert broken > 2 * max(clean), (broken, clean)


def test_state_round_trip_and_errors(monitor_and_model):
    monitor, clf = monitor_and_model
    values = monitor.node_values(clf.run(load_dataset("digits:test").x[:128]).activations)
    restored = PopulationMonitor.from_state(*monitor.get_state())
    assert restored.score(values) == monitor.score(values)
    with pytest.raises(NotReady):
        PopulationMonitor().score(values)
    with pytest.raises(InvalidInput, match="fewer than one window"):
        PopulationMonitor(window_size=128).fit({k: v[:50] for k, v in clf.run(load_dataset("digits:test").x[:50]).activations.items()})
