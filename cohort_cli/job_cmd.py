"""``cohort job list|show|cancel``: the job queue and one job's record, over the admin API."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable

from cohort_cli.admin_client import AdminEndpoint, cancel_job, format_status, get_status, keep_last_rounds, to_json
from common.errors import NotFound
from common.proto.cohort.v1 import cohort_pb2 as pb

AddAdminArgs = Callable[[argparse.ArgumentParser], None]


def register(job_sub: argparse._SubParsersAction[argparse.ArgumentParser], add_admin_args: AddAdminArgs) -> None:
    p = job_sub.add_parser("list", help="every job, oldest first: state, progress and why it waits or failed")
    add_admin_args(p)
    p.set_defaults(func=_cmd_list)
    p = job_sub.add_parser("show", help="one job: settings, rounds, and why it waits or failed")
    p.add_argument("job_id", nargs="?", default="", help="default: the latest job")
    p.add_argument("--last", type=int, default=0, metavar="N", help="only the last N round records (0: all)")
    add_admin_args(p)
    p.set_defaults(func=_cmd_show)
    p = job_sub.add_parser("cancel", help="take a queued job off the queue (`cohort job stop` ends a running one)")
    p.add_argument("job_id")
    p.add_argument("--reason", default="")
    add_admin_args(p)
    p.set_defaults(func=_cmd_cancel)


def _endpoint(args: argparse.Namespace) -> AdminEndpoint:
    return AdminEndpoint.from_dir(args.coordinator, args.tls_dir, args.server_name)


def list_line(job: pb.JobStatus) -> str:
    """``20261204-180301-a1b2c3  running   digits  round 3/20  long-run  (waiting for sites ...)``"""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_unix)) if job.created_unix else "-"
    why = job.waiting or (job.detail if job.state not in ("running", "queued") else "")
    return (
        f"{job.job_id}  {job.state:<16} {job.spec.task:<16} round {job.current_round}/{job.spec.rounds:<5} "
        f"{created}  {job.spec.name}" + (f"  ({why})" if why else "")
    )


def _cmd_list(args: argparse.Namespace) -> int:
    reply = asyncio.run(get_status(_endpoint(args)))
    if args.json:
        print(json.dumps([json.loads(to_json(job)) for job in keep_last_rounds(reply, 1).jobs], indent=2))
    elif not reply.jobs:
        print("no jobs")
    else:
        for job in reply.jobs:
            print(list_line(job))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    reply = asyncio.run(get_status(_endpoint(args)))
    jobs = [j for j in reply.jobs if j.job_id == args.job_id] if args.job_id else list(reply.jobs[-1:])
    if not jobs:
        raise NotFound(f"the coordinator has no job {args.job_id!r}" if args.job_id else "the coordinator has no jobs")
    one = pb.StatusReply(federation=reply.federation, software_version=reply.software_version, jobs=jobs)
    if args.json:
        print(to_json(keep_last_rounds(one, args.last).jobs[0]))
    else:
        # The job's part of `cohort status` (settings, rounds, privacy, why it waits or failed), without the sites.
        text = format_status(one, args.last)
        print("\n".join(text.splitlines()[2 + len(one.sites) :]))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    reply = asyncio.run(cancel_job(_endpoint(args), args.job_id, args.reason))
    print(to_json(reply) if args.json else f"job {reply.job_id}: {reply.state} ({reply.detail})")
    return 0
