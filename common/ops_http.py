"""The operations HTTP endpoint beside a daemon's gRPC traffic: liveness and readiness for orchestrators.

The gRPC port accepts only mutual-TLS clients with a federation certificate, so Docker, the kubelet and load
balancers cannot probe it. This small plain-HTTP server answers them on a separate port (``http.listen`` in both
daemons' configs; off when empty). It carries no federation data, only whether the process is alive and ready:

- ``GET /healthz``: 200 while the process answers at all (liveness; a restart fixes nothing else).
- ``GET /readyz``: 200 when the daemon's readiness check finds nothing missing, else 503 with what is missing
  (coordinator: state store open, gRPC listening, not draining; participant: started and joined).

More routes (Prometheus ``/metrics``, a dashboard) plug in with :meth:`OpsHttpServer.add_route`. The server is the
standard library's WSGI server, one thread per request (short socket timeout), in a daemon thread: readiness
checks run in that thread, so they read plain attributes of the daemon and never touch its event loop or store.

``python -m common.ops_http probe [URL]`` is the container health check: exit 0 when URL (default
``$COHORT_HEALTH_URL``, else ``http://127.0.0.1:9100/readyz``) answers 200, else 1. It imports only the standard
library, so it costs a few milliseconds every interval.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger("cohort.ops_http")

DEFAULT_PROBE_URL = "http://127.0.0.1:9100/readyz"
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        return cls(status, (json.dumps(payload, sort_keys=True) + "\n").encode(), "application/json")


Route = Callable[[], Response]
# Returns what keeps the daemon from being ready (human-readable); empty when it is ready.
ReadinessCheck = Callable[[], Sequence[str]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Unavailable"}


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a client that opens a connection and sends nothing does not hold a thread

    def log_message(self, format: str, *args: Any) -> None:  # the base class writes every request to stderr
        log.debug("%s " + format, self.address_string(), *args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class OpsHttpServer:
    """``start()`` binds ``listen`` (``host:port``; port 0 picks a free one) and returns the bound ``host:port``;
    ``close()`` stops serving. Routes are exact paths answered to GET and HEAD."""

    def __init__(self, listen: str, readiness: ReadinessCheck) -> None:
        self.listen = listen
        self.address = ""
        self._readiness = readiness
        self._routes: dict[str, Route] = {"/healthz": self._healthz, "/readyz": self._readyz}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add_route(self, path: str, route: Route) -> None:
        """Serve ``route()`` at ``path`` (exact match); replaces an existing route of that path."""
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        self._routes[path] = route

    @property
    def routes(self) -> tuple[str, ...]:
        return tuple(sorted(self._routes))

    def start(self) -> str:
        if self._server is not None:
            return self.address
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        server = make_server(host, int(port), self._app, server_class=server_class, handler_class=_Handler)
        bound_port = server.server_address[1]
        self.address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ops-http", daemon=True)
        self._thread.start()
        log.info("operations HTTP listening on http://%s (%s)", self.address, ", ".join(self.routes))
        return self.address

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S)

    # -- routes -------------------------------------------------------------------------------------------------
    def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    def _readyz(self) -> Response:
        missing = list(self._readiness())
        if missing:
            return Response.json(503, {"ready": False, "waiting_for": missing})
        return Response.json(200, {"ready": True})

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        route = self._routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            response = Response(404, b"not found\n")
        elif method not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n")
        else:
            try:
                response = route()
            except Exception:
                log.exception("operations HTTP route %s failed", environ.get("PATH_INFO"))
                response = Response(500, b"internal error\n")
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
        if response.status == 405:
            headers.append(("Allow", "GET, HEAD"))
        headers.append(("Cache-Control", "no-store"))
        start_response(f"{response.status} {_REASONS.get(response.status, 'Status')}", headers)
        return [b""] if method == "HEAD" else [response.body]


def probe(url: str, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
    """GET ``url``: (HTTP status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (an operator-given http URL)
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "probe" or len(argv) > 2:
        print("usage: python -m common.ops_http probe [URL]", file=sys.stderr)
        return 2
    url = argv[1] if len(argv) == 2 else os.environ.get("COHORT_HEALTH_URL", DEFAULT_PROBE_URL)
    status, body = probe(url)
    if status != 200:
        print(f"{url}: {status or 'no answer'} {body.strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
