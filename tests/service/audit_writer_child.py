"""Helper process for test_service_audit.py: writes audit records through a real AuditLog.

``python audit_writer_child.py kill PATH BATCH ELEMENTS MAX_BYTES``
    Writes records ``seq-000000``, ``seq-000001``, ... forever, each carrying an input of
    ELEMENTS float32 values equal to its sequence number. Prints ``S n`` after submitting n records
    and ``F n`` from the writer's ``on_flush`` once n records are durable, then waits for a line on
    stdin before letting the writer go on (so the parent knows exactly where the writer is). The
    producer stays at most one batch ahead of the durable records. The parent SIGKILLs it.

``python audit_writer_child.py fsize PATH``
    Writes five batches of four equal-length records; after the second, sets RLIMIT_FSIZE so that
    the third batch cannot be written whole (a real partial write, as on a full disk). Closes the
    log and prints its counters as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading

import numpy as np

from service.audit import AuditLog


def _report(lock: threading.Lock, line: str) -> None:
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run_until_killed(path: str, batch: int, elements: int, max_bytes: int) -> None:
    lock = threading.Lock()
    cond = threading.Condition()
    durable = [0]

    def on_flush(count: int) -> None:
        _report(lock, f"F {count}")
        if sys.stdin.readline() == "":  # the parent is gone
            os._exit(3)
        with cond:
            durable[0] = count
            cond.notify_all()

    log = AuditLog(
        path, max_bytes=max_bytes, backups=10, flush_batch_size=batch, flush_interval_s=60.0,
        include_inputs=True, on_flush=on_flush,
    ).start()
    seq = 0
    while True:
        with cond:
            while seq >= durable[0] + batch:
                cond.wait()
        log.log(
            request_id=f"seq-{seq:06d}", model="digits", predicted_class=seq % 10,
            flags={"adversarial": [f"record {seq}"]}, scores={"topology": float(seq)},
            input_array=np.full(elements, seq, dtype=np.float32),
        )
        seq += 1
        _report(lock, f"S {seq}")


def run_with_file_size_limit(path: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    log = AuditLog(path, max_bytes=2**30, flush_batch_size=4, flush_interval_s=60.0).start()
    for batch in range(5):
        if batch == 2:
            # Records all have the same length, so the file now holds 2 batches = 8 lines: allow
            # 10.5 lines, and the third batch's write stops halfway through its third line.
            size = os.path.getsize(path)
            limit = size + 2 * size // 8 + size // 16
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        for i in range(4):
            seq = 4 * batch + i
            log.log(request_id=f"seq-{seq:06d}", model="digits", predicted_class=seq % 10,
                    flags={"adversarial": ["x" * 900]})
        assert log.flush(timeout_s=30)
    log.close()
    print(json.dumps({"durable": log.durable_records, "failed": log.failed_records, "write_errors": log.write_errors}))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "kill":
        run_until_killed(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif mode == "fsize":
        run_with_file_size_limit(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
