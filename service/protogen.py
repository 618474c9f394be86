"""Generate the Python gRPC stubs of ``protos/`` into ``service/_generated/`` (``make protos``).

The stubs are checked in, so serving needs protobuf and grpcio but not grpcio-tools; a test
regenerates them into a temporary folder and compares bytes, which fails when a ``.proto`` file
changed without ``make protos`` or when the installed grpcio-tools differs from the pinned one.

Two edits are made to protoc's output, both checked to apply exactly once:

* imports between generated modules become absolute (``from service._generated.advdetect.v1
  import detector_pb2``), so the stubs live inside the ``service`` package;
* descriptors are registered in a private ``DescriptorPool`` (``service._generated.POOL``) rather
  than protobuf's default pool. ``tritonclient`` registers its own ``inference.*`` messages in the
  default pool, and a second file defining the same names there fails with "duplicate symbol";
  with a private pool the server and a Triton client can share one process (as the tests do).

Run ``python -m service.protogen`` to regenerate, ``python -m service.protogen --check`` to only
compare.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_ROOT", "GENERATED_DIR", "PROTO_FILES", "generate", "stale_files", "main"]

REPO = Path(__file__).resolve().parents[1]
#: Folder holding the ``.proto`` sources, laid out by proto package.
PROTO_ROOT = REPO / "protos"
#: Where the checked-in stubs live.
GENERATED_DIR = Path(__file__).resolve().parent / "_generated"
#: The sources compiled, relative to :data:`PROTO_ROOT`.
PROTO_FILES = ("advdetect/v1/detector.proto", "inference/grpc_service.proto")
#: Python package the generated tree is importable as.
PACKAGE = "service._generated"

_ROOT_INIT = '''"""Generated gRPC stubs (``make protos``, see ``service/protogen.py``). Do not edit.

Every message here is registered in :data:`POOL`, a descriptor pool of its own, not in protobuf's
default pool: ``tritonclient`` defines the same ``inference.*`` names in the default pool.
"""

from google.protobuf import descriptor_pool as _descriptor_pool

#: The descriptor pool holding ``advdetect/v1/detector.proto`` and ``inference/grpc_service.proto``.
POOL = _descriptor_pool.DescriptorPool()
'''
_PACKAGE_INIT = '"""Generated package (``make protos``). Do not edit."""\n'

_DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_CALL = "_POOL.AddSerializedFile("
_POOL_IMPORT_ANCHOR = "# @@protoc_insertion_point(imports)\n"


def _top_packages() -> list[str]:
    return sorted({name.split("/", 1)[0] for name in PROTO_FILES})


def _fix_pb2(text: str, name: str) -> str:
    if text.count(_DEFAULT_POOL_CALL) != 1 or text.count(_POOL_IMPORT_ANCHOR) != 1:
        raise RuntimeError(f"{name}: protoc output has an unexpected layout; update service/protogen.py")
    text = text.replace(_DEFAULT_POOL_CALL, _PRIVATE_POOL_CALL)
    return text.replace(
        _POOL_IMPORT_ANCHOR, f"from {PACKAGE} import POOL as _POOL\n{_POOL_IMPORT_ANCHOR}"
    )


def _fix_imports(text: str) -> str:
    packages = "|".join(re.escape(p) for p in _top_packages())
    pattern = re.compile(rf"^(from|import) ({packages})(\.|\s)", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)} {PACKAGE}.{m.group(2)}{m.group(3)}", text)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile :data:`PROTO_FILES` with grpcio-tools into ``out_dir`` (created or refreshed).

    Parameters
    ----------
    out_dir : Path
        Destination; files under it that the generator does not produce are left alone, files it
        produces are overwritten.
    proto_root : Path, default PROTO_ROOT
        Include root of the ``.proto`` sources.

    Returns
    -------
    list of Path
        The files written, relative to ``out_dir``, sorted.
    """
    try:
        import grpc_tools
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("generating stubs needs grpcio-tools (the project's test extra)") from exc
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="advdetect-protoc-") as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{proto_root}", f"-I{include}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        done = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}):\n{done.stderr.strip()}")
        produced: dict[Path, str] = {Path("__init__.py"): _ROOT_INIT}
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(tmp)
            text = path.read_text(encoding="utf-8")
            if rel.name.endswith("_pb2.py"):
                text = _fix_pb2(text, str(rel))
            produced[rel] = _fix_imports(text)
            for parent in rel.parents:
                if parent != Path("."):
                    produced.setdefault(parent / "__init__.py", _PACKAGE_INIT)
    for rel, text in produced.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text.encode("utf-8"))
    return sorted(produced)


def stale_files(checked_in: Path = GENERATED_DIR) -> list[str]:
    """Regenerate into a temporary folder and list what differs from ``checked_in``.

    Returns
    -------
    list of str
        Relative paths that are missing, extra (generated-looking files not produced any more) or
        different; empty when the checked-in stubs are current.
    """
    with tempfile.TemporaryDirectory(prefix="advdetect-stubs-") as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for rel in fresh:
            mine = checked_in / rel
            if not mine.is_file():
                problems.append(f"{rel} (missing)")
            elif not filecmp.cmp(mine, Path(tmp) / rel, shallow=False):
                problems.append(f"{rel} (differs)")
        fresh_set = {str(p) for p in fresh}
        for path in sorted(checked_in.rglob("*")):
            rel = path.relative_to(checked_in)
            if path.is_file() and path.suffix in {".py", ".pyi"} and str(rel) not in fresh_set:
                problems.append(f"{rel} (not generated any more)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the stubs, or with ``--check`` only report stale ones."""
    parser = argparse.ArgumentParser(prog="python -m service.protogen", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files(args.out)
        for problem in problems:
            print(f"stale: {problem}", file=sys.stderr)
        if problems:
            print("run `make protos` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    if args.out.resolve() == GENERATED_DIR and args.out.exists():
        # Start clean so that stubs of a removed .proto do not linger (only in our own folder).
        shutil.rmtree(args.out)
    for rel in generate(args.out):
        print(args.out / rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
