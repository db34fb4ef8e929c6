"""The task code digest a site declares at Join: which code will train, in two parts.

* **Task code**: the module that defines the task's class, every module of the task's own top-level package that
  holds the task object or that those modules import (directly or through each other, including imports inside
  functions), and the task's declared ``version`` string.
* **Cohort training code**: every module of ``common.tasks`` (the shared training loop, DP-SGD, scaling, CSV reading,
  the interface) that the task's modules import or inherit from, followed the same way.

Each module is hashed in a normalized form: parsed by Python's ``ast``, docstrings removed, and written back with
``ast.unparse``, so comments, docstrings, blank lines, quoting and formatting do not count, and any change to code
does. Modules of other distributions (torch, numpy, Opacus) are not hashed; pin their versions at the sites.
The normalized form is Python's own: sites should run the same Python minor version as the coordinator (3.11).

The combined digest (``sha256:<hex>``) covers both parts; the coordinator compares it at Join, and when it differs
says which part differs and the two sides' versions (task version, Cohort version).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

TRAINING_PACKAGE = "common.tasks"
UNVERSIONED = "unversioned"
DIGEST_FORMAT = "cohort-task-digest/2"


@dataclass(frozen=True)
class TaskDigest:
    """The two parts of a task's code identity and what they cover."""

    version: str  # the task's declared version
    task_code: str  # "sha256:<hex>" over the version and the task's own modules
    training_code: str  # "sha256:<hex>" over the Cohort training modules it uses
    task_modules: tuple[str, ...]
    training_modules: tuple[str, ...]

    @property
    def combined(self) -> str:
        """What a site declares as its task digest: both parts together."""
        text = f"{DIGEST_FORMAT}\n{self.task_code}\n{self.training_code}\n"
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def normalized_source(source: str) -> str:
    """``source`` without comments, docstrings or formatting: its AST, docstrings dropped, unparsed."""
    return _normalized(ast.parse(source))


def _normalized(tree: ast.Module) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _source_path(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a parent is not a package, or the name is not a module
            return None
        origin = spec.origin if spec is not None else None
    if origin is None or not origin.endswith(".py"):
        return None  # namespace packages, C extensions, frozen modules
    return Path(origin)


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported_names(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Absolute module names ``tree`` may import: ``import a.b``, ``from a import b`` (a, a.b), relative ones."""
    package = _package_of(name, path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 >= len(parts):
                    continue  # beyond the top-level package: Python refuses it too
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _in_scope(name: str, own_package: str | None) -> bool:
    if name == TRAINING_PACKAGE or name.startswith(TRAINING_PACKAGE + "."):
        return True
    return own_package is not None and (name == own_package or name.startswith(own_package + "."))


def _roots(task: object) -> tuple[list[str], str | None]:
    """The modules the search starts from and the task's own top-level package (None for a built-in task)."""
    cls_module = type(task).__module__
    builtin = cls_module.startswith(TRAINING_PACKAGE + ".")
    own = None if builtin else cls_module.partition(".")[0]
    roots = [cls_module]
    for cls in type(task).__mro__[1:]:
        if _in_scope(cls.__module__, own):
            roots.append(cls.__module__)
    # The module that holds the task object itself (``TASK = MyTask(width=64)``) may differ from its class's.
    prefix = own if own is not None else cls_module
    for name, module in sorted(sys.modules.items()):
        if (name == prefix or name.startswith(prefix + ".")) and _holds(module, task):
            roots.append(name)
    return list(dict.fromkeys(roots)), own


def _holds(module: ModuleType | None, task: object) -> bool:
    try:
        return any(value is task for value in vars(module).values())
    except TypeError:
        return False


def compute(task: object) -> TaskDigest:
    """The digest of ``task``'s code; ValueError when its defining module's source cannot be found."""
    roots, own = _roots(task)
    # Task code: the task's own package, or for a built-in task its module (and the one holding the object).
    task_side = {r for r in roots if r == roots[0] or not _in_scope(r, None)}
    normalized: dict[str, str] = {}
    queue = list(roots)
    while queue:
        name = queue.pop()
        if name in normalized:
            continue
        path = _source_path(name)
        if path is None:
            if name == roots[0]:
                raise ValueError(f"cannot locate the source of task module {name!r}")
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError) as exc:
            raise ValueError(f"cannot read the source of module {name!r}: {exc}") from None
        for imported in sorted(_imported_names(name, path, tree)):
            if imported not in normalized and _in_scope(imported, own):
                queue.append(imported)
        normalized[name] = _normalized(tree)
    version = str(getattr(task, "version", UNVERSIONED) or UNVERSIONED)
    task_modules = sorted(n for n in normalized if n in task_side or not _in_scope(n, None))
    training_modules = sorted(n for n in normalized if n not in task_modules)
    return TaskDigest(
        version=version,
        task_code=_hash([f"version {version}"] + [f"{n}\0{normalized[n]}" for n in task_modules]),
        training_code=_hash([f"{n}\0{normalized[n]}" for n in training_modules]),
        task_modules=tuple(task_modules),
        training_modules=tuple(training_modules),
    )


def _hash(parts: list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()
