"""Regenerate (or check) the committed gRPC/protobuf code from ``protos/``.

``python tools/protogen.py`` writes ``common/proto/cohort/v1/cohort_pb2{,_grpc}.py{,i}``;
``--check`` generates into a temporary directory and exits non-zero when the committed files differ.
The proto root is mapped to the import path ``common/proto`` so generated imports read
``from common.proto.cohort.v1 import cohort_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_PACKAGE = "common/proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` and return the generated files relative to it."""
    from grpc_tools import protoc  # dev dependency; imported lazily so the runtime does not need it

    files = proto_files()
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{OUT_PACKAGE}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(f) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    generated = sorted(p.relative_to(out_root) for p in (out_root / OUT_PACKAGE).rglob("*") if p.is_file())
    # Package markers so mypy and setuptools see regular packages.
    for directory in {p.parent for p in generated}:
        marker = out_root / directory / "__init__.py"
        while marker.parent != out_root / "common":
            marker.touch()
            marker = marker.parent.parent / "__init__.py"
    return sorted(p.relative_to(out_root) for p in (out_root / OUT_PACKAGE).rglob("*") if p.is_file())


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(
            p.relative_to(ROOT) for p in (ROOT / OUT_PACKAGE).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
        drift = sorted(set(fresh) ^ set(committed))
        drift += [p for p in fresh if p in committed and not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)]
    if drift:
        print("generated protobuf code drifted from protos/; run `make proto`:", file=sys.stderr)
        for p in drift:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("generated protobuf code is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when committed code differs")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        shutil.rmtree(ROOT / OUT_PACKAGE, ignore_errors=True)
        for rel in fresh:
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
    print(f"generated {len(fresh)} files under {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
