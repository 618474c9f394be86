"""Data readers shared by every CLI command: the builtin digits, ``.npz`` files, IDX (MNIST) files and
folders of images.

Every reader returns images as float32 in [0, 1] with shape (n_samples, C, H, W) and labels as int64,
so a model trained on one source reads the others the same way.

=====================  ======================================================================================
spec                   meaning
=====================  ======================================================================================
``digits``             all 1,797 images of :func:`sklearn.datasets.load_digits` (8x8, pixel values 0..16 / 16)
``digits:SPLIT``       one part of the fixed, seeded, stratified split (``train``, ``calib``, ``test``) used by
                       the demo models (:func:`digits_split`)
``mnist``              the real MNIST test set (10,000 images, 28x28) that the project carries in ``data/mnist``
                       (:data:`MNIST_DIR`)
``mnist:SPLIT``        its images [0, 6000) (``train``), [6000, 8000) (``calib``) or [8000, 10000) (``test``):
                       LeNet-5's split in the demo and the benchmarks (:func:`mnist_split`)
``FILE.npz``           arrays ``x`` (n, H, W) or (n, C, H, W) and ``y`` (n,); uint8 pixels are divided by 255.
                       An ``x`` stored uncompressed (``numpy.savez``) of more than :data:`LAZY_BYTES` as float32
                       is not loaded: its rows are read from the file batch by batch (:class:`NpzImages`)
``DIR``                a folder with exactly one ``*images-idx3-ubyte[.gz]`` and its ``*labels-idx1-ubyte[.gz]``
``FILE-idx3-ubyte``    an IDX images file (gzipped or raw); labels are the matching ``labels-idx1`` file
``IMAGE_DIR``          PNG/JPEG images in class subfolders (or unlabelled, directly in the folder), read with a
                       :class:`~detector.preprocessing.Preprocessing` (resize, centre crop, channels); more than
                       :data:`LAZY_BYTES` of them as float32 are decoded batch by batch (:class:`FolderImages`)
=====================  ======================================================================================
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.errors import DataError
from detector.preprocessing import Preprocessing, image_files, is_image_folder, read_images

__all__ = ["Dataset", "FolderImages", "LazyImages", "NpzImages", "Rows", "load_dataset", "digits_split", "mnist_split",
           "read_idx", "MNIST_SPLIT",
           "DIGITS_SPLIT_SEED", "LAZY_BYTES", "MNIST_DIR"]

#: Seed of the fixed digits split; changing it changes every demo model and baseline.
DIGITS_SPLIT_SEED = 0
_DIGITS_FRACTIONS = {"train": 0.5, "calib": 0.3, "test": 0.2}
#: The MNIST test set (t10k, gzipped IDX) carried in the repository, read by the ``mnist`` spec.
MNIST_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
#: The ``mnist:SPLIT`` parts: image index ranges [start, stop) of the MNIST test set.
MNIST_SPLIT = {"train": (0, 6000), "calib": (6000, 8000), "test": (8000, 10000)}
#: An uncompressed ``.npz`` image array larger than this (as float32) is read from the file batch by batch.
LAZY_BYTES = 512 * 2**20
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    """Images and labels.

    Attributes
    ----------
    x : ndarray of shape (n_samples, C, H, W), float32 in [0, 1], or LazyImages
        The images; a large uncompressed ``.npz`` or image folder gives a :class:`LazyImages`, whose slices
        and index arrays read those rows only (what streaming does, :mod:`detector.stream`).
    y : ndarray of shape (n_samples,), int64
    name : str
        Where it came from (the spec), for reports.
    preprocessing : Preprocessing or None
        How a folder's images were resized and cropped (None for array data); ``calibrate`` stores it in
        the manifest.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    preprocessing: Preprocessing | None = None

    def __len__(self) -> int:
        return int(len(self.y))


class Rows:
    """Rows ``index`` of an image array, read only when sliced: ``rows[a:b]`` is a float32 ndarray.

    Streaming selects the inputs of a split with it (``Rows(data.x, fit_idx)``) without copying their pixels
    at once; :meth:`select` narrows the selection, again without reading.

    Parameters
    ----------
    x : ndarray or LazyImages of shape (n, ...)
    index : ndarray of int, optional
        Rows of ``x``, in this order (default: all).
    """

    def __init__(self, x: "np.ndarray | LazyImages", index: np.ndarray | None = None):
        self.x = x
        self.index = np.arange(len(x)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.x.shape[1:])

    def select(self, which: np.ndarray) -> "Rows":
        """The rows ``which`` (integer positions or a boolean mask over this selection), not read yet."""
        return Rows(self.x, self.index[which])

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("Rows are read by slices; select() picks rows without reading them")
        return np.asarray(self.x[self.index[rows]], dtype=np.float32)


