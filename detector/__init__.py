"""advdetect's detector library: capture activations from an ONNX classifier and score them."""

from detector.capture import Capture, softmax
from detector.data import Dataset, digits_split, load_dataset, read_idx
from detector.errors import AdvDetectError, BaselineError, DataError, InvalidInput, ModelError, NotReady
from detector.model import LayerInfo, OnnxClassifier, file_sha256
from detector.pipeline import STAGES, Detection, DetectionBatch, Detector
from detector.topology.structure import extract_structure

__version__ = "0.1.0"

__all__ = [
    "AdvDetectError",
    "BaselineError",
    "Capture",
    "Detection",
    "DetectionBatch",
    "Detector",
    "DataError",
    "Dataset",
    "InvalidInput",
    "LayerInfo",
    "ModelError",
    "NotReady",
    "STAGES",
    "OnnxClassifier",
    "digits_split",
    "extract_structure",
    "file_sha256",
    "load_dataset",
    "read_idx",
    "softmax",
]
