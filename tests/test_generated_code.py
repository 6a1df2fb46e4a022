"""The committed generated code in client/headway/v1/ is exactly what protos/ gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "headway/v1/progress.proto"
COMMITTED = ROOT / "client" / "headway" / "v1"
EXPECTED = {"progress_pb2.py", "progress_pb2.pyi", "progress_pb2_grpc.py", "progress_pb2_grpc.pyi"}
HINT = "the generated code is out of date with protos/: run `make proto` and commit the result"


def _generate(out: Path) -> Path:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            f"protos/{PROTO}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"
    return out / "headway" / "v1"


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    generated_dir = _generate(tmp_path)
    generated = sorted(p.name for p in generated_dir.iterdir() if p.is_file())
    assert set(generated) >= EXPECTED, f"protoc did not produce the expected files: {generated}"

    missing = [name for name in generated if not (COMMITTED / name).is_file()]
    assert not missing, f"{missing} missing from client/headway/v1/: {HINT}"

    differing = [
        name
        for name in generated
        if (generated_dir / name).read_bytes() != (COMMITTED / name).read_bytes()
    ]
    assert not differing, f"{differing} differ from protos/: {HINT}"


def test_no_stale_generated_files() -> None:
    """A renamed or removed proto must not leave old generated modules behind."""
    stale = [
        p.name
        for p in COMMITTED.iterdir()
        if p.is_file() and "_pb2" in p.name and p.name not in EXPECTED
    ]
    assert not stale, f"stale generated files in client/headway/v1/: {stale}: {HINT}"
