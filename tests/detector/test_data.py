"""Data readers: digits, .npz and IDX (gzipped and raw, including the real MNIST test set), with clear errors."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from detector import DataError, digits_split, load_dataset, read_idx
from detector.data import MNIST_DIR


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_digits_split_is_fixed_stratified_and_disjoint():
    parts = digits_split()
    assert {k: len(v) for k, v in parts.items()} == {"train": 898, "calib": 539, "test": 360}
    assert all(v.x.shape[1:] == (1, 8, 8) and v.x.dtype == np.float32 for v in parts.values())
    assert 0.0 <= min(v.x.min() for v in parts.values()) and max(v.x.max() for v in parts.values()) == 1.0
    for v in parts.values():  # every class in every part, in proportion
        counts = np.bincount(v.y, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    again = digits_split()
    assert all(np.array_equal(again[k].x, parts[k].x) for k in parts)
    rows = {k: {hashlib.sha1(img.tobytes()).hexdigest() for img in v.x} for k, v in parts.items()}
    assert not (rows["train"] & rows["test"]) and not (rows["calib"] & rows["test"])
    assert len(load_dataset("digits")) == 1797
    assert load_dataset("digits:calib").name == "digits:calib"


def test_real_mnist_idx(mnist_dir):
    ds = load_dataset(str(mnist_dir))
    assert ds.x.shape == (10000, 1, 28, 28) and ds.y.shape == (10000,)
    assert ds.x.dtype == np.float32 and ds.x.max() == 1.0 and ds.x.min() == 0.0
    assert np.bincount(ds.y).tolist()[:3] == [980, 1135, 1032]  # the published class counts of t10k
    same = load_dataset(str(mnist_dir / "t10k-images-idx3-ubyte.gz"))
    assert np.array_equal(same.x, ds.x)
    named = load_dataset("mnist")
    assert named.name == "mnist" and np.array_equal(named.x, ds.x) and np.array_equal(named.y, ds.y)
    parts = {name: load_dataset(f"mnist:{name}") for name in ("train", "calib", "test")}  # LeNet-5's split, in order
    assert [len(p) for p in parts.values()] == [6000, 2000, 2000] and parts["calib"].name == "mnist:calib"
    assert np.array_equal(np.concatenate([p.x for p in parts.values()]), ds.x)
    assert np.array_equal(parts["test"].y, ds.y[8000:])
    with pytest.raises(DataError, match="unknown mnist split 'eval'; expected one of train, calib, test"):
        load_dataset("mnist:eval")


def test_repository_carries_the_published_mnist_files():
    """The vendored copy is byte for byte the published t10k set (md5 sums of data/mnist/README.md)."""
    sums = {name: hashlib.md5((MNIST_DIR / name).read_bytes()).hexdigest()
            for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    assert sums == {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def test_raw_and_gzipped_idx_and_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    y = rng.integers(0, 10, 7).astype(np.uint8)
    for gz in (False, True):
        folder = tmp_path / ("gz" if gz else "raw")
        folder.mkdir()
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"train-images-idx3-ubyte{suffix}", x, gz)
        _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", y, gz)
        ds = load_dataset(str(folder))
        np.testing.assert_array_equal(ds.x[:, 0], x.astype(np.float32) / 255)
        np.testing.assert_array_equal(ds.y, y)
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.int64))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.x.shape == (7, 1, 5, 6) and ds.x.max() <= 1.0
    np.savez(tmp_path / "f.npz", x=rng.random((3, 1, 4, 4)).astype(np.float32), y=np.arange(3))
    assert load_dataset(str(tmp_path / "f.npz")).x.shape == (3, 1, 4, 4)


def test_a_large_uncompressed_npz_is_read_row_by_row(tmp_path, monkeypatch):
    import detector.data

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 3, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", x=x, y=np.arange(40) % 10)
    np.savez(tmp_path / "gray.npz", x=rng.random((9, 6, 5)).astype(np.float32), y=np.zeros(9, np.int64))
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=np.arange(40) % 10)
    assert isinstance(load_dataset(str(tmp_path / "big.npz")).x, np.ndarray)  # below LAZY_BYTES: loaded
    monkeypatch.setattr(detector.data, "LAZY_BYTES", 0)
    assert isinstance(load_dataset(str(tmp_path / "packed.npz")).x, np.ndarray)  # compressed: loaded
    lazy = load_dataset(str(tmp_path / "big.npz")).x
    assert isinstance(lazy, detector.data.NpzImages) and lazy.shape == (40, 3, 6, 5) and len(lazy) == 40
    want = x.astype(np.float32) / 255
    mask = np.arange(40) % 3 == 0
    for key in (slice(3, 17), slice(None), np.array([5, 1, 2, 3, 39]), mask, 7):
        np.testing.assert_array_equal(lazy[key], want[key])
    np.testing.assert_array_equal(np.asarray(lazy), want)
    gray = load_dataset(str(tmp_path / "gray.npz")).x
    assert gray.shape == (9, 1, 6, 5) and gray[2:4].dtype == np.float32
    rows = detector.data.Rows(lazy, np.array([9, 8, 7, 1]))
    assert rows.shape == (4, 3, 6, 5)
    np.testing.assert_array_equal(rows.select(np.array([True, False, True, True]))[0:2], want[[9, 7]])


def test_missing_file():
    with pytest.raises(DataError, match="data not found: '/nonexistent.npz'"):
        load_dataset("/nonexistent.npz")
    with pytest.raises(DataError, match="unknown digits split 'validation'"):
        load_dataset("digits:validation")


def test_wrong_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.npz").write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_dataset(str(tmp_path / "broken.npz"))
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match=r"missing \['y'\]"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad-images-idx3-ubyte")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="exactly one"):
        load_dataset(str(tmp_path / "empty"))


def test_mismatched_lengths(tmp_path):
    np.savez(tmp_path / "m.npz", x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_dataset(str(tmp_path / "m.npz"))
    _write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8), gz=False)
    _write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset(str(tmp_path / "a-images-idx3-ubyte"))
    # a truncated file: the header promises more bytes than there are
    raw = (tmp_path / "a-images-idx3-ubyte").read_bytes()
    (tmp_path / "t-images-idx3-ubyte").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="header says shape"):
        read_idx(tmp_path / "t-images-idx3-ubyte")
