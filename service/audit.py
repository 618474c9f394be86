"""Audit log of flagged inputs: JSON lines, written in the background, fsync'ed in batches, rotated.

One line per flagged input::

    {"v": 1, "request_id": "r-17", "index": 0, "time": "2025-01-01T12:00:00.123+00:00",
     "model": "digits_cnn", "baseline_version": "3f2a...", "predicted_class": 7,
     "scores": {"topology": 4.2, ...}, "p_values": {"topology": 0.002, ...},
     "flags": ["adversarial"], "reasons": {"adversarial": ["topology p=0.002 < 0.01"]},
     "input_npy_b64": "k05VTVBZ..."}          # only with include_inputs

Durability
----------
Request threads only encode a record and put it on a queue (:meth:`AuditLog.submit` never waits
for the disk). A writer thread takes records in batches (``flush_batch_size`` records, or whatever
arrived within ``flush_interval_s`` of a batch's first record), writes a batch with one
``write`` and then ``fsync``s, and only then counts its records as durable
(:attr:`AuditLog.durable_records`, the ``on_flush`` callback). A process killed with SIGKILL keeps
every durable record; it loses at most the batch being written (whose tail may be a torn, partly
written line) and records still queued. :class:`AuditReader` skips a torn last line and counts it.

A server with several processes writes one log per process, ``audit.worker<k>.jsonl`` beside the
configured path (:func:`worker_log_path`); the reader takes them all.

Rotation is by batch: when the next batch would take the file past ``max_bytes``, ``audit.jsonl``
becomes ``audit.jsonl.1`` (``.1`` becomes ``.2``, ... up to ``backups``; the oldest is dropped)
and a new file is started, so a line never spans two files. A single batch larger than
``max_bytes`` still goes whole into a fresh file. On opening an existing file whose last line was
torn by a crash, the writer first ends that line with a newline (it never deletes bytes); the
reader then skips it as a corrupt line.

If a write fails (disk full), the file is truncated back to its size before the batch, so no torn
line is left in the middle of the log; the batch is counted in :attr:`AuditLog.failed_records`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from detector.errors import DataError

__all__ = [
    "SCHEMA_VERSION",
    "AuditLog",
    "AuditReader",
    "audit_files",
    "worker_log_path",
    "make_record",
    "encode_input",
    "decode_input",
    "summarise",
    "format_summary",
    "print_summary",
]

logger = logging.getLogger(__name__)

#: Version of the record layout, stored as ``"v"`` in every record.
SCHEMA_VERSION = 1
_STOP = object()
_FLUSH = object()


# -- records --------------------------------------------------------------------------------------


def encode_input(array: np.ndarray) -> str:
    """An array as base64 text of its ``.npy`` bytes (``np.save``, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_input(text: str) -> np.ndarray:
    """Inverse of :func:`encode_input` (loads with ``allow_pickle=False``)."""
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)


def _finite_or_none(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def make_record(
    *,
    request_id: str,
    model: str,
    predicted_class: int,
    flags: Mapping[str, Sequence[str]],
    scores: Mapping[str, float] | None = None,
    p_values: Mapping[str, float] | None = None,
    index: int = 0,
    baseline_version: str | None = None,
    input_array: np.ndarray | None = None,
    time_utc: datetime | None = None,
) -> dict[str, Any]:
    """Build one audit record (a JSON-able dict) for one flagged input.

    Parameters
    ----------
    request_id : str
    model : str
        The served model's name.
    predicted_class : int
    flags : mapping of str to sequence of str
        Each raised flag's name and its reasons.
    scores, p_values : mapping of str to float, optional
        Non-finite values are stored as ``null`` (JSON has no NaN or Inf).
    index : int, default 0
        The input's position in its request's batch.
    baseline_version : str or None
    input_array : ndarray or None
        The input itself (one element of the batch), stored as base64 ``.npy`` when given.
    time_utc : datetime or None
        Defaults to now; stored as ISO 8601 with milliseconds and a UTC offset.
    """
    when = time_utc if time_utc is not None else datetime.now(timezone.utc)
    record: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "request_id": str(request_id),
        "index": int(index),
        "time": when.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "model": str(model),
        "baseline_version": None if baseline_version is None else str(baseline_version),
        "predicted_class": int(predicted_class),
        "scores": {str(k): _finite_or_none(v) for k, v in (scores or {}).items()},
        "p_values": {str(k): _finite_or_none(v) for k, v in (p_values or {}).items()},
        "flags": [str(name) for name in flags],
        "reasons": {str(name): [str(r) for r in reasons] for name, reasons in flags.items()},
    }
    if input_array is not None:
        record["input_npy_b64"] = encode_input(input_array)
    return record


