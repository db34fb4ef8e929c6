"""``cohort report [JOB]``: the run report (HTML and PNG plots) of a job, from the coordinator's state directory.

The coordinator writes the same report when a job ends (``<state_dir>/reports/<job_id>/report.html``); this command
(re)writes it at any time, also for a running job, through a read-only connection to the database.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.observe.report import ReportData, write_report


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="write a job's run report (HTML + PNG plots) from the coordinator's state")
    p.add_argument("job_id", nargs="?", default="", help="default: the latest job")
    p.add_argument("--state-dir", type=Path, default=Path("state/coordinator"), help="the coordinator's state_dir")
    p.add_argument("--out", type=Path, default=None, help="directory to write to (default: STATE_DIR/reports/JOB)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    data = ReportData.from_database(args.state_dir / "coordinator.db", args.job_id)
    paths = write_report(data, args.out or args.state_dir / "reports" / data.job_id)
    print(f"job {data.job_id} ({data.state}): {paths.html}")
    for plot in paths.plots:
        print(f"  {plot}")
    return 0
