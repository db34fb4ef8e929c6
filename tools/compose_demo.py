"""``make compose-demo``: the five-hospital federation of ``make demo`` as containers, start to finish.

Builds ``cohort:local`` (tools/dockerlab.py: a local Debian base when no image registry answers), brings up
deploy/docker-compose.yml (init job, coordinator, five hospitals), follows the job with ``cohort job watch``
through the admin service (the same round lines and summary as ``make demo``: accuracy, epsilon per hospital,
secure aggregation), runs ``cohort status`` the same way, and tears everything down with ``down -v`` even when a
step fails. It uses the Docker engine that answers, or starts a private ``dockerd`` for the run and stops it.

Environment: COHORT_DOCKER_DATA_ROOT (keep a private engine's images between runs), COHORT_PYTHON_IMAGE (base
image), COHORT_WHEEL_DIR (where torch's CPU wheel is), COHORT_DEBIAN_MIRROR (for the local base).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: dockerlab lies beside it

from docker_image import ensure_image, image_size_mb
from dockerlab import ROOT, Compose, DockerError, Engine

PROJECT = "cohort-demo"  # the compose file's own name, so `docker compose -f deploy/docker-compose.yml ...` sees it
RUN_DIR = ROOT / "runs" / "compose-demo"
JOB_TIMEOUT_S = 900


def _seconds(start: float) -> str:
    return f"{time.monotonic() - start:.0f}s"


def main() -> int:
    started = time.monotonic()
    print("Cohort compose demo: coordinator + 5 hospital containers (deploy/docker-compose.yml)", flush=True)
    ok = False
    left: dict[str, list[str]] = {}
    try:
        with Engine(RUN_DIR) as docker:
            step = time.monotonic()
            ensure_image(docker, RUN_DIR / "build.log")
            print(f"  image cohort:local ready ({image_size_mb(docker):.0f} MB) in {_seconds(step)}", flush=True)
            compose = Compose(docker, PROJECT)
            compose("down", "-v", "--remove-orphans", check=False)  # what a killed earlier run left
            try:
                step = time.monotonic()
                compose("up", "-d", "--no-build")
                print(f"  federation up (init done, coordinator ready, 5 hospitals) in {_seconds(step)}; training:")
                compose.admin("job", "watch", "--timeout", str(JOB_TIMEOUT_S), stream=True, timeout=JOB_TIMEOUT_S + 120)
                print("\n$ cohort status   (through the admin service)", flush=True)
                compose.admin("status", stream=True)
                jobs = compose.status().get("jobs") or [{}]
                ok = jobs[-1].get("state") == "finished"
            finally:
                if not ok:
                    _dump_logs(compose)
                compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False, timeout=300)
                left = compose.leftovers()
                gone = "nothing left behind" if not any(left.values()) else f"LEFT BEHIND: {left}"
                print(f"  torn down (down -v): {gone}", flush=True)
    except DockerError as exc:
        print(f"compose-demo: {exc}", file=sys.stderr)
        return 2
    print(f"compose-demo {'done' if ok else 'FAILED'} in {_seconds(started)}", flush=True)
    return 0 if ok and not any(left.values()) else 1


def _dump_logs(compose: Compose) -> None:
    logs = compose("logs", "--no-color", "--tail", "40", check=False)
    print(logs.stdout[-8000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