def _encode_line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


# -- writer ---------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class AuditLog:
    """Append flagged-input records to a rotating JSON-lines file from a background thread.

    Parameters
    ----------
    path : str or Path
        The live file, e.g. ``audit.jsonl``; its folder must exist.
    max_bytes : int, default 64 MiB
        Rotate before a batch would take the file past this size.
    backups : int, default 5
        Rotated files kept: ``path.1`` (newest) ... ``path.<backups>``.
    flush_batch_size : int, default 64
        Records per write + fsync at most.
    flush_interval_s : float, default 1.0
        Longest a record waits for its batch to fill before the batch is written anyway.
    include_inputs : bool, default False
        Whether :meth:`log` stores the input array in the record.
    max_pending : int, default 10000
        Records queued at most; beyond that :meth:`submit` drops the record (counted in
        :attr:`dropped_records`) rather than make a request wait.
    on_flush : callable or None
        Called from the writer thread with :attr:`durable_records` after every fsync'ed batch.

    Examples
    --------
    >>> with AuditLog(tmp / "audit.jsonl", flush_batch_size=8) as log:  # doctest: +SKIP
    ...     log.log(request_id="r1", model="m", predicted_class=3, flags={"adversarial": ["p=0.001"]})
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 2**20,
        backups: int = 5,
        flush_batch_size: int = 64,
        flush_interval_s: float = 1.0,
        include_inputs: bool = False,
        max_pending: int = 10_000,
        on_flush: Callable[[int], None] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if backups < 1:
            raise ValueError(f"backups must be >= 1, got {backups}")
        if flush_batch_size < 1:
            raise ValueError(f"flush_batch_size must be >= 1, got {flush_batch_size}")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.flush_batch_size = int(flush_batch_size)
        self.flush_interval_s = float(flush_interval_s)
        self.include_inputs = bool(include_inputs)
        self.max_pending = int(max_pending)
        self.on_flush = on_flush
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending + 2)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._size = 0
        self._submitted = 0
        self._durable = 0
        self._failed = 0
        self._dropped = 0
        self._write_errors = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> AuditLog | None:
        """An (unstarted) log configured by a :class:`~service.settings.ServiceSettings`, or ``None``
        when ``audit_log_path`` is unset."""
        if settings.audit_log_path is None:
            return None
        return cls(
            settings.audit_log_path,
            max_bytes=settings.audit_max_bytes,
            backups=settings.audit_backups,
            flush_batch_size=settings.audit_flush_batch_size,
            flush_interval_s=settings.audit_flush_interval_s,
            include_inputs=settings.audit_include_inputs,
            **kwargs,
        )

    # -- counters -------------------------------------------------------------------------------
    @property
    def durable_records(self) -> int:
        """Records written and fsync'ed so far."""
        return self._durable

    @property
    def failed_records(self) -> int:
        """Records lost to write errors (e.g. disk full)."""
        return self._failed

    @property
    def dropped_records(self) -> int:
        """Records refused by :meth:`submit` because the queue was full."""
        return self._dropped

    @property
    def write_errors(self) -> int:
        """Batches whose write or fsync failed."""
        return self._write_errors

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> AuditLog:
        """Open (or create) the file and start the writer thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("the audit log is already started")
        self._open()
        self._thread = threading.Thread(target=self._run, name="advdetect-audit", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> AuditLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write and fsync everything submitted so far; True when done within ``timeout_s``."""
        self._require_running()
        with self._cond:
            target = self._submitted
        self._queue.put(_FLUSH)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._durable + self._failed < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Write everything queued, fsync, stop the thread and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # pragma: no cover - disk hung
                logger.error("audit log writer did not stop within %s s", timeout_s)
                return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _require_running(self) -> None:
        if self._thread is None or self._closed:
            raise RuntimeError("the audit log is not running; call start() first")

    # -- producers ------------------------------------------------------------------------------
    def submit(self, record: Mapping[str, Any]) -> bool:
        """Queue one record (a JSON-able mapping) for writing; never waits for the disk.

        Returns
        -------
        bool
            False when the record was dropped because ``max_pending`` records are queued.

        Raises
        ------
        TypeError, ValueError
            The record is not JSON-able (e.g. NaN floats, numpy scalars): a programming error.
        """
        self._require_running()
        line = _encode_line(record)
        with self._cond:
            if self._queue.qsize() >= self.max_pending:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    logger.warning("audit log queue full: %d record(s) dropped so far", self._dropped)
                return False
            self._submitted += 1
            self._queue.put_nowait(line)
        return True

    def log(
        self,
        *,
        request_id: str,
        model: str,
        predicted_class: int,
        flags: Mapping[str, Sequence[str]],
        scores: Mapping[str, float] | None = None,
        p_values: Mapping[str, float] | None = None,
        index: int = 0,
        baseline_version: str | None = None,
        input_array: np.ndarray | None = None,
    ) -> bool:
        """Build a record with :func:`make_record` (the input only if ``include_inputs``) and submit it."""
        record = make_record(
            request_id=request_id, model=model, predicted_class=predicted_class, flags=flags,
            scores=scores, p_values=p_values, index=index, baseline_version=baseline_version,
            input_array=input_array if self.include_inputs else None,
        )
        return self.submit(record)

    # -- writer thread --------------------------------------------------------------------------
    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            # A crash tore the last line: end it so that new records start on a line of their own.
            logger.warning("audit log %s ended in a torn line; terminating it", self.path)
            _write_all(fd, b"\n")
            os.fsync(fd)
            size += 1
        _fsync_dir(self.path.parent)
        self._fd, self._size = fd, size

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for i in range(self.backups - 1, 0, -1):
            if self._backup(i).exists():
                os.replace(self._backup(i), self._backup(i + 1))
        os.replace(self.path, self._backup(1))
        self._open()

    def _write_batch(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        try:
            if self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            before = self._size
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                partial = os.fstat(self._fd).st_size - before
                # Leave no partial batch behind: the next batch must start on a clean line.
                os.ftruncate(self._fd, before)
                raise OSError(
                    exc.errno, f"{exc.strerror} after {partial} of {len(data)} bytes; truncated back to {before} bytes"
                ) from exc
        except OSError as exc:
            logger.error("audit log %s: writing %d record(s) failed: %s", self.path, len(lines), exc)
            with self._cond:
                self._write_errors += 1
                self._failed += len(lines)
                self._cond.notify_all()
            if self._fd < 0:  # pragma: no cover - rotation itself failed; try to reopen
                self._open()
            self._size = os.fstat(self._fd).st_size
            return
        self._size += len(data)
        with self._cond:
            self._durable += len(lines)
            durable = self._durable
            self._cond.notify_all()
        if self.on_flush is not None:
            try:
                self.on_flush(durable)
            except Exception:  # a callback must never stop the writer
                logger.exception("audit log on_flush callback failed")

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[bytes] = []
            if item is _STOP:
                stopping = True
            elif item is not _FLUSH:
                batch.append(item)
                deadline = time.monotonic() + self.flush_interval_s
                while len(batch) < self.flush_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    if item is _FLUSH:
                        break
                    batch.append(item)
            if batch:
                self._write_batch(batch)
            else:
                with self._cond:
                    self._cond.notify_all()
        # Drain what was queued after the stop marker raced in (submit after close is refused).
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, bytes):
                rest.append(item)
        for start in range(0, len(rest), self.flush_batch_size):
            self._write_batch(rest[start:start + self.flush_batch_size])


