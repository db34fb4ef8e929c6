"""What a site must run to take part in a job: the task's name, code digest and data schema fingerprint, and the
job's task parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.tasks import digest as task_code
from common.tasks.base import Task
from common.tasks.params import ParamValue, canonical_json
from common.version import VERSION
from coordinator.state.registry import Declaration


@dataclass(frozen=True)
class JobIdentity:
    task_name: str
    task_digest: str
    schema_fingerprint: str
    task_version: str = ""
    task_code_digest: str = ""
    training_code_digest: str = ""
    task_params: str = ""  # canonical JSON of the job's task parameters (sent with every task; not declared)

    @classmethod
    def of(cls, task: Task, params: Mapping[str, ParamValue] | None = None) -> JobIdentity:
        """The identity of the task as installed (its code digest does not depend on parameters) and the job's
        parameters; ``params`` must already have been validated against the task's schema."""
        code = task_code.compute(task)
        return cls(
            task.name,
            code.combined,
            task.schema.fingerprint(),
            code.version,
            code.task_code,
            code.training_code,
            canonical_json(params) if params else "",
        )

    def mismatch(self, decl: Declaration) -> str | None:
        """A message naming what differs between a site's declaration and the job, or None."""
        diffs = []
        if decl.task_name != self.task_name:
            diffs.append(f"task name: site runs {decl.task_name!r}, the job needs {self.task_name!r}")
        if decl.task_digest != self.task_digest:
            diffs.append(self._code_mismatch(decl))
        if decl.schema_fingerprint != self.schema_fingerprint:
            diffs.append(
                f"data schema: site declares {decl.schema_fingerprint[:19]}..., the job needs "
                f"{self.schema_fingerprint[:19]}... (the site's columns differ from the task's schema)"
            )
        return "; ".join(diffs) or None

    def _code_mismatch(self, decl: Declaration) -> str:
        """Which part of the task code digest differs (task or Cohort training code), with both sides' versions."""
        parts = []
        if decl.task_code_digest and decl.task_code_digest != self.task_code_digest:
            parts.append(
                f"task code differs: site runs {decl.task_name!r} version {decl.task_version!r} "
                f"({decl.task_code_digest[:19]}...), the job needs version {self.task_version!r} "
                f"({self.task_code_digest[:19]}...); install the job's task version at the site"
            )
        if decl.training_code_digest and decl.training_code_digest != self.training_code_digest:
            parts.append(
                f"Cohort training code differs: site runs Cohort {decl.software_version} "
                f"({decl.training_code_digest[:19]}...), the coordinator runs Cohort {VERSION} "
                f"({self.training_code_digest[:19]}...); install the coordinator's Cohort version at the site"
            )
        return "; ".join(parts) or (
            f"task code digest: site has {decl.task_digest[:19]}..., the job needs "
            f"{self.task_digest[:19]}... (install the same task version at the site)"
        )
