"""Peak RSS at each step of one calibration: where calibration memory goes, and which step grows with the data.

    .venv/bin/python bench/calibration_memory.py resnet50 1000
    .venv/bin/python bench/calibration_memory.py resnet50 5000
    .venv/bin/python bench/calibration_memory.py resnet50 5000 --max-fit-per-class 100

The model and data are `bench/scale.py`'s (the same seeded random architecture and uint8 MNIST inputs, read
batch by batch from an uncompressed .npz); they are made in a child process, whose memory does not count, and
kept in ``--work`` (default ``build/bench/memory``) so that runs of several sizes share them. One line per
progress step of ``calibrate``: seconds since the start, the resident set and the process's peak RSS so far
(``ru_maxrss``), in GiB as in ``bench/scale.py``, printed as the step begins, so the growth of a step shows on
the next line. Run one size per process: the peak is the process's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import detector.calibration  # noqa: E402
from detector.calibration import CalibrationConfig  # noqa: E402
from bench.scale import ARCHS, _export, _lazy, _write_data  # noqa: E402


class _StepMemory:
    """Stands in for calibrate's progress bar: prints the memory at each step instead of drawing a bar."""

    def __init__(self, *args: object, **kwargs: object):
        self.start = time.perf_counter()

    def set_postfix_str(self, step: str) -> None:
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
        print(f"{time.perf_counter() - self.start:8.1f} s  RSS {resident:.3f} GiB  peak {peak:.3f} GiB  {step}", flush=True)

    def update(self) -> None:
        pass

    def close(self) -> None:
        self.set_postfix_str("done")


def _prepare(arch: str, size: int, model: Path, data: Path) -> None:
    """Export the model and write its 5,000 inputs (what the runs of every size share)."""
    if not model.exists():
        _export(arch, size, model)
    if not data.exists():
        _write_data(data, model, size, 5_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=list(ARCHS))
    parser.add_argument("inputs", type=int, help="clean inputs to calibrate on (at most 5,000)")
    parser.add_argument("--work", type=Path, default=Path("build/bench/memory"))
    parser.add_argument("--max-fit-per-class", type=int, default=CalibrationConfig().max_fit_per_class,
                        help="CalibrationConfig.max_fit_per_class (default: its default)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    size = ARCHS[args.arch]
    model, data = args.work / f"{args.arch}.onnx", args.work / f"{args.arch}-data.npz"
    if not (model.exists() and data.exists()):  # in a child process, so that its memory is not this one's peak
        child = multiprocessing.get_context("spawn").Process(target=_prepare, args=(args.arch, size, model, data))
        child.start()
        child.join()
        if child.exitcode != 0:
            sys.exit(f"preparing {model} and {data} failed (exit code {child.exitcode})")
    detector.calibration.tqdm = _StepMemory  # calibrate reports its steps through its progress bar
    config = CalibrationConfig(max_fit_per_class=args.max_fit_per_class, progress=True)
    suffix = "" if config.max_fit_per_class == CalibrationConfig().max_fit_per_class else f"-fit{config.max_fit_per_class}"
    detector.calibration.calibrate(model, _lazy(data, args.inputs), args.work / f"{args.arch}-{args.inputs}{suffix}", config)


if __name__ == "__main__":
    main()
