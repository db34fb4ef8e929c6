"""The ``cohort:local`` image for the compose simulation and its test (deploy/Dockerfile).

:func:`ensure_image` builds ``cohort:local`` from deploy/Dockerfile. The base: ``$COHORT_PYTHON_IMAGE``, else the
official ``python:3.11-slim`` when present or pullable, else ``cohort-base:bookworm``, built here from Debian
packages (``debootstrap --variant=minbase`` + ``docker import``) for hosts without an image registry. When pip on
this host finds torch's CPU wheel locally (``$COHORT_WHEEL_DIR``, ``$PIP_FIND_LINKS``, /opt/wheels) it goes into
deploy/local/ and the build skips PyTorch's index; the host's CA bundle goes there too (a TLS-intercepting proxy).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from dockerlab import ROOT, Docker, DockerError, apt_install, tail

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCAL_INPUTS = ROOT / "deploy" / "local"
IMAGE = "cohort:local"
OFFICIAL_BASE = "python:3.11-slim"
LOCAL_BASE = "cohort-base:bookworm"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as the project needs
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_WHEEL_DIRS = ("/opt/wheels",)


def _pinned_torch() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"torch==([\w.]+)", line.strip())
        if match:
            return match.group(1)
    raise DockerError("constraints.txt pins no torch version")


def _wheel_dirs() -> list[Path]:
    dirs = [*os.environ.get("COHORT_WHEEL_DIR", "").split(os.pathsep), *os.environ.get("PIP_FIND_LINKS", "").split()]
    return [Path(d) for d in (*dirs, *DEFAULT_WHEEL_DIRS) if d and Path(d).is_dir()]


def stage_local_inputs(log: IO[str]) -> Path | None:
    """Fill deploy/local/ from this host: torch's pinned CPU wheel when pip here finds it locally (returned), and
    the host's CA bundle for pip in the build."""
    version = _pinned_torch()
    for stale in LOCAL_INPUTS.glob("torch-*.whl"):
        stale.unlink()
    bundle = Path(os.environ.get("PIP_CERT") or HOST_CA_BUNDLE)
    if bundle.is_file():
        shutil.copyfile(bundle, LOCAL_INPUTS / "ca-bundle.crt")
        print(f"deploy/local/ca-bundle.crt <- {bundle}", file=log, flush=True)
    for directory in _wheel_dirs():
        wheels = sorted(directory.glob(f"torch-{version}+cpu-cp311-cp311-*.whl"))
        if wheels:
            target = LOCAL_INPUTS / wheels[0].name
            try:
                os.link(wheels[0], target)  # no copy of ~200 MB where the file system allows
            except OSError:
                shutil.copyfile(wheels[0], target)
            print(f"deploy/local/{target.name} <- {wheels[0]}", file=log, flush=True)
            return target
    return None


def build_local_base(docker: Docker, log: IO[str]) -> None:
    """``cohort-base:bookworm``: Debian minbase with python3 (3.11) and venv, imported into the engine."""
    debootstrap = shutil.which("debootstrap") or (apt_install("debootstrap") and shutil.which("debootstrap"))
    if not debootstrap or os.geteuid() != 0:
        raise DockerError(
            f"cannot get {OFFICIAL_BASE} (no image registry reachable) and cannot build a local base: that needs "
            "root and debootstrap (apt-get install debootstrap); or set COHORT_PYTHON_IMAGE to a Python 3.11 image"
        )
    mirror = os.environ.get("COHORT_DEBIAN_MIRROR", DEFAULT_MIRROR)
    with tempfile.TemporaryDirectory(prefix="cohort-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            [
                "nice",
                "-n",
                "10",
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0:
            raise DockerError(f"debootstrap failed ({proc.returncode}); see the build log")
        # What an image does not need: package caches and lists, documentation.
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc/*", "usr/share/man/*"):
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.name != "lock":
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            docker.run(
                "import",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "-",
                LOCAL_BASE,
                stdin=tar.stdout,
                timeout=900,
            )
        finally:
            tar.stdout.close()
            tar.wait()


def base_image(docker: Docker, log: IO[str]) -> str:
    """The image both Dockerfile stages start from (see the module docstring for the order)."""
    override = os.environ.get("COHORT_PYTHON_IMAGE")
    if override:
        return override
    if docker.ok("image", "inspect", OFFICIAL_BASE) or docker.ok("pull", OFFICIAL_BASE, timeout=600):
        return OFFICIAL_BASE
    if not docker.ok("image", "inspect", LOCAL_BASE):
        print(f"  no image registry answers; building {LOCAL_BASE} from Debian packages (debootstrap)", flush=True)
        build_local_base(docker, log)
    return LOCAL_BASE


def ensure_image(docker: Docker, log_path: Path, *, rebuild: bool = True, tag: str = IMAGE) -> str:
    """Build ``tag`` from deploy/Dockerfile (``rebuild`` False: only when it does not exist yet). Returns the
    base image used ("" when the image was already there)."""
    if not rebuild and docker.ok("image", "inspect", tag):
        return ""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        base = base_image(docker, log)
        wheel = stage_local_inputs(log)
        args = ["build", "-f", str(DOCKERFILE), "-t", tag, "--build-arg", f"PYTHON_IMAGE={base}"]
        if wheel is not None:
            args += ["--build-arg", "TORCH_INDEX_URL="]
        if not docker.ok("network", "inspect", "bridge"):
            args += ["--network", "host"]  # an engine without the default bridge (as the private one here)
        print(
            f"  building {tag} on {base}"
            + (f" with {wheel.name} from this host" if wheel else " (torch from PyTorch's CPU index)")
            + f"; log {log_path}",
            flush=True,
        )
        log.flush()
        proc = docker.run(*args, str(ROOT), check=False, timeout=3600, log=log)
    if proc.returncode != 0:
        raise DockerError(f"docker build failed ({proc.returncode}):\n{tail(log_path.read_text())}")
    return base


def image_size_mb(docker: Docker, tag: str = IMAGE) -> float:
    return int(docker.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6
