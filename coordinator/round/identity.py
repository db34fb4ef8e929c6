"""What a site must run to take part in a job: the task's name, code digest and data schema fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from common.tasks.base import Task, task_digest
from coordinator.state.registry import Declaration


@dataclass(frozen=True)
class JobIdentity:
    task_name: str
    task_digest: str
    schema_fingerprint: str

    @classmethod
    def of(cls, task: Task) -> JobIdentity:
        return cls(task.name, task_digest(task), task.schema.fingerprint())

    def mismatch(self, decl: Declaration) -> str | None:
        """A message naming what differs between a site's declaration and the job, or None."""
        diffs = []
        if decl.task_name != self.task_name:
            diffs.append(f"task name: site runs {decl.task_name!r}, the job needs {self.task_name!r}")
        if decl.task_digest != self.task_digest:
            diffs.append(
                f"task code digest: site has {decl.task_digest[:19]}..., the job needs "
                f"{self.task_digest[:19]}... (install the same task version at the site)"
            )
        if decl.schema_fingerprint != self.schema_fingerprint:
            diffs.append(
                f"data schema: site declares {decl.schema_fingerprint[:19]}..., the job needs "
                f"{self.schema_fingerprint[:19]}... (the site's columns differ from the task's schema)"
            )
        return "; ".join(diffs) or None
