"""Audit log: write, rotate, read, summarise; SIGKILL mid-write; a full disk; a torn tail on restart."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from detector.errors import DataError
from service.audit import (
    AuditLog,
    AuditReader,
    audit_files,
    decode_input,
    format_summary,
    make_record,
    print_summary,
    summarise,
)

CHILD = Path(__file__).with_name("audit_writer_child.py")
REPO = Path(__file__).resolve().parents[2]


def _seq(record) -> int:
    return int(record["request_id"].split("-")[1])


def _log_digit(log: AuditLog, seq: int, image: np.ndarray) -> None:
    log.log(
        request_id=f"seq-{seq:06d}", model="digits_cnn", predicted_class=seq % 10,
        flags={"adversarial": [f"topology p={0.001 * (seq + 1):.3f} < 0.01"]},
        scores={"topology": 3.0 + seq, "logit_margin": float("inf")},
        p_values={"topology": 0.001 * (seq + 1)}, index=seq % 4, baseline_version="b1", input_array=image,
    )


def test_write_rotate_and_read_back_real_digits(tmp_path) -> None:
    images = (load_digits().images[:30].astype(np.float32) / 16.0)[:, None]
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=12_000, backups=2, flush_batch_size=4, flush_interval_s=5.0, include_inputs=True)
    with log:
        for seq, image in enumerate(images):
            _log_digit(log, seq, image)
        assert log.flush(timeout_s=10)
        assert log.durable_records == 30
    files = audit_files(path)
    assert [f.name for f in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    for file in files:
        data = file.read_bytes()
        assert data.endswith(b"\n")
        lines = data.splitlines()
        assert len(lines) % 4 == 0 or file == path  # whole batches per rotated file
        assert len(data) <= 12_000
    reader = AuditReader(path)
    records = list(reader)
    seqs = [_seq(r) for r in records]
    # The oldest rotated files were dropped; what is left is the newest records, in order.
    assert seqs == list(range(30 - len(seqs), 30)) and len(seqs) >= 8
    assert reader.torn_lines == reader.corrupt_lines == 0
    last = records[-1]
    assert last["v"] == 1 and last["model"] == "digits_cnn" and last["predicted_class"] == 9
    assert last["flags"] == ["adversarial"] and last["reasons"]["adversarial"] == ["topology p=0.030 < 0.01"]
    assert last["scores"] == {"topology": 32.0, "logit_margin": None}  # Inf is not JSON: null
    np.testing.assert_array_equal(decode_input(last["input_npy_b64"]), images[29])
    datetime.fromisoformat(last["time"])  # ISO 8601
    live_only = list(AuditReader(path, include_rotated=False))
    assert [_seq(r) for r in live_only] == seqs[-len(live_only):]


def test_interval_flush_without_a_full_batch(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    flushed = []
    with AuditLog(path, flush_batch_size=1000, flush_interval_s=0.05, on_flush=flushed.append) as log:
        start = time.monotonic()
        log.log(request_id="r1", model="m", predicted_class=1, flags={"ood": ["far from the training data"]})
        while log.durable_records < 1 and time.monotonic() - start < 5:
            time.sleep(0.01)
        waited = time.monotonic() - start
        assert log.durable_records == 1 and flushed == [1]
        assert 0.04 <= waited < 2.0
        # Durable means readable by another reader while the log is still open.
        assert [r["request_id"] for r in AuditReader(path)] == ["r1"]
    assert log.include_inputs is False and "input_npy_b64" not in next(iter(AuditReader(path)))


def test_full_queue_drops_instead_of_blocking(tmp_path) -> None:
    gate = threading.Event()
    log = AuditLog(tmp_path / "a.jsonl", flush_batch_size=1, max_pending=3, on_flush=lambda n: gate.wait(10)).start()
    try:
        record = make_record(request_id="r", model="m", predicted_class=0, flags={"adversarial": []})
        assert log.submit(record)  # taken by the writer, which then blocks in on_flush
        while log.durable_records < 1:
            time.sleep(0.005)
        accepted = [log.submit(record) for _ in range(6)]
        assert accepted == [True, True, True, False, False, False]
        assert log.dropped_records == 3
        with pytest.raises(ValueError):
            log.submit({"score": float("nan")})  # not JSON: a programming error, raised at once
    finally:
        gate.set()
        log.close()
    assert log.durable_records == 4
    with pytest.raises(RuntimeError, match="not running"):
        log.submit(record)


def test_torn_tail_is_counted_then_terminated_on_restart(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, flush_batch_size=2) as log:
        for seq in range(5):
            log.log(request_id=f"seq-{seq:06d}", model="m", predicted_class=seq, flags={"adversarial": ["x"]})
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + 25])  # the last record cut 25 bytes in
    reader = AuditReader(path)
    assert [_seq(r) for r in reader] == [0, 1, 2, 3]
    assert (reader.torn_lines, reader.corrupt_lines) == (1, 0)
    with AuditLog(path) as log:  # restart: the torn line is ended, new records start cleanly
        log.log(request_id="seq-000005", model="m", predicted_class=5, flags={"adversarial": ["y"]})
    reader = AuditReader(path)
    assert [_seq(r) for r in reader] == [0, 1, 2, 3, 5]
    assert (reader.torn_lines, reader.corrupt_lines) == (0, 1)


def test_disk_full_partial_write_is_rolled_back(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [sys.executable, str(CHILD), "fsize", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    counters = json.loads(done.stdout)
    assert counters == {"durable": 8, "failed": 12, "write_errors": 3}
    # The kernel really wrote part of the third batch before refusing, and the writer cut it off.
    assert "File too large after" in done.stderr and "after 0 of" not in done.stderr
    assert path.read_bytes().endswith(b"\n")
    reader = AuditReader(path)
    assert [_seq(r) for r in reader] == list(range(8))
    assert (reader.torn_lines, reader.corrupt_lines) == (0, 0)


def _read_reports(stream, until_flushed: int | None, state: dict) -> None:
    for line in stream:
        kind, value = line.split()
        state["flushed" if kind == "F" else "submitted"] = int(value)
        if until_flushed is not None and kind == "F" and int(value) >= until_flushed:
            return


def _kill_mid_write(folder: Path, batch: int, elements: int, max_bytes: int, flushes: int) -> dict:
    """Run the child until `flushes` batches are durable, let it start the next write, SIGKILL it."""
    path = folder / "audit.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "kill", str(path), str(batch), str(elements), str(max_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
    )
    state = {"flushed": 0, "submitted": 0}
    try:
        for k in range(1, flushes + 1):
            _read_reports(proc.stdout, k * batch, state)
            assert state["flushed"] == k * batch, "the writer stopped reporting"
            if k < flushes:
                proc.stdin.write("\n")
                proc.stdin.flush()
        # The writer is parked in on_flush right after its fsync: the live file holds only whole batches.
        base = path.stat().st_size
        proc.stdin.write("\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while path.stat().st_size == base:  # the next batch's single write() has begun
            assert time.monotonic() < deadline, "the writer never started the next batch"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    _read_reports(proc.stdout, None, state)  # reports still in the pipe count as "reported before the kill"
    proc.stdout.close()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    state["path"] = path
    return state


def test_sigkill_mid_write_loses_at_most_the_unflushed_batch(tmp_path) -> None:
    batch, elements = 3, 1_500_000  # each record carries a 6 MB input: one batch is one ~24 MB write
    max_bytes = 60 * 2**20  # two batches per file: the kill lands in a rotated log's live file
    torn_seen = 0
    for trial in range(4):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        state = _kill_mid_write(folder, batch, elements, max_bytes, flushes=3)
        path = state["path"]
        assert len(audit_files(path)) == 2  # audit.jsonl.1 (batches 1-2) and audit.jsonl
        reader = AuditReader(path)
        seqs = []
        for record in reader:
            seq = _seq(record)
            assert decode_input(record["input_npy_b64"]).tolist()[:: elements // 4] == [float(seq)] * 4
            seqs.append(seq)
        reported = state["flushed"]
        # Every record of every batch reported flushed is there, in order, with nothing in between.
        assert seqs == list(range(len(seqs)))
        assert len(seqs) >= reported == 3 * batch
        # Only the batch being written can be incomplete: at most that batch is lost.
        assert state["submitted"] - len(seqs) <= batch
        assert len(seqs) - reported < batch
        live_tail = path.read_bytes()[-1:]
        torn = live_tail != b"\n"
        assert reader.torn_lines == int(torn) and reader.corrupt_lines == 0
        torn_seen += torn
        for file in audit_files(path):
            file.unlink()  # about 100 MB per trial
        if torn_seen:
            break
    # A kill during a 24 MB write() leaves part of it on disk: the reader met a torn line.
    assert torn_seen >= 1


def test_summary_of_known_records(tmp_path, capsys) -> None:
    path = tmp_path / "audit.jsonl"
    t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    plan = [
        ("r1", 7, {"adversarial": ["a"]}, 0),
        ("r1", 3, {"adversarial": ["a"], "out_of_distribution": ["b"]}, 5),
        ("r2", 7, {"misclassified": ["c"]}, 2),
        ("r3", 7, {"adversarial": ["d"]}, 9),
    ]
    with AuditLog(path, flush_batch_size=3) as log:
        for i, (rid, cls, flags, minutes) in enumerate(plan):
            log.submit(make_record(request_id=rid, model="digits_cnn", predicted_class=cls, flags=flags, index=i,
                                   time_utc=t0 + timedelta(minutes=minutes), input_array=np.zeros(2) if i == 0 else None))
    with open(path, "ab") as handle:
        handle.write(b'{"request_id": "r4", "flags": ["advers')  # a torn tail
    summary = summarise(path)
    assert summary == {
        "path": str(path),
        "files": [str(path)],
        "records": 4,
        "requests": 3,
        "by_flag": {"adversarial": 3, "out_of_distribution": 1, "misclassified": 1},
        "by_predicted_class": {"7": 3, "3": 1},
        "by_model": {"digits_cnn": 4},
        "with_inputs": 1,
        "first_time": "2025-03-01T12:00:00.000+00:00",
        "last_time": "2025-03-01T12:09:00.000+00:00",
        "torn_lines": 1,
        "corrupt_lines": 0,
    }
    text = format_summary(summary)
    assert "flagged inputs 4 in 3 request(s)" in text and "1 torn, 0 corrupt" in text
    assert "  adversarial          3" in text
    out = io.StringIO()
    assert print_summary(path, as_json=True, file=out) == summary
    assert json.loads(out.getvalue()) == summary
    print_summary(path)
    assert "by predicted class:" in capsys.readouterr().out
    with pytest.raises(DataError, match="does not exist"):
        summarise(tmp_path / "nothing.jsonl")
