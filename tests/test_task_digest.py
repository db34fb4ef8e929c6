"""The task code digest: formatting and comments do not count, code does (in the task and in the helper modules of
its package), the Cohort training code is its own part, and a Join with a different digest is refused with a
message that names the part and both versions."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import (
    SITES,
    CoordinatorFactory,
    Pki,
    channel,
    coordinator_config,
    job_config,
    join_request,
    runner_of,
)

from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.tasks import digest as task_code
from common.tasks import tabular
from common.tasks.base import load_task, task_digest
from common.tasks.digest import TaskDigest, normalized_source
from common.version import VERSION
from coordinator.round.identity import JobIdentity
from coordinator.state.registry import Declaration

HELPER = '''
"""Layers of the model."""
import torch


def block(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
'''

TASK = '''
"""A task in its own package, with a helper module."""
import torch

from common.tasks.base import DataSchema
from common.tasks.tabular import TabularTask
from {pkg}.layers import block

SCHEMA = DataSchema(features=("a", "b"), label="y", num_classes=2)


class PkgTask(TabularTask):
    name = "pkg_task"
    version = "1.0"
    schema = SCHEMA

    def make_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(2, 4), block(4), torch.nn.Linear(4, 2))


TASK = PkgTask()
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh task package on sys.path: ``<pkg>/layers.py`` and ``<pkg>/task.py`` (the task imports layers)."""
    # No .pyc: an edit of the same size within the same second would otherwise reload the stale bytecode.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    name = f"digest_pkg_{uuid.uuid4().hex[:12]}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "layers.py").write_text(HELPER)
    (root / "task.py").write_text(TASK.format(pkg=name))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    load_task(f"{name}.task:TASK")
    try:
        yield name, root
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def _digest(name: str) -> TaskDigest:
    """The digest of the package's task as its files are now (as a site that installed them would import them)."""
    for module in (f"{name}.layers", f"{name}.task"):
        importlib.reload(sys.modules[module])
    return task_code.compute(load_task(f"{name}.task:TASK"))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_normalized_source_ignores_comments_docstrings_and_formatting() -> None:
    a = 'def f(x):\n    """Doc."""\n    # a comment\n    return x+1\n'
    b = "def f( x ):\n\n    return (x + 1)  # another\n"
    assert normalized_source(a) == normalized_source(b)
    assert normalized_source(a) != normalized_source("def f(x):\n    return x + 2\n")


def test_the_task_covers_its_helper_modules(package: tuple[str, Path]) -> None:
    name, _ = package
    d = _digest(name)
    assert d.task_modules == (f"{name}.layers", f"{name}.task")
    assert "common.tasks.tabular" in d.training_modules
    assert "common.tasks.base" in d.training_modules
    assert d.version == "1.0"
    assert d.combined == task_digest(load_task(f"{name}.task:TASK"))


def test_comment_and_docstring_edits_keep_the_digest(package: tuple[str, Path]) -> None:
    name, root = package
    before = _digest(name)
    _edit(root / "task.py", '"""A task in its own package', "# reviewed by the data team\n" + '"""A task in a package')
    _edit(root / "layers.py", "    return torch", "    # two layers\n    return  torch")
    _edit(root / "task.py", "class PkgTask(TabularTask):", 'class PkgTask(TabularTask):\n    """Documented now."""\n')
    assert _digest(name) == before


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("task.py", "torch.nn.Linear(4, 2)", "torch.nn.Linear(4, 2, bias=False)"),
        ("layers.py", "torch.nn.ReLU()", "torch.nn.Tanh()"),
        ("task.py", 'version = "1.0"', 'version = "1.1"'),
    ],
)
def test_code_helper_and_version_edits_change_the_task_part(
    package: tuple[str, Path], module: str, old: str, new: str
) -> None:
    name, root = package
    before = _digest(name)
    _edit(root / module, old, new)
    after = _digest(name)
    assert after.task_code != before.task_code
    assert after.training_code == before.training_code
    assert after.combined != before.combined


def test_mismatch_names_the_task_part_and_both_versions(package: tuple[str, Path]) -> None:
    name, root = package
    job = JobIdentity.of(load_task(f"{name}.task:TASK"))
    _edit(root / "layers.py", "torch.nn.ReLU()", "torch.nn.GELU()")
    _edit(root / "task.py", 'version = "1.0"', 'version = "1.1"')
    site = _digest(name)
    message = job.mismatch(_site(site, job))
    assert message is not None
    assert "task code differs" in message
    assert "version '1.1'" in message
    assert "the job needs version '1.0'" in message
    assert "Cohort training code" not in message


def _site(d: TaskDigest, job: JobIdentity, software: str = VERSION) -> Declaration:
    """What a site with code ``d`` declares at Join."""
    return Declaration(
        job.task_name, d.combined, job.schema_fingerprint, software, d.version, d.task_code, d.training_code
    )


def test_mismatch_names_the_cohort_training_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    task = load_task("breast_cancer")
    job = JobIdentity.of(task)
    patched = tmp_path / "tabular.py"
    patched.write_text(Path(tabular.__file__).read_text().replace("steps += 1", "steps += 2", 1))
    original = task_code._source_path
    monkeypatch.setattr(task_code, "_source_path", lambda n: patched if n == "common.tasks.tabular" else original(n))
    message = job.mismatch(_site(task_code.compute(task), job, software="0.0.9"))
    assert message is not None
    assert "Cohort training code differs: site runs Cohort 0.0.9" in message
    assert f"the coordinator runs Cohort {VERSION}" in message
    assert "task code differs" not in message


async def test_join_with_other_task_code_is_refused_naming_the_part(
    coordinator_factory: CoordinatorFactory, pki: Pki, tmp_path: Path
) -> None:
    """Over real gRPC and mutual TLS: a site with edited task code cannot join, and is told why."""
    daemon = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job_config()))
    identity = runner_of(daemon).machine.setup.identity
    request = join_request(
        task_digest="sha256:" + "cd" * 32,
        task_version="3",
        task_code_digest="sha256:" + "ab" * 32,
        training_code_digest=identity.training_code_digest,
    )
    async with channel(daemon.address, pki.site(SITES[0]), pki.coordinator.ca) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.FederationStub(ch).Join(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "task code differs" in details
    assert "version '3'" in details
    assert f"the job needs version '{identity.task_version}'" in details
    assert daemon.coordinator.registry.sessions() == []
