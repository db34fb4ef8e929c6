"""The run report from a real coordinator database: `cohort report` writes the HTML and PNG plots from the round
records, read-only, and refuses an unknown job with one line and exit 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cohort_cli.main import main
from coordinator.observe.report import ReportData
from coordinator.state.store import SqliteStore

PNG = b"\x89PNG\r\n\x1a\n"


def make_state(state_dir: Path) -> tuple[str, list[tuple[float, float, float]]]:
    """A job with three round attempts (the second failed, then retried) and DP, as the coordinator records them."""
    store = SqliteStore(state_dir / "coordinator.db")
    job_id = "job-report"
    spec = {"task": "breast_cancer", "rounds": 2, "privacy": {"unit": "site", "delta": 1e-5, "target_epsilon": 8.0}}
    store.create_job(job_id, "report-test", spec, "sha256:0")
    values = []
    for rnd, attempt, ok in ((1, 0, True), (2, 0, False), (2, 1, True)):
        store.start_round(job_id, rnd, attempt, ["site-a", "site-b"], "sha256:0")
        if not ok:
            store.finish_round(job_id, rnd, attempt, state="failed", reported=["site-a"], detail="too few uploads")
            continue
        loss, acc, eps = 0.7 / rnd, 0.6 + 0.1 * rnd, 1.5 * rnd
        digest = "sha256:" + hashlib.sha256(str(rnd).encode()).hexdigest()
        store.finish_round(
            job_id,
            rnd,
            attempt,
            state="completed",
            reported=["site-a", "site-b"],
            model_version=digest,
            train_loss=loss,
            train_samples=100,
            timings={"train_s": 0.5, "aggregate_s": 0.1},
            epsilon=eps,
        )
        store.set_round_eval(job_id, rnd, attempt, loss * 1.1, acc, 40)
        values.append((loss, acc, eps))
    store.update_job(job_id, state="finished", epsilon=values[-1][2], test_loss=0.3, test_accuracy=0.9)
    store.close()
    return job_id, values


def test_cohort_report_writes_html_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    job_id, values = make_state(state)
    before = (state / "coordinator.db").read_bytes()
    assert main(["report", "--state-dir", str(state)]) == 0  # the latest job
    out = capsys.readouterr().out
    page = state / "reports" / job_id / "report.html"
    assert str(page) in out
    html = page.read_text()
    for loss, acc, eps in values:
        assert f"{loss:.4f}" in html
        assert f"{acc:.4f}" in html
        assert f"{eps:.3f}" in html
    assert "too few uploads" in html  # the failed attempt is listed
    assert "secure aggregation: off" in html
    assert "strategy: fedavg (server lr 1), aggregation mean, selection random" in html  # as `cohort status` says
    assert "federated test: accuracy 0.9000" in html
    plots = sorted(p.name for p in page.parent.glob("*.png"))
    assert plots == ["accuracy_loss.png", "epsilon.png", "round_time.png"]
    for name in plots:
        assert (page.parent / name).read_bytes()[:8] == PNG
        assert f'src="{name}"' in html
    assert (state / "coordinator.db").read_bytes() == before  # read-only

    other = tmp_path / "elsewhere"
    assert main(["report", job_id, "--state-dir", str(state), "--out", str(other)]) == 0
    assert (other / "report.html").read_text() == html
    data = ReportData.from_database(state / "coordinator.db", job_id)
    assert [r["state"] for r in data.rounds] == ["completed", "failed", "completed"]


def test_cohort_report_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    make_state(state)
    assert main(["report", "nope", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("cohort report: error: no job 'nope'")
    assert main(["report", "--state-dir", str(tmp_path / "missing")]) == 2
    assert "no coordinator database" in capsys.readouterr().err


def test_report_of_a_job_without_rounds(tmp_path: Path) -> None:
    """A job stopped before its first round still gets a report (empty plots, no warning: warnings are errors)."""
    from coordinator.observe.report import write_report

    store = SqliteStore(tmp_path / "coordinator.db")
    store.create_job("job-empty", "empty", {"task": "breast_cancer", "rounds": 5}, "sha256:0")
    store.update_job("job-empty", state="stopped", detail="stopped by admin")
    store.close()
    paths = write_report(ReportData.from_database(tmp_path / "coordinator.db", ""), tmp_path / "out")
    html = paths.html.read_text()
    assert "0 of 5 rounds completed" in html
    assert "stopped by admin" in html
    assert [p.name for p in paths.plots] == ["accuracy_loss.png", "round_time.png"]  # no privacy: no epsilon plot
