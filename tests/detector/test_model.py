"""OnnxClassifier: capture equals torch, one ORT run, and every user error gets a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from detector import InvalidInput, ModelError, OnnxClassifier
from detector.offline.demo_models import DigitsCNN, DigitsMLP

FACTORIES = {"digits_mlp": DigitsMLP, "digits_cnn": DigitsCNN}


def _torch_module(demo_models: Path, name: str) -> torch.nn.Module:
    """The nn.Module behind the TorchScript copy, so that real forward hooks can be registered."""
    module = FACTORIES[name]()
    module.load_state_dict(torch.jit.load(str(demo_models / f"{name}.pt")).state_dict())
    return module.eval()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_captured_activations_equal_torch_forward_hooks(demo_models, digits_split_arrays, name):
    x = digits_split_arrays["x_test"]
    clf = OnnxClassifier(demo_models / f"{name}.onnx")
    capture = clf.run(x)
    module = _torch_module(demo_models, name)
    recorded: dict[str, np.ndarray] = {}
    for index, child in module.named_children():
        child.register_forward_hook(lambda _m, _i, out, key=index: recorded.__setitem__(key, out.detach().numpy()))
    with torch.no_grad():
        logits = module(torch.from_numpy(x)).numpy()
    assert capture.activations, "the default capture must not be empty"
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in module.children())
    assert len(capture.activations) == n_relu  # every post-activation hidden layer, and only those
    for tensor_name, value in capture.activations.items():
        index = tensor_name.split("/")[1]  # TorchScript-based export names tensors "/<module path>/<Op>_output_0"
        assert isinstance(module[int(index)], torch.nn.ReLU)
        np.testing.assert_allclose(value, recorded[index], atol=1e-4, rtol=0)
    np.testing.assert_allclose(capture.logits, logits, atol=1e-4, rtol=0)


def test_one_ort_run_yields_logits_and_all_activations(demo_models, digits_split_arrays, monkeypatch):
    x = digits_split_arrays["x_test"][:32]
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx", capture=[layer.name for layer in OnnxClassifier(
        demo_models / "digits_cnn.onnx").layers() if layer.name != "logits"])
    calls = []
    real_run = clf._session.run
    monkeypatch.setattr(clf._session, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k), raising=False)
    capture = clf.run(x)
    assert len(calls) == 1
    assert set(capture.activations) == set(clf.capture) and len(clf.capture) == 9
    import onnxruntime as ort

    plain = ort.InferenceSession(str(demo_models / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(capture.logits, plain.run(None, {"input": x})[0], atol=1e-6)
    assert (capture.predicted == capture.logits.argmax(1)).all()


# -- user errors -------------------------------------------------------------------------------------

def test_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        OnnxClassifier(bad)
    with pytest.raises(ModelError, match="model file not found"):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_a_model_without_a_classifier_shaped_output(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "g", [x], [y])
    path = tmp_path / "regressor.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)]), path)
    with pytest.raises(ModelError, match=r"must have shape \(batch, n_classes\)"):
        OnnxClassifier(path)


def test_an_input_of_the_wrong_shape(demo_models):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    with pytest.raises(InvalidInput, match=r"input must have shape \('batch', 1, 8, 8\), got \(2, 1, 28, 28\)"):
        clf.run(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(InvalidInput, match="must have shape"):
        clf.run(np.zeros((1, 8, 8), np.float32))


def test_an_input_of_the_wrong_dtype(demo_models):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    with pytest.raises(InvalidInput, match="real numbers.*got dtype <U1"):
        clf.run(np.full((1, 1, 8, 8), "a"))
    with pytest.raises(InvalidInput, match="got dtype complex"):
        clf.run(np.zeros((1, 1, 8, 8), np.complex64))
    # integers are real numbers: accepted and cast to the model's float32
    assert clf.run(np.zeros((1, 1, 8, 8), np.int64)).logits.shape == (1, 10)


def test_nan_or_inf_in_the_input(demo_models):
    clf = OnnxClassifier(demo_models / "digits_cnn.onnx")
    x = np.zeros((3, 1, 8, 8), np.float32)
    x[1, 0, 2, 2] = np.nan
    with pytest.raises(InvalidInput, match=r"NaN or Inf values \(1 of 3 inputs\)"):
        clf.run(x)
    x[1, 0, 2, 2] = np.inf
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        clf.run(x)


def test_an_empty_batch(demo_models):
    clf = OnnxClassifier(demo_models / "digits_mlp.onnx")
    with pytest.raises(InvalidInput, match="empty batch"):
        clf.run(np.zeros((0, 1, 8, 8), np.float32))


def test_an_unknown_layer_name(demo_models):
    with pytest.raises(InvalidInput, match=r"unknown layer name\(s\) \['/9/Nope'\].*capturable layers are"):
        OnnxClassifier(demo_models / "digits_mlp.onnx", capture=["/9/Nope"])
