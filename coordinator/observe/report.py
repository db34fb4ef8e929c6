"""The run report of one job: ``report.html`` and PNG plots, from the job's records in the coordinator's database.

Written by the coordinator when a job ends (``<state_dir>/reports/<job_id>/``) and by ``cohort report JOB`` from a
state directory at any time (a read-only connection: it works beside a running coordinator). It shows only what the
round records hold (the same numbers as ``cohort status``): per round the sites counted, training loss, validation
loss and accuracy, epsilon, wall time and its split into training and aggregation; the final federated test.
Plots are matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

import html
import io
import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import files
from common.errors import ConfigError, NotFound
from common.job_text import strategy_line
from coordinator import jobspec
from coordinator.state.store import Store


@dataclass(frozen=True)
class ReportData:
    job_id: str
    name: str
    state: str
    detail: str
    spec: dict[str, Any]
    rounds: list[dict[str, Any]]  # the round records (coordinator/state/store.py RoundRow fields)
    epsilon: float
    site_epsilon: dict[str, float]
    test_loss: float | None
    test_accuracy: float | None
    test_metrics: dict[str, float]

    @classmethod
    def from_rows(cls, job: dict[str, Any], rounds: list[dict[str, Any]]) -> ReportData:
        def loads(v: Any) -> Any:
            return json.loads(v) if isinstance(v, str) else v

        return cls(
            job_id=job["job_id"],
            name=job.get("name") or "",
            state=job["state"],
            detail=job.get("detail") or "",
            spec=loads(job["spec"]),
            rounds=[{**r, **{k: loads(r[k]) for k in ("cohort", "reported", "timings")}} for r in rounds],
            epsilon=job.get("epsilon") or 0.0,
            site_epsilon=loads(job.get("site_epsilon") or "{}"),
            test_loss=job.get("test_loss"),
            test_accuracy=job.get("test_accuracy"),
            test_metrics=loads(job.get("test_metrics") or "{}"),
        )

    @classmethod
    def from_store(cls, store: Store, job_id: str) -> ReportData:
        job = store.job(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        return cls.from_rows(job, [asdict(r) for r in store.rounds(job_id)])

    @classmethod
    def from_database(cls, path: Path, job_id: str) -> ReportData:
        """Read-only, beside a running coordinator; ``job_id`` empty: the latest job."""
        if not path.exists():
            raise ConfigError(f"no coordinator database at {path}; pass the coordinator's state_dir with --state-dir")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            if job_id:
                row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            else:
                row = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT 1").fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r} in {path}" if job_id else f"no job in {path}")
            rounds = db.execute(
                "SELECT * FROM rounds WHERE job_id = ? ORDER BY round, attempt", (row["job_id"],)
            ).fetchall()
            return cls.from_rows(dict(row), [dict(r) for r in rounds])
        finally:
            db.close()


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    plots: tuple[Path, ...]


def write_report(data: ReportData, target: Path) -> ReportPaths:
    """Write ``report.html`` and its PNG plots into ``target`` (created); returns their paths."""
    # Owner-only like the rest of the state directory: the report carries the job's metrics and epsilon. An existing
    # directory someone chose with `cohort report --out` is left as it is (not tightened), unless others may write it.
    files.private_dir(target, "report directory", tighten=False)
    plots = _plots(data, target)
    page = files.write_atomic(target / "report.html", _html(data, plots).encode())
    return ReportPaths(page, tuple(plots))


def _completed(data: ReportData) -> list[dict[str, Any]]:
    return [r for r in data.rounds if r["state"] == "completed"]


def _plots(data: ReportData, target: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _completed(data)
    xs = [r["round"] for r in done]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ax.plot(xs, [r["train_loss"] or 0.0 for r in done], marker="o", label="train loss")
    evaluated = [r for r in done if r["val_samples"]]
    if evaluated:
        ax.plot([r["round"] for r in evaluated], [r["val_loss"] for r in evaluated], marker="o", label="val loss")
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in evaluated], [r["val_accuracy"] for r in evaluated], "g-s", label="val accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.set_title(f"job {data.job_id}: loss and accuracy")
    paths.append(_save(fig, target / "accuracy_loss.png"))

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    train = [float(r["timings"].get("train_s", 0.0)) for r in done]
    agg = [float(r["timings"].get("aggregate_s", 0.0)) for r in done]
    ax.bar(xs, train, label="training and uploads")
    ax.bar(xs, agg, bottom=train, label="aggregation")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("round time")
    paths.append(_save(fig, target / "round_time.png"))

    if data.spec.get("privacy", {}).get("unit", "none") != "none":
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
        ax.plot(xs, [r["epsilon"] or 0.0 for r in done], marker="o", color="tab:red", label="epsilon spent")
        budget = float(data.spec.get("privacy", {}).get("target_epsilon", 0.0) or 0.0)
        if budget > 0:
            ax.axhline(budget, color="grey", linestyle="--", label=f"budget {budget:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon")
        ax.legend()
        ax.set_title("privacy spent")
        paths.append(_save(fig, target / "epsilon.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return files.write_atomic(path, buffer.getvalue())


def _html(data: ReportData, plots: list[Path]) -> str:
    e = html.escape
    spec = data.spec
    privacy = spec.get("privacy", {})
    secure = spec.get("secure_aggregation", {}).get("enabled", False)
    done = _completed(data)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{e(str(v))}</td>"
            for v in (
                r["round"],
                r["attempt"],
                r["state"],
                f"{len(r['reported'])}/{len(r['cohort'])}",
                _f(r["train_loss"]),
                _f(r["val_loss"]) if r["val_samples"] else "-",
                _f(r["val_accuracy"]) if r["val_samples"] else "-",
                _f(r["epsilon"], 3) if r["epsilon"] is not None else "-",
                _f((r["finished"] - r["started"]) if r["finished"] else None, 2),
                r["detail"] or "",
            )
        )
        + "</tr>"
        for r in data.rounds
    )
    facts = [
        f"state <b>{e(data.state)}</b>{' (' + e(data.detail) + ')' if data.detail else ''}",
        f"task {e(str(spec.get('task', '')))}, {len(done)} of {spec.get('rounds', '?')} rounds completed",
        "secure aggregation: " + ("on (SecAgg+): the coordinator saw only sums" if secure else "off"),
        f"strategy: {e(strategy_line(jobspec.job_spec_of_record(spec)))}",
    ]
    if privacy.get("unit", "none") != "none":
        per_site = ", ".join(f"{e(s)} {v:.2f}" for s, v in sorted(data.site_epsilon.items()))
        facts.append(
            f"differential privacy ({e(privacy['unit'])} level): epsilon {data.epsilon:.3f} at delta "
            f"{privacy.get('delta', 0):g}" + (f"; sites: {per_site}" if per_site else "")
        )
    if data.test_accuracy is not None:
        facts.append(f"federated test: accuracy {_f(data.test_accuracy)}, loss {_f(data.test_loss)}")
    images = "".join(f'<img src="{e(p.name)}" alt="{e(p.stem)}">' for p in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Cohort run report: {e(data.job_id)}</title>
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#1d2330}}
table{{border-collapse:collapse}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}
img{{max-width:600px;margin:6px}}</style></head><body>
<h1>Run report: job {e(data.job_id)} {e(data.name)}</h1>
<ul>{"".join(f"<li>{f}</li>" for f in facts)}</ul>
<div>{images}</div>
<h2>Rounds</h2>
<table><tr><th>round</th><th>attempt</th><th>state</th><th>sites</th><th>train loss</th><th>val loss</th>
<th>val acc</th><th>epsilon</th><th>seconds</th><th>detail</th></tr>{rows}</table>
</body></html>
"""


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
