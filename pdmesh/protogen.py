"""Generate the Python code of the wire contract: protos/pdmesh/v1/*.proto -> pdmesh/v1/.

`python -m pdmesh.protogen` (what `make protos` runs) writes `<name>_pb2.py`, `<name>_pb2.pyi`
and `<name>_pb2_grpc.py` for every proto file. The protos import each other as
"pdmesh/v1/<name>.proto" and are compiled with protos/ as the include root, so protoc itself
writes the imports as `from pdmesh.v1 import common_pb2`; no import rewriting is needed.

One post-processing step: grpcio-tools stamps each *_pb2_grpc.py with its own version and the
module refuses to import under an older grpcio (`GRPC_GENERATED_VERSION`). The code it writes
needs nothing newer than grpcio 1.66 (registered-method handlers came in 1.63), and the GPU
machine runs grpcio 1.84 while this one generates with 1.85, so the stamp is lowered to
GRPC_FLOOR, the grpcio floor in pyproject.toml.

The output is deterministic for a given grpcio-tools version; the version used is recorded in
pdmesh/v1/__init__.py and tests/services/test_protos.py checks that regenerating changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("pdmesh") / "v1"
GRPC_FLOOR = "1.66.0"

_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.MULTILINE)


def generator_version() -> str:
    """The grpcio-tools version that generates the code (output differs between versions)."""
    return importlib.metadata.version("grpcio-tools")


def init_text(version: str) -> str:
    return (
        '"""Generated code of the pdmesh.v1 wire contract (protos/pdmesh/v1). Do not edit: run\n'
        '`make protos`."""\n\n'
        f'GENERATED_WITH = "grpcio-tools {version}"\n'
    )


def generate(out_root: Path) -> list[Path]:
    """Write the generated package under out_root / pdmesh/v1; return the files written, sorted."""
    from grpc_tools import protoc  # dev-only dependency: imported where it is needed

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*_pb2*.py*"):
        stale.unlink()
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (its message is above)")
    for grpc_file in out_dir.glob("*_pb2_grpc.py"):
        text = grpc_file.read_text()
        grpc_file.write_text(_STAMP.sub(f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text, count=1))
    (out_dir / "__init__.py").write_text(init_text(generator_version()))
    return sorted(out_dir.glob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdmesh.protogen", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT, help="root to write pdmesh/v1 under (default: repo)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
