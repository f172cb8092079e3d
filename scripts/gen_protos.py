"""Generate the Python stubs of protos/ into libs/ (or another directory).

Stubs are committed; tests/protos/test_stub_drift.py regenerates them into a
temporary directory and fails when anything differs, so run `make proto` after
editing a .proto file. The generated modules import each other by proto package
(`from trellis.common.v1 import common_pb2`), which is why they live inside the
`trellis` package in libs/.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every .proto file; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for proto in files:
        package_dir = out_dir / Path(proto).parent
        # Regular packages (not namespace packages) so tools and setuptools find them.
        for directory in [package_dir, *package_dir.relative_to(out_dir).parents][:-1]:
            init = out_dir / directory / "__init__.py"
            if not init.exists():
                init.write_text("")
        written.extend(sorted(package_dir.glob("*_pb2*.py*")))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "libs")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
