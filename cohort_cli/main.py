"""The ``cohort`` command: coordinator, participant, certs, data, demo, status, job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from common import config as config_loader
from common.errors import CohortError
from common.version import VERSION

log = logging.getLogger("cohort")


def _setup_logging(level: str, fmt: str = "text") -> None:
    from common import logs

    logs.setup(level, fmt)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one configuration value (repeatable); wins over the file and environment",
    )


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator import config as cc
    from coordinator.daemon import run

    cfg = config_loader.load(
        cc.CoordinatorConfig, args.config, env=os.environ, env_prefix=cc.ENV_PREFIX, overrides=args.overrides
    )
    return asyncio.run(run(cfg, ready_file=args.ready_file, exit_when_done=args.exit_when_done))


def _cmd_participant(args: argparse.Namespace) -> int:
    from participant import config as pc
    from participant.daemon import run

    overrides = [*args.overrides, *(["exit_after_job=true"] if args.exit_after_job else [])]
    cfg = config_loader.load(
        pc.ParticipantConfig, args.config, env=os.environ, env_prefix=pc.ENV_PREFIX, overrides=overrides
    )
    rc = asyncio.run(run(cfg))
    # The daemon has closed (its ledger and state are on disk). Exit now: the interpreter's own finalization can hang
    # in gRPC's garbage collection after a busy session, past an orchestrator's stop timeout (then SIGKILL).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _endpoint(args: argparse.Namespace) -> object:
    from cohort_cli.admin_client import AdminEndpoint

    return AdminEndpoint.from_dir(args.coordinator, args.tls_dir, args.server_name)


def _add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        default=os.environ.get("COHORT_ADMIN_COORDINATOR", "127.0.0.1:50051"),
        help="coordinator host:port (env COHORT_ADMIN_COORDINATOR)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(os.environ.get("COHORT_ADMIN_TLS_DIR", "certs/admins/admin")),
        help="directory with the admin's ca.crt, tls.crt, tls.key (env COHORT_ADMIN_TLS_DIR)",
    )
    p.add_argument("--server-name", default="", help="name on the coordinator's certificate, if not the host")
    p.add_argument("--json", action="store_true", help="print JSON")


def _cmd_status(args: argparse.Namespace) -> int:
    from cohort_cli.admin_client import AdminEndpoint, format_status, get_status, keep_last_rounds, to_json

    ep = _endpoint(args)
    assert isinstance(ep, AdminEndpoint)
    reply = asyncio.run(get_status(ep))
    print(to_json(keep_last_rounds(reply, args.last)) if args.json else format_status(reply, args.last))
    return 0


def _cmd_job_start(args: argparse.Namespace) -> int:
    from cohort_cli.admin_client import AdminEndpoint, start_job, to_json
    from coordinator.config import JobConfig
    from coordinator.jobspec import to_proto as job_spec_to_proto

    spec = config_loader.load(JobConfig, args.job, overrides=args.overrides)
    ep = _endpoint(args)
    assert isinstance(ep, AdminEndpoint)
    reply = asyncio.run(start_job(ep, job_spec_to_proto(spec)))
    verb = "queued" if reply.state == "queued" else "started"
    text = f"{verb} job {reply.job_id} ({reply.spec.task}, {reply.spec.rounds} rounds)"
    print(to_json(reply) if args.json else text + (f"; {reply.waiting}" if reply.waiting else ""))
    return 0


def _cmd_job_stop(args: argparse.Namespace) -> int:
    from cohort_cli.admin_client import AdminEndpoint, stop_job, to_json

    ep = _endpoint(args)
    assert isinstance(ep, AdminEndpoint)
    reply = asyncio.run(stop_job(ep, args.job_id, args.reason))
    still = " (stop requested: the round being aggregated commits first)" if reply.state == "running" else ""
    print(to_json(reply) if args.json else f"job {reply.job_id}: {reply.state}{still}")
    return 0


def _cmd_job_watch(args: argparse.Namespace) -> int:
    import time

    from cohort_cli.admin_client import AdminEndpoint
    from cohort_cli.job_report import follow, summary_lines

    ep = _endpoint(args)
    assert isinstance(ep, AdminEndpoint)
    started = time.monotonic()
    job = asyncio.run(follow(ep, args.timeout, job_id=args.job_id))
    for line in summary_lines(job, time.monotonic() - started):
        print(line)
    return 0 if job.state == "finished" else 1


def _cmd_job_clear_site(args: argparse.Namespace) -> int:
    from cohort_cli.admin_client import AdminEndpoint, clear_suspension, to_json

    ep = _endpoint(args)
    assert isinstance(ep, AdminEndpoint)
    reply = asyncio.run(clear_suspension(ep, args.job_id, args.site))
    print(to_json(reply) if args.json else f"job {reply.job_id}: site {args.site} may take part again")
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from coordinator.state.audit import verify_database

    report = verify_database(args.state_dir / "coordinator.db", args.head)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    status = "intact" if report.ok else "TAMPERED"
    print(f"audit log {status}: {report.count} events, head {report.head}")
    return 0 if report.ok else 1


def _cmd_audit_list(args: argparse.Namespace) -> int:
    import json

    from coordinator.state.audit import format_event, read_events

    events = read_events(args.state_dir / "coordinator.db", args.kind, args.last)
    if args.json:
        print(json.dumps(events, indent=1))
    else:
        for event in events:
            print(format_event(event))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from cohort_cli.demo import HOSPITALS, run_demo
    from cohort_cli.fraud_demo import FRAUD

    case = FRAUD if args.use_case == "fraud" else HOSPITALS
    run_dir = args.run_dir or Path("runs/fraud" if args.use_case == "fraud" else "runs/demo")
    return run_demo(run_dir, rounds=args.rounds, deploy_dir=args.deploy_dir, case=case)


def build_parser() -> argparse.ArgumentParser:
    from cohort_cli import (
        certs_cmd,
        data_cmd,
        job_cmd,
        kit_cmd,
        model_cmd,
        privacy_cmd,
        report_cmd,
        simulate_cmd,
        task_cmd,
    )

    parser = argparse.ArgumentParser(prog="cohort", description="Cross-silo federated learning over mutual TLS.")
    parser.add_argument("--version", action="version", version=f"cohort {VERSION}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("COHORT_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("COHORT_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="json: one object per line (time, level, logger, event, job, round, site); env COHORT_LOG_FORMAT",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("coordinator", help="run the coordinator daemon")
    _add_config_args(p)
    p.add_argument("--ready-file", type=Path, help="write the bound host:port here once serving")
    p.add_argument("--exit-when-done", action="store_true", help="exit when the configured job ends")
    p.set_defaults(func=_cmd_coordinator)

    p = sub.add_parser("participant", help="run a participant daemon at a site")
    _add_config_args(p)
    p.add_argument(
        "--exit-after-job",
        action="store_true",
        help="exit (code 0) when the job this site serves has finished (config key exit_after_job)",
    )
    p.set_defaults(func=_cmd_participant)

    certs_cmd.register(sub)
    data_cmd.register(sub)
    privacy_cmd.register(sub)
    task_cmd.register(sub)
    kit_cmd.register(sub)
    simulate_cmd.register(sub)
    model_cmd.register(sub, _add_admin_args)
    report_cmd.register(sub)

    p = sub.add_parser("demo", help="run a federation on this machine: 5 hospitals, or 4 banks (--use-case fraud)")
    p.add_argument(
        "--use-case",
        choices=["hospitals", "fraud"],
        default="hospitals",
        help="hospitals: breast cancer over 5 hospitals (default); fraud: card fraud over 4 banks",
    )
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo, or runs/fraud for --use-case fraud")
    p.add_argument("--rounds", type=int, default=None, help="override the demo job's number of rounds")
    p.add_argument("--deploy-dir", type=Path, default=None, help="directory with the demo configs (deploy/demo)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("status", help="show federation, sites, jobs and rounds (admin certificate)")
    _add_admin_args(p)
    p.add_argument("--last", type=int, default=0, metavar="N", help="only each job's last N round records (0: all)")
    p.set_defaults(func=_cmd_status)

    audit = sub.add_parser("audit", help="read and check the coordinator's hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = audit_sub.add_parser("verify", help="detect edited, removed or reordered audit events")
    p.add_argument("--state-dir", type=Path, default=Path("state/coordinator"), help="the coordinator's state_dir")
    p.add_argument("--head", default=None, help="head hash recorded earlier, to detect a truncated log as well")
    p.set_defaults(func=_cmd_audit_verify)
    p = audit_sub.add_parser("list", help="print audit events (refused calls and handshakes, joins, jobs ...)")
    p.add_argument("--state-dir", type=Path, default=Path("state/coordinator"), help="the coordinator's state_dir")
    p.add_argument("--kind", action="append", default=[], metavar="KIND", help="only this kind (repeatable)")
    p.add_argument("--last", type=int, default=50, metavar="N", help="the last N events (default 50; 0: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_audit_list)

    job = sub.add_parser("job", help="start, queue, list, show, watch, stop or cancel jobs (admin certificate)")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    p = job_sub.add_parser("start", help="start a job from a job YAML file (queued while another job runs)")
    p.add_argument("job", type=Path, help="job YAML (the keys of the coordinator config's `job` section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_admin_args(p)
    p.set_defaults(func=_cmd_job_start)
    p = job_sub.add_parser("watch", help="print a job's rounds as they complete, then its summary")
    p.add_argument("job_id", nargs="?", default="", help="default: the latest job")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    _add_admin_args(p)
    p.set_defaults(func=_cmd_job_watch)
    p = job_sub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.add_argument("--reason", default="")
    _add_admin_args(p)
    p.set_defaults(func=_cmd_job_stop)
    p = job_sub.add_parser("clear-site", help="let a site suspended for secure-aggregation aborts back in")
    p.add_argument("job_id")
    p.add_argument("site")
    _add_admin_args(p)
    p.set_defaults(func=_cmd_job_clear_site)
    job_cmd.register(job_sub, _add_admin_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except CohortError as exc:
        print(f"cohort {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(
            f"cohort {args.command}: the coordinator answered {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