class LazyImages:
    """Images read only when indexed: ``x[key]`` for an integer, a slice, an integer array or a boolean mask
    is a float32 ndarray, as if the array had been loaded; ``numpy.asarray`` reads everything.

    Large data sets are given as such (:class:`NpzImages`, :class:`FolderImages`), so that streaming
    (:mod:`detector.stream`) holds one batch of pixels at a time. Subclasses read rows in :meth:`_read`.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def head(self, n: int) -> "LazyImages":
        """The first ``n`` rows, still unread."""
        raise NotImplementedError

    def __getitem__(self, key: "int | slice | np.ndarray") -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(np.arange(len(self))[[key]])[0]
        return self._read(np.arange(len(self))[key].reshape(-1))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype, copy=False)


class NpzImages(LazyImages):
    """The images ``x`` of an uncompressed ``.npz``, read row by row from the file (never mapped into memory).

    uint8 pixels are divided by 255 as they are read. Each read is one ``os.pread`` per run of consecutive
    rows, into a fresh buffer, so that the process's memory holds only what was asked for.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        super().__init__(shape)
        self.path = Path(path)
        self._offset = int(offset)
        self._stored = np.dtype(dtype)
        self._row_items = int(np.prod(shape[1:]))

    def head(self, n: int) -> "NpzImages":
        return NpzImages(self.path, self._offset, self._stored, (min(int(n), len(self)), *self.shape[1:]))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self._row_items), dtype=self._stored)
        row_bytes = self._row_items * self._stored.itemsize
        with open(self.path, "rb") as fh:
            start = 0
            while start < len(rows):  # one read per run of consecutive rows
                stop = start + 1
                while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                    stop += 1
                raw = os.pread(fh.fileno(), (stop - start) * row_bytes, self._offset + int(rows[start]) * row_bytes)
                if len(raw) != (stop - start) * row_bytes:
                    raise DataError(f"{self.path}: the file ends before row {int(rows[stop - 1])}")
                out[start:stop] = np.frombuffer(raw, dtype=self._stored).reshape(stop - start, -1)
                start = stop
        return _as_float32(out.reshape(len(rows), *self.shape[1:]))


class FolderImages(LazyImages):
    """A folder's images, decoded and preprocessed when read (:func:`detector.preprocessing.read_images`)."""

    def __init__(self, files: list[Path], preprocessing: Preprocessing, shape: tuple[int, ...], source: str):
        super().__init__(shape)
        self.files = list(files)
        self.preprocessing = preprocessing
        self.source = source

    def head(self, n: int) -> "FolderImages":
        return FolderImages(self.files[:n], self.preprocessing, (min(int(n), len(self)), *self.shape[1:]), self.source)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        x = read_images([self.files[r] for r in rows], self.preprocessing, self.source) if len(rows) else \
            np.empty((0, *self.shape[1:]), np.float32)
        if x.shape[1:] != self.shape[1:]:
            raise DataError(f"{self.source}: images of shape {x.shape[1:]} after preprocessing, the first one has "
                            f"{self.shape[1:]}: give a resize and a centre crop")
        return x


def _npz_member(path: Path, name: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
    """Offset of the data, dtype and shape of member ``name`` of an .npz when it is stored uncompressed."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            header = fh.tell()
        if fortran or dtype.hasobject:
            return None
        with open(path, "rb") as raw:  # the member's data starts after its local file header
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
        return info.header_offset + 30 + int(name_len) + int(extra_len) + header, dtype, tuple(shape)


def digits_split(seed: int = DIGITS_SPLIT_SEED) -> dict[str, Dataset]:
    """The fixed stratified train / calib / test split (50 / 30 / 20 %) of the sklearn digits.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut at the same fractions, so the
    split is identical on every machine.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _DIGITS_FRACTIONS}
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_train = int(round(len(idx) * _DIGITS_FRACTIONS["train"]))
        n_calib = int(round(len(idx) * _DIGITS_FRACTIONS["calib"]))
        parts["train"].append(idx[:n_train])
        parts["calib"].append(idx[n_train : n_train + n_calib])
        parts["test"].append(idx[n_train + n_calib :])
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        out[name] = Dataset(x[idx], y[idx], f"digits:{name}")
    return out


