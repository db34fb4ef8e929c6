"""The coordinator's read-only operations routes: ``/metrics``, ``/api/dashboard`` (JSON) and ``/dashboard`` (HTML).

They are served by the ops HTTP server (common/ops_http.py), in its threads. The JSON is built in the daemon's event
loop (the store's connection belongs to it): the HTTP thread hands the loop a coroutine and waits for it, bounded.
Its ``status`` member is exactly what ``cohort status --json`` prints (the same handler, the same conversion), so the
page and the command never disagree; ``ops`` adds what only this process knows (round phase times, connected
counts, ETA) and ``audit`` the latest audit events (read through a read-only connection of their own).

The page is one static HTML file with inline script and no build step: it fetches ``/api/dashboard`` every few
seconds and renders tables and inline SVG charts. It shows only what ``cohort status`` shows an admin, on a port
that should be bound to loopback or reached only by operators (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.job_text import strategy_line
from common.ops_http import OpsHttpServer, Response
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto_json import message_dict
from coordinator.federation import Federation
from coordinator.handlers import admin as admin_handlers
from coordinator.state.audit import read_events

SNAPSHOT_TIMEOUT_S = 5.0
RECENT_AUDIT = 20
_OUTCOMES = ("started", "completed", "failed")


def add_routes(server: OpsHttpServer, state: Federation, dashboard_on: bool = False) -> None:
    """Serve /metrics, and with ``dashboard_on`` (config ``http.dashboard``) /api/dashboard and /dashboard, from
    ``state`` (call from the daemon's event loop)."""
    loop = asyncio.get_running_loop()
    ops = state.ops
    assert ops is not None, "attach Observability first"
    page = resources.files("coordinator.observe").joinpath("dashboard.html").read_bytes()

    def metrics() -> Response:
        return Response(200, generate_latest(ops.metrics.registry), CONTENT_TYPE_LATEST)

    def api() -> Response:
        future = asyncio.run_coroutine_threadsafe(_in_loop(state), loop)
        snap = future.result(timeout=SNAPSHOT_TIMEOUT_S)
        snap["audit"] = _recent_audit(state)
        return Response.json(200, snap)

    def dashboard() -> Response:
        return Response(200, page, "text/html; charset=utf-8")

    server.add_route("/metrics", metrics)
    if dashboard_on:
        server.add_route("/api/dashboard", api)
        server.add_route("/dashboard", dashboard)


async def _in_loop(state: Federation) -> dict[str, Any]:
    return snapshot(state)


def snapshot(state: Federation) -> dict[str, Any]:
    """What the dashboard shows, as JSON (runs in the event loop)."""
    reply = admin_handlers.status("dashboard", pb.StatusRequest(), state)
    status = message_dict(reply)  # exactly what `cohort status --json` prints
    ops = state.ops
    assert ops is not None
    m = ops.metrics
    rounds = [
        {
            "round": c.number,
            "attempt": c.attempt,
            "outcome": c.outcome,
            "seconds": round(c.seconds, 3),
            "phases": {k: round(v, 3) for k, v in sorted(c.phases.items())},
        }
        for c in ops.rounds
    ]
    job: dict[str, Any] = {}
    runner = state.jobs.current
    if runner is not None:
        rows = [r for r in reply.jobs if r.job_id == runner.job_id]
        times = [r.seconds for r in (rows[0].rounds if rows else []) if r.state == "completed" and r.seconds > 0]
        left = max(0, runner.spec.rounds - runner.completed_rounds)
        running = runner.state.value == "running"
        job = {
            "job_id": runner.job_id,
            "state": runner.state.value,
            "phase": runner.machine.phase.value,
            "completed_rounds": runner.completed_rounds,
            "rounds": runner.spec.rounds,
            "eta_s": round(left * statistics.fmean(times), 1) if running and times else None,
            "epsilon_budget": runner.spec.privacy.target_epsilon if runner.spec.privacy.unit != "none" else None,
            "strategy": strategy_line(rows[0].spec) if rows else "",
        }
    return {
        "status": status,
        "job": job,
        "ops": {
            "sites_allowed": len(state.allowed),
            "sites_connected": len(state.registry.connected()),
            **{f"rounds_{k}": int(m.registry.get_sample_value(f"cohort_rounds_{k}_total") or 0) for k in _OUTCOMES},
            "round_times": rounds[-50:],
        },
    }


def _recent_audit(state: Federation) -> list[dict[str, Any]]:
    """The latest audit events (read-only connection, in the HTTP thread); their detail as compact JSON text."""
    events = read_events(state.config.state_dir / "coordinator.db", last=RECENT_AUDIT)
    return [
        {
            "seq": e["seq"],
            "ts": e["ts"],
            "kind": e["kind"],
            "actor": e["actor"],
            "detail": json.dumps(e["detail"], sort_keys=True)[:300],
        }
        for e in reversed(events)
    ]
