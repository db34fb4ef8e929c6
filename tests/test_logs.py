"""Log output: --log-format json (one object per line with job/round/site), and dp-accounting's "failed to converge"
flood reduced to one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from cohort_cli.main import build_parser
from common.logs import CONVERGENCE, JsonFormatter, quiet_accountant

ROOT = Path(__file__).resolve().parent.parent


def not_converging_compose() -> None:
    """An RDP composition dp-accounting's own tests know to log "failed to converge" for several orders."""
    event = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
    rdp_privacy_accountant.RdpAccountant().compose(event)


def test_json_formatter_fields() -> None:
    record = logging.LogRecord("cohort.coordinator.ops", logging.INFO, __file__, 1, "round %d started", (3,), None)
    record.job, record.round, record.site = "job-1", 3, "site-a"
    entry = json.loads(JsonFormatter().format(record))
    assert entry.pop("time").endswith("Z")
    assert entry == {
        "level": "info",
        "logger": "cohort.coordinator.ops",
        "event": "round 3 started",
        "job": "job-1",
        "round": 3,
        "site": "site-a",
    }
    plain = json.loads(JsonFormatter().format(logging.makeLogRecord({"msg": "x", "levelname": "WARNING"})))
    assert set(plain) == {"time", "level", "logger", "event"}  # no context: no empty fields


def test_log_format_flag() -> None:
    assert build_parser().parse_args(["--log-format", "json", "status"]).log_format == "json"
    assert build_parser().parse_args(["status"]).log_format == "text"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "xml", "status"])


def test_convergence_flood_is_one_line(caplog: pytest.LogCaptureFixture) -> None:
    quiet_accountant()
    caplog.set_level(logging.WARNING)
    before = CONVERGENCE.count
    not_converging_compose()
    not_converging_compose()
    warned = CONVERGENCE.count - before
    assert warned >= 2, "the composition no longer fails to converge: pick another"
    lines = [r for r in caplog.records if "failed to converge" in r.getMessage()]
    assert len(lines) <= 1  # one line per process: an earlier test may have let it through already
    if before == 0:
        assert len(lines) == 1
        assert "counted, not logged" in lines[0].getMessage()


@pytest.mark.slow
def test_json_logs_of_a_cohort_process() -> None:
    """A fresh process configured like `cohort --log-format json`: every stderr line is one JSON object, and the
    accountant's flood is one of them."""
    script = textwrap.dedent(
        """
        import logging
        from cohort_cli.main import _setup_logging
        from tests.test_logs import not_converging_compose
        _setup_logging("info", "json")
        logging.getLogger("cohort.coordinator.ops").info("round %d started", 2, extra={"job": "j1", "round": 2})
        for _ in range(3):
            not_converging_compose()
        logging.getLogger("cohort.coordinator.ops").info("site left", extra={"site": "site-b"})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["logger"], e["event"]) for e in entries if e["logger"] != "absl"] == [
        ("cohort.coordinator.ops", "round 2 started"),
        ("cohort.coordinator.ops", "site left"),
    ]
    assert (entries[0]["job"], entries[0]["round"]) == ("j1", 2)
    assert entries[-1]["site"] == "site-b"
    absl = [e for e in entries if e["logger"] == "absl"]
    assert len(absl) == 1
    assert absl[0]["level"] == "warning"
    assert "failed to converge" in absl[0]["event"]