def mnist_split() -> dict[str, Dataset]:
    """The MNIST test set cut in order at :data:`MNIST_SPLIT` (train 6,000, calib 2,000, test 2,000 images)."""
    mnist = load_dataset("mnist")
    return {name: Dataset(mnist.x[a:b], mnist.y[a:b], f"mnist:{name}") for name, (a, b) in MNIST_SPLIT.items()}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw.

    The header is two zero bytes, a dtype code, the number of dimensions d, then d big-endian uint32 sizes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() if raw else 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says shape {dims} ({expected} bytes) but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _as_float32(x: np.ndarray) -> np.ndarray:
    """Pixels as float32: uint8 divided by 255, other numbers cast."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _check_images(shape: tuple[int, ...], dtype: np.dtype, source: str) -> None:
    if len(shape) not in (3, 4):
        raise DataError(f"{source}: images must have shape (n, H, W) or (n, C, H, W), got {shape}")
    if dtype.kind not in "fiu":
        raise DataError(f"{source}: images must be numeric, got dtype {dtype}")


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    _check_images(x.shape, x.dtype, source)
    return _as_float32(x[:, None] if x.ndim == 3 else x)


def _pair(x: "np.ndarray | LazyImages", y: np.ndarray | None, source: str) -> Dataset:
    x = x if isinstance(x, LazyImages) else _as_images(np.asarray(x), source)
    y = np.full(len(x), -1, np.int64) if y is None else np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{source}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: the data set is empty")
    return Dataset(x if isinstance(x, LazyImages) else np.ascontiguousarray(x), y.astype(np.int64), source)


def _idx_label_file(images: Path) -> Path:
    name = images.name.replace("images-idx3", "labels-idx1")
    if name == images.name:
        raise DataError(f"{images}: an IDX images file name must contain 'images-idx3' to find its labels")
    candidates = [images.with_name(name), images.with_name(name.removesuffix(".gz")), images.with_name(name + ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"no labels file for {images}: expected {candidates[0]}")


def load_dataset(spec: str, require_labels: bool = True, preprocessing: Preprocessing | None = None) -> Dataset:
    """Read a data set named by ``spec`` (see the module docstring for the forms it takes).

    With ``require_labels=False`` a ``.npz`` file may hold ``x`` alone and a folder of images may have no
    class subfolders; their labels are then -1 (unknown). ``preprocessing`` applies to folders of images
    only (default: RGB, no resize or crop).

    Raises
    ------
    DataError
        Missing file, unknown format, mismatched lengths, or an unknown digits split.
    """
    if spec == "digits":
        parts = digits_split()
        return Dataset(
            np.concatenate([p.x for p in parts.values()]), np.concatenate([p.y for p in parts.values()]), "digits"
        )
    if spec.startswith("digits:"):
        split = spec.split(":", 1)[1]
        parts = digits_split()
        if split not in parts:
            raise DataError(f"unknown digits split {split!r}; expected one of {', '.join(parts)}")
        return parts[split]
    if spec.startswith("mnist:"):
        split = spec.split(":", 1)[1]
        if split not in MNIST_SPLIT:
            raise DataError(f"unknown mnist split {split!r}; expected one of {', '.join(MNIST_SPLIT)}")
        return mnist_split()[split]
    if spec == "mnist":
        if not MNIST_DIR.is_dir():
            raise DataError(f"'mnist' is the MNIST test set of a source checkout ({MNIST_DIR}), which this "
                            "installation does not have; name an IDX file or folder instead")
        images = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
        return _pair(read_idx(images), read_idx(_idx_label_file(images)), "mnist")
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data not found: {spec!r} is neither 'digits', 'digits:SPLIT', 'mnist', 'mnist:SPLIT' nor "
                        "an existing file or folder")
    if path.is_dir() and not any("images-idx3-ubyte" in p.name for p in path.iterdir()) and is_image_folder(path):
        preprocessing = preprocessing or Preprocessing()
        files, y, _ = image_files(path)
        if require_labels and (y < 0).any():
            raise DataError(f"{path}: labelled data needs one subfolder of images per class")
        first = preprocessing.pixels(files[0])
        if len(files) * first.size * 4 > LAZY_BYTES:  # decoded batch by batch when read
            return Dataset(FolderImages(files, preprocessing, (len(files), *first.shape), str(path)), y, str(path),
                           preprocessing)
        return Dataset(read_images(files, preprocessing, path), y, str(path), preprocessing)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if "images-idx3-ubyte" in p.name)
        if len(images) != 1:
            raise DataError(
                f"{path}: expected exactly one '*images-idx3-ubyte[.gz]' file in the folder, found {len(images)}"
                + (f" ({', '.join(p.name for p in images)}); name the file instead" if images
                   else ", nor any PNG/JPEG images in it or in class subfolders")
            )
        path = images[0]
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = ({"x", "y"} if require_labels else {"x"}) - set(npz.files)
                if missing:
                    raise DataError(f"{path}: a .npz data file needs arrays 'x' and 'y'; missing {sorted(missing)}")
                y = npz["y"] if "y" in npz.files else None
                lazy = _npz_member(path, "x")
                if lazy is not None and int(np.prod(lazy[2])) * 4 > LAZY_BYTES:
                    _check_images(lazy[2], lazy[1], str(path))
                    offset, dtype, shape = lazy
                    shape = shape if len(shape) == 4 else (shape[0], 1, *shape[1:])
                    return _pair(NpzImages(path, offset, dtype, shape), y, str(path))
                return _pair(npz["x"], y, str(path))
        except DataError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, ValueError for object arrays, ...
            raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    if "idx3-ubyte" in path.name:
        return _pair(read_idx(path), read_idx(_idx_label_file(path)), str(path))
    raise DataError(f"{path}: unknown data format; expected a .npz file, an IDX images file, a folder holding one, "
                    "or a folder of images")
