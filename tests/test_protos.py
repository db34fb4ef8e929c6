"""The committed generated code matches protos/ (regenerated with the pinned grpcio-tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_has_not_drifted() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "protogen.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