# -- reader ---------------------------------------------------------------------------------------


def worker_log_path(path: str | Path, index: int) -> Path:
    """The audit file of server process ``index`` when several share the port: ``audit.worker<index>.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


def _rotated(path: Path) -> list[Path]:
    """One log's rotated backups and live file, oldest first (``path.N`` ... ``path.1``, ``path``)."""
    backups = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            backups.append((int(suffix), candidate))
    files = [p for _, p in sorted(backups, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def audit_files(path: str | Path) -> list[Path]:
    """The files of an audit log: ``path`` and the per-process logs beside it (:func:`worker_log_path`),
    each as its rotated backups then its live file, oldest first."""
    path = Path(path)
    workers = []
    for candidate in path.parent.glob(f"{path.stem}.worker*{path.suffix}"):
        index = candidate.name[len(path.stem) + len(".worker"):len(candidate.name) - len(path.suffix)]
        if index.isdigit():
            workers.append((int(index), candidate))
    return [f for log in [path, *(p for _, p in sorted(workers))] for f in _rotated(log)]


class AuditReader:
    """Iterate the records of an audit log and its rotated backups, oldest first.

    Lines that are not a JSON object are skipped and counted: a file's unterminated last line
    (torn by a crash mid-write) in :attr:`torn_lines`, any other in :attr:`corrupt_lines`. The
    counts are reset at the start of every iteration.

    Parameters
    ----------
    path : str or Path
        The live file (``audit.jsonl``).
    include_rotated : bool, default True
        Also read ``audit.jsonl.N`` ... ``audit.jsonl.1`` first, and the logs of the server's
        processes when it ran several (``audit.worker<k>.jsonl`` and their backups).

    Raises
    ------
    DataError
        On iteration, when neither the file nor any backup exists.
    """

    def __init__(self, path: str | Path, *, include_rotated: bool = True) -> None:
        self.path = Path(path)
        self.include_rotated = include_rotated
        self.torn_lines = 0
        self.corrupt_lines = 0
        self.files: list[Path] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.torn_lines = 0
        self.corrupt_lines = 0
        files = audit_files(self.path) if self.include_rotated else [self.path] if self.path.exists() else []
        if not files:
            raise DataError(f"audit log {self.path} does not exist (nor do rotated files {self.path.name}.N "
                            f"or per-process logs {self.path.stem}.worker<k>{self.path.suffix})")
        self.files = files
        for file in files:
            with open(file, "rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    terminated = raw.endswith(b"\n")
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        record = None
                    if isinstance(record, dict):
                        yield record
                    elif terminated:
                        self.corrupt_lines += 1
                        logger.warning("%s:%d is not a JSON record; skipped", file, number)
                    else:
                        self.torn_lines += 1
                        logger.warning("%s:%d is a torn last line (%d bytes); skipped", file, number, len(raw))


def summarise(path: str | Path) -> dict[str, Any]:
    """Summarise an audit log (with its rotated files).

    Returns
    -------
    dict
        ``path``, ``files``, ``records`` (flagged inputs), ``requests`` (distinct request ids),
        ``by_flag`` and ``by_predicted_class`` and ``by_model`` (counts, most frequent first; class
        keys are strings), ``with_inputs`` (records carrying the input), ``first_time`` and
        ``last_time`` (ISO 8601 or None), ``torn_lines``, ``corrupt_lines``. JSON-able.

    Raises
    ------
    DataError
        The log does not exist.
    """
    reader = AuditReader(path)
    by_flag: Counter[str] = Counter()
    by_class: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    requests: set[str] = set()
    records = with_inputs = 0
    first: datetime | None = None
    last: datetime | None = None
    for record in reader:
        records += 1
        by_flag.update(str(f) for f in record.get("flags", []))
        if "predicted_class" in record:
            by_class[str(record["predicted_class"])] += 1
        by_model[str(record.get("model"))] += 1
        requests.add(str(record.get("request_id")))
        with_inputs += "input_npy_b64" in record
        try:
            when = datetime.fromisoformat(str(record.get("time")))
        except ValueError:
            continue
        first = when if first is None or when < first else first
        last = when if last is None or when > last else last
    return {
        "path": str(Path(path)),
        "files": [str(f) for f in reader.files],
        "records": records,
        "requests": len(requests),
        "by_flag": dict(by_flag.most_common()),
        "by_predicted_class": dict(by_class.most_common()),
        "by_model": dict(by_model.most_common()),
        "with_inputs": with_inputs,
        "first_time": None if first is None else first.isoformat(timespec="milliseconds"),
        "last_time": None if last is None else last.isoformat(timespec="milliseconds"),
        "torn_lines": reader.torn_lines,
        "corrupt_lines": reader.corrupt_lines,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render :func:`summarise`'s result as a short human-readable report."""
    lines = [
        f"audit log      {summary['path']} ({len(summary['files'])} file(s))",
        f"flagged inputs {summary['records']} in {summary['requests']} request(s)",
        f"time range     {summary['first_time'] or '-'} .. {summary['last_time'] or '-'}",
    ]
    for title, key in (("by flag", "by_flag"), ("by predicted class", "by_predicted_class"), ("by model", "by_model")):
        counts = summary[key]
        lines.append(f"{title}:")
        if not counts:
            lines.append("  (none)")
        width = max((len(str(k)) for k in counts), default=0)
        lines.extend(f"  {str(k):<{width}}  {v}" for k, v in counts.items())
    lines.append(f"with inputs    {summary['with_inputs']}")
    lines.append(f"skipped lines  {summary['torn_lines']} torn, {summary['corrupt_lines']} corrupt")
    return "\n".join(lines)


def print_summary(path: str | Path, *, as_json: bool = False, file: TextIO | None = None) -> dict[str, Any]:
    """Print the summary of an audit log (text, or JSON with ``as_json``) and return it.

    For the CLI's ``advdetect audit FILE``.
    """
    summary = summarise(path)
    out = file if file is not None else sys.stdout
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(format_summary(summary), file=out)
    return summary
