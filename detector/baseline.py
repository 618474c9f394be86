"""Reading and writing the baseline artifact: a directory, never a pickle.

::

    BASELINE_DIR/
        manifest.json        Manifest (pydantic), schema_version first
        arrays.npz           every fitted array, keyed "<owner>/<name>", read with allow_pickle=False
        introspection.onnx   the introspection VAE + error estimator (if calibrated with it)
        report.html, *.png   the calibration report (not read back)

Loading never executes code: JSON is validated by pydantic, arrays come from ``numpy.load`` with
``allow_pickle=False`` (object arrays are refused) and the ONNX file is parsed by ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from detector.errors import BaselineError
from detector.manifest import SCHEMA_VERSION, Manifest

__all__ = ["MANIFEST", "ARRAYS", "INTROSPECTION", "write_baseline", "read_baseline", "check_model_matches"]

MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
INTROSPECTION = "introspection.onnx"


def write_baseline(directory: str | os.PathLike[str], manifest: Manifest, arrays: dict[str, np.ndarray],
                   introspection_onnx: bytes | None = None) -> Path:
    """Write ``manifest.json``, ``arrays.npz`` and (when given) ``introspection.onnx`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in arrays.items() if np.asarray(v).dtype == object]
    if bad:
        raise BaselineError(f"arrays {bad} have dtype object; a baseline holds plain numeric arrays only")
    np.savez_compressed(out / ARRAYS, **{k: np.asarray(v) for k, v in arrays.items()})
    if introspection_onnx is not None:
        (out / INTROSPECTION).write_bytes(introspection_onnx)
    # The manifest goes last: a directory with a manifest is complete.
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return out


def read_baseline(directory: str | os.PathLike[str]) -> tuple[Manifest, dict[str, np.ndarray], bytes | None]:
    """Read and validate a baseline directory.

    Returns
    -------
    manifest : Manifest
    arrays : dict of str to ndarray
    introspection_onnx : bytes or None

    Raises
    ------
    BaselineError
        Missing directory or file, unparsable or invalid manifest, a schema newer than this advdetect
        reads, a corrupt ``arrays.npz`` or one holding object arrays.
    """
    base = Path(directory)
    if not base.is_dir():
        raise BaselineError(f"baseline directory not found: {base}")
    path = base / MANIFEST
    if not path.is_file():
        raise BaselineError(f"{base} is not a baseline: {MANIFEST} is missing (run `advdetect calibrate` to make one)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path} is corrupt: not valid JSON ({exc})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise BaselineError(f"{path} has no integer schema_version; it is not an advdetect manifest")
    if version > SCHEMA_VERSION:
        raise BaselineError(
            f"{path} has schema_version {version}, newer than the {SCHEMA_VERSION} this advdetect reads; upgrade advdetect"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BaselineError(f"{path} is invalid: {where}: {first['msg']} ({exc.error_count()} error(s))") from None
    arrays_path = base / ARRAYS
    if not arrays_path.is_file():
        raise BaselineError(f"{base}: {ARRAYS} is missing")
    if not zipfile.is_zipfile(arrays_path):
        raise BaselineError(f"{arrays_path} is corrupt: not an .npz archive")
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise BaselineError(f"{arrays_path} holds arrays that would need pickle to load; refused ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BaselineError(f"{arrays_path} is corrupt: {exc}") from None
    onnx_path = base / INTROSPECTION
    needs_onnx = any(s.kind == "introspection" for s in manifest.scorers)
    if needs_onnx and not onnx_path.is_file():
        raise BaselineError(f"{base}: {INTROSPECTION} is missing but the manifest lists an introspection scorer")
    return manifest, arrays, (onnx_path.read_bytes() if needs_onnx else None)


def check_model_matches(manifest: Manifest, model_sha256: str, model_path: str | os.PathLike[str]) -> None:
    """Refuse a model other than the one the baseline was calibrated for (by SHA-256 of the file)."""
    if manifest.model.sha256 != model_sha256:
        raise BaselineError(
            f"the baseline was calibrated for model {manifest.model.file_name} (sha256 {manifest.model.sha256[:12]}...), "
            f"but {model_path} has sha256 {model_sha256[:12]}...; calibrate a baseline for this model"
        )
