"""Images for real models: folders of PNG/JPEG files, their preprocessing, and normalisation in the model.

advdetect works in **pixel space**: every input is float32 in [0, 1], shape (n, C, H, W), the form an 8-bit
image takes after division by 255. The attacks round to that grid, feature squeezing reduces its bit depth,
and the service receives it. Two steps of a usual image pipeline therefore live in two places:

- **resize and centre crop** (:class:`Preprocessing`) turn a folder's images of any size into the model's
  input size. The spec is stored in the baseline manifest (``data.preprocessing``) by ``calibrate`` and
  applied again by ``evaluate`` and ``score`` to folder data; clients of ``serve`` must send images already
  resized and cropped this way, as pixels in [0, 1];
- **mean/std normalisation** belongs to the model: :func:`add_normalization` writes a copy of an ONNX model
  that computes ``(x - mean) / std`` per channel before its first layer, so that the model advdetect serves
  takes pixels. A model exported with its normalisation outside (as torchvision's are) gets it this way.

A folder of images follows the usual class-subfolder layout (torchvision's ``ImageFolder``): one subfolder
per class, classes numbered in sorted order of their names; a folder with images and no subfolders is
unlabelled (labels -1, for ``score``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from detector.errors import DataError, ModelError

if TYPE_CHECKING:
    import onnx

__all__ = ["IMAGE_SUFFIXES", "Preprocessing", "add_normalization", "image_files", "input_channels", "is_image_folder",
           "read_image_folder", "read_images"]

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Preprocessing(BaseModel):
    """How a folder's images become model inputs (pixels in [0, 1], shape (C, H, W)).

    Attributes
    ----------
    channels : 1 or 3
        Grey (PIL mode ``L``) or RGB.
    resize : int or None
        The shorter side is resized to this many pixels (bilinear, aspect ratio kept); None: no resize.
    crop : int or None
        A centre square of this many pixels is cut (after the resize); None: no crop.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: Literal[1, 3] = 3
    resize: int | None = Field(None, ge=1)
    crop: int | None = Field(None, ge=1)

    def pixels(self, path: Path) -> np.ndarray:
        """The image file at ``path`` as float32 pixels in [0, 1], shape (channels, H, W)."""
        from PIL import Image

        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"{path}: not a readable image ({exc})") from None
        if self.resize is not None:
            scale = self.resize / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        if self.crop is not None:
            if min(image.size) < self.crop:
                raise DataError(f"{path}: {image.width}x{image.height} pixels after the resize, smaller than the "
                                f"{self.crop}-pixel centre crop")
            left, top = (image.width - self.crop) // 2, (image.height - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array[None] if self.channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` holds images, directly or in class subfolders."""
    return bool(_images(folder)) or any(p.is_dir() and _images(p) for p in folder.iterdir())


def image_files(folder: str | os.PathLike[str]) -> tuple[list[Path], np.ndarray, list[str]]:
    """The images of a folder in reading order, their labels (int64) and the class names.

    Class subfolders give labels 0, 1, ... in sorted order of their names; images directly in ``folder``
    (and no subfolders with images) are unlabelled (-1).
    """
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and _images(p))
    files = [(path, label) for label, name in enumerate(classes) for path in _images(folder / name)]
    if not classes:
        files = [(path, -1) for path in _images(folder)]
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its class subfolders")
    return [path for path, _ in files], np.asarray([label for _, label in files], dtype=np.int64), classes


def read_images(files: list[Path], preprocessing: Preprocessing, source: str | os.PathLike[str]) -> np.ndarray:
    """The images ``files`` after ``preprocessing``, stacked: (n, C, H, W) float32 in [0, 1] (all one size)."""
    x = [preprocessing.pixels(path) for path in files]
    shapes = {a.shape for a in x}
    if len(shapes) > 1:
        raise DataError(f"{source}: the images have {len(shapes)} different sizes after preprocessing "
                        f"({', '.join(str(s[1:]) for s in sorted(shapes)[:3])}, ...): give a resize and a centre crop")
    return np.stack(x)


def read_image_folder(folder: str | os.PathLike[str], preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a folder of images: (x of shape (n, C, H, W) float32 in [0, 1], labels int64, class names).

    Class subfolders give labels 0, 1, ... in sorted order of their names; images directly in ``folder``
    (and no subfolders with images) are unlabelled (-1). Every image must have the same size after
    ``preprocessing``; otherwise set its ``resize`` and ``crop``.
    """
    files, labels, classes = image_files(folder)
    return read_images(files, preprocessing, folder), labels, classes


def _image_input(model: "onnx.ModelProto", path: str | os.PathLike[str]) -> tuple[str, int]:
    """The name and channel count of the model's one (n, C, H, W) input."""
    initialised = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialised]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].dim_value:
        raise ModelError(f"{path}: input {inputs[0].name!r} must have shape (n, C, H, W) with a fixed C")
    return inputs[0].name, int(dims[1].dim_value)


def input_channels(model_path: str | os.PathLike[str]) -> int:
    """C of the (n, C, H, W) input of the ONNX model at ``model_path``."""
    from detector.model import load_onnx

    return _image_input(load_onnx(Path(model_path)), model_path)[1]


def add_normalization(model_path: str | os.PathLike[str], mean: tuple[float, ...], std: tuple[float, ...],
                      out: str | os.PathLike[str]) -> Path:
    """Write a copy of the ONNX model at ``model_path`` that takes pixels in [0, 1] and normalises them.

    The copy computes ``(x - mean[c]) / std[c]`` for each channel c of its input, then runs the original
    graph; its input keeps the original name, shape and type. ``mean`` and ``std`` are in pixel units
    ([0, 1]), one value per input channel (or one for all).
    """
    import onnx
    from onnx import helper, numpy_helper

    from detector.model import load_onnx

    model = load_onnx(Path(model_path))
    graph = model.graph
    name, channels = _image_input(model, model_path)
    values = {}
    for key, given in (("mean", mean), ("std", std)):
        if len(given) not in (1, channels):
            raise ModelError(f"{key} needs one value per input channel ({channels}) or one for all, got {len(given)}")
        values[key] = np.broadcast_to(np.asarray(given, dtype=np.float32), (channels,)).reshape(1, channels, 1, 1)
    if not np.all(values["std"] > 0):
        raise ModelError(f"std must be > 0, got {std}")
    normalized = f"{name}__normalized"
    for node in graph.node:
        for k, used in enumerate(node.input):
            if used == name:
                node.input[k] = normalized
    graph.initializer.extend([numpy_helper.from_array(values["mean"], f"{name}__mean"),
                              numpy_helper.from_array(values["std"], f"{name}__std")])
    nodes = [helper.make_node("Sub", [name, f"{name}__mean"], [f"{name}__centred"], name=f"{name}__sub_mean"),
             helper.make_node("Div", [f"{name}__centred", f"{name}__std"], [normalized], name=f"{name}__div_std")]
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + original)  # topological order: the new nodes first
    onnx.checker.check_model(model)
    out = Path(out)
    onnx.save(model, str(out))
    return out
