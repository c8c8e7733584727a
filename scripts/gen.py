"""Generate Python code for every .proto under proto/agentplane/ into gen/ (the one command behind
`make gen`).

`--check` generates into a temporary directory and fails when the committed gen/ differs.

Third-party protos vendored under proto/ for buf (google/api/field_behavior.proto, imported for
its field annotations) are not generated: their Python modules come from googleapis-common-protos
(a dependency), and a second copy in gen/ would register the same file twice. The vendored file
must stay a verbatim copy of the one that package ships, so both describe the same options; both
modes fail when it is not.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.api import field_behavior_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# Vendored proto -> the copy its Python package ships (what the generated code imports at run time).
VENDORED = {
    PROTO_DIR / "google" / "api" / "field_behavior.proto": Path(field_behavior_pb2.__file__).with_name(
        "field_behavior.proto"
    ),
}


def check_vendored() -> list[str]:
    """Problems with the vendored protos: each must equal the copy its Python package ships."""
    problems = []
    for vendored, shipped in VENDORED.items():
        if not shipped.is_file():
            problems.append(f"{shipped} is missing: is googleapis-common-protos installed?")
        elif vendored.read_bytes() != shipped.read_bytes():
            problems.append(f"{vendored.relative_to(ROOT)} differs from {shipped}: copy it again")
    return problems


def generate(out: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins over all protos."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "agentplane").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated directory a regular package so tools (setuptools, mypy) find it.
    for directory in [out / "agentplane", *(p for p in (out / "agentplane").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (out / "agentplane" / "py.typed").touch()


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    problems = [f"only in {cmp.left}: {n}" for n in cmp.left_only]
    problems += [f"only in {cmp.right}: {n}" for n in cmp.right_only]
    problems += [f"differs: {Path(cmp.left) / n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        problems += _diff(a / sub, b / sub)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "gen"))
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    args = parser.parse_args()
    vendored = check_vendored()
    if vendored:
        print("vendored protos are stale:\n  " + "\n  ".join(vendored), file=sys.stderr)
        return 1
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            problems = _diff(Path(tmp) / "agentplane", ROOT / "gen" / "agentplane")
        if problems:
            print("gen/ is stale; run `make gen`:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print("gen/ is up to date")
        return 0
    target = Path(args.out)
    shutil.rmtree(target / "agentplane", ignore_errors=True)
    generate(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
