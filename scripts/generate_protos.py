#!/usr/bin/env python3
"""Regenerate the committed Python code for every .proto file under protos/.

    python scripts/generate_protos.py           # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python scripts/generate_protos.py --check   # CI: exit 1 and list files that are stale

The generated files live next to their .proto files (protos/fedpatchcore/v1/...), are committed,
and are NEVER edited by hand: change the .proto and rerun this script. They are produced by the
protoc bundled with grpcio-tools (``grpc_tools.protoc``) with ``-I protos``, so a file
``protos/fedpatchcore/v1/x.proto`` becomes the module ``fedpatchcore.v1.x_pb2`` and imports
between protos resolve as package imports (federation.proto imports features.proto this way, and
google/protobuf/timestamp.proto from the well-known types grpc_tools ships). Every .proto under
protos/ is covered, services included (``*_pb2_grpc.py`` holds their stubs). Output depends on
the grpcio-tools version (pinned via pyproject.toml); tests/test_protos.py fails when the
committed code drifts from what this script generates now.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtocError(RuntimeError):
    """protoc reported an error (its message is on stderr)."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto file under ``proto_root``, sorted, as absolute paths."""
    return sorted(path.resolve() for path in proto_root.rglob("*.proto"))


def generated_names(proto: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Paths, relative to the output root, of the files generated for ``proto``."""
    relative = proto.resolve().relative_to(proto_root.resolve())
    stem = relative.with_suffix("")
    return [stem.parent / f"{stem.name}{suffix}" for suffix in GENERATED_SUFFIXES]


def committed_generated_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generated-looking files under ``proto_root``, relative to it (stale ones included)."""
    found = {
        path.relative_to(proto_root)
        for suffix in GENERATED_SUFFIXES
        for path in proto_root.rglob(f"*{suffix}")
    }
    return sorted(found)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every .proto under ``proto_root``; write the code under ``out_dir``.

    Returns the generated files (absolute paths under ``out_dir``), sorted. Raises ProtocError if
    protoc fails or does not produce an expected file, FileNotFoundError if there is no .proto.
    """
    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto); protoc does not find them
    # on its own when run as a Python module.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",  # argv[0], ignored by protoc
        f"--proto_path={proto_root.resolve()}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(proto) for proto in protos),
    ]
    logger.info("running protoc on %s file(s) into %s", len(protos), out_dir)
    status = protoc.main(args)
    if status != 0:
        raise ProtocError(f"protoc exited with status {status} for {[p.name for p in protos]}")
    generated = [out_dir / name for proto in protos for name in generated_names(proto, proto_root)]
    missing = [str(path) for path in generated if not path.is_file()]
    if missing:
        raise ProtocError(f"protoc did not produce {missing}")
    return sorted(generated)


def stale_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files under ``proto_root`` that differ from a fresh generation, with the reason.

    Reports files that differ, are missing, or are left over from a .proto that no longer exists.
    Returns an empty list when the committed code is up to date.
    """
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-protos-") as tmp:
        fresh_root = Path(tmp)
        fresh = {path.relative_to(fresh_root) for path in generate(fresh_root, proto_root)}
        problems = []
        for relative in sorted(fresh):
            committed = proto_root / relative
            if not committed.is_file():
                problems.append(f"{committed}: missing")
            elif not filecmp.cmp(committed, fresh_root / relative, shallow=False):
                problems.append(f"{committed}: differs from the generated code")
        for relative in committed_generated_files(proto_root):
            if relative not in fresh:
                problems.append(f"{proto_root / relative}: no .proto generates it any more")
    return problems


def write(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Regenerate the committed code in place and return the files written.

    Generates into a temporary directory first, so a protoc error leaves the tree untouched;
    generated files left over from a deleted .proto are removed.
    """
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-protos-") as tmp:
        fresh_root = Path(tmp)
        fresh = [path.relative_to(fresh_root) for path in generate(fresh_root, proto_root)]
        for relative in committed_generated_files(proto_root):
            if relative not in fresh:
                logger.info("removing %s: no .proto generates it any more", relative)
                (proto_root / relative).unlink()
        written = []
        for relative in fresh:
            target = proto_root / relative
            shutil.copyfile(fresh_root / relative, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py from protos/**/*.proto.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and exit 1, listing the files that differ from "
        "the committed ones (for CI); writes nothing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        problems = stale_files()
        if problems:
            print("Generated protobuf code is stale; run scripts/generate_protos.py:")
            for problem in problems:
                print(f"  {problem}")
            return 1
        print("Generated protobuf code is up to date.")
        return 0
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
