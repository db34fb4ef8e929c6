"""docs/TASKS.md, executed: every code block in it runs, in order, as a reader would run it.

Blocks tagged ``file=PATH`` are written to that path in a fresh folder; ``sh`` blocks are run in one bash session
(so an ``export`` carries on), with ``cohort``, ``pip`` and ``python`` those of a throwaway virtual environment that
sees this checkout and its installed dependencies: ``pip install`` installs the example package there, not into the
project's environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml

from common import config as loader
from coordinator.config import CoordinatorConfig
from participant.config import ParticipantConfig

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "TASKS.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks() -> list[tuple[str, dict[str, str], str]]:
    out = []
    for lang, attrs, body in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        tags = dict(a.split("=", 1) for a in attrs.split() if "=" in a)
        out.append((lang, tags, body))
    return out


def test_every_block_is_executable_and_files_parse(tmp_path: Path) -> None:
    found = blocks()
    kinds = {(lang, "file" in tags) for lang, tags, _ in found}
    assert kinds <= {("python", True), ("toml", True), ("yaml", True), ("sh", False)}, kinds
    assert sum(1 for lang, _, _ in found if lang == "sh") >= 5
    for lang, tags, body in found:
        if lang == "python":
            compile(body, tags["file"], "exec")
        elif lang == "toml":
            tomllib.loads(body)
        elif lang == "yaml":
            path = tmp_path / tags["file"]
            path.write_text(body, encoding="utf-8")
            kind = CoordinatorConfig if "federation" in yaml.safe_load(body) else ParticipantConfig
            loader.load(kind, path)


def _sandbox(root: Path) -> dict[str, str]:
    """A venv whose python sees this checkout and the project's packages; ``cohort`` and ``pip`` run with it."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "cohort-checkout.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")
    for tool, module in (("cohort", "cohort_cli"), ("pip", "pip")):
        wrapper = venv / "bin" / tool
        wrapper.write_text(f'#!/bin/sh\nexec "{python}" -m {module} "$@"\n')
        wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORT_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tasks_md_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = ["set -euo pipefail"]
    for lang, tags, body in blocks():
        if "file" in tags:
            path = work / tags["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
        elif lang == "sh":
            script.append(body)
    env = _sandbox(tmp_path)
    # Its own process group: whatever the script leaves running (a daemon after a failure) is stopped here.
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1100)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(work.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}{logs}"
    out = result.stdout
    # The CSV was split over three sites, checked, packaged, installed and trained over mutual TLS.
    assert (work / "sites" / "site-c" / "manifest.json").is_file()
    assert out.count("digest a coordinator will expect: sha256:") == 2
    assert "installed: " in out
    assert "site-packages" in out
    assert "federated test:" in out
    assert re.search(r"job \S+ finished: completed 5 rounds", out)
    assert "noise multiplier" in out
    assert "epsilon" in out
    # The sites ran the installed package, as the coordinator did: every site joined (same digest).
    for site in ("site-a", "site-b", "site-c"):
        assert "joined federation 'signals'" in (work / f"{site}.log").read_text()
