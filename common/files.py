"""Owner-only files and directories, and the one atomic write every Cohort file goes through.

What the daemons keep on disk is for their own user only: the coordinator's state directory holds every site's
spooled update (in the clear without secure aggregation), the global models and the audit log; a participant's
privacy ledger decides how much more the site may train. So, whatever the umask:

- every directory Cohort creates is 0700 and every file 0600 (the mode is set explicitly after creation: a umask can
  only remove bits, but a file that already existed keeps its old mode until it is changed);
- an existing directory or file that group or others may *write* is refused: whoever could write there could already
  have replaced what is inside (a model, a ledger, a CA certificate), and tightening the mode now would not undo it;
- an existing one that group or others may only *read* is tightened where Cohort owns it (``tighten=True``).

:func:`write_atomic` is the atomic write (temporary file created 0600 beside the target, fsync, rename, fsync of the
directory) used for keys, certificates, the privacy ledger and the coordinator's ready file. Errors are
:class:`~common.errors.ConfigError` with one line that names the path and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from common.errors import ConfigError

log = logging.getLogger(__name__)

OWNER_DIR = 0o700
OWNER_FILE = 0o600
SHARED_WRITE = 0o022  # group or others may write
SHARED_ANY = 0o077  # group or others may read, write or traverse


def mode_of(path: Path) -> int:
    """The permission bits of ``path`` (following a symbolic link, as an open would)."""
    return stat.S_IMODE(path.stat().st_mode)


def _refuse_shared(path: Path, what: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & SHARED_WRITE:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        raise ConfigError(
            f"{what}: {kind} {path} is writable by group or others (mode {mode:04o}), so another user could have "
            f"changed what it holds; check its contents, run `chmod go-w {path}` (better: chmod "
            f"{'700' if kind == 'directory' else '600'}) and start again"
        )


def _tighten(path: Path, what: str, owner_mode: int) -> None:
    before = mode_of(path)
    if not before & SHARED_ANY:
        return
    try:
        os.chmod(path, before & owner_mode)
    except PermissionError:
        raise ConfigError(
            f"{what}: {path} is readable by group or others (mode {before:04o}) and belongs to another user, so "
            f"Cohort cannot make it private; chmod {owner_mode:o} it or choose a path of your own"
        ) from None
    log.info("%s: tightened %s from mode %04o to %04o (owner only)", what, path, before, before & owner_mode)


def check_not_shared(path: Path, what: str) -> None:
    """Raise :class:`ConfigError` if ``path`` exists and group or others may write to it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    _refuse_shared(path, what, st)


def private_file(path: Path, what: str) -> None:
    """An existing file that group or others may write is refused; one they may read becomes 0600."""
    check_not_shared(path, what)
    if path.exists():
        _tighten(path, what, OWNER_FILE)


def private_dir(path: Path, what: str = "directory", *, tighten: bool = True) -> Path:
    """Make sure ``path`` is a directory only its owner can use, creating it and missing parents with mode 0700.

    An existing directory that group or others may write is refused; one they may read is tightened to owner-only
    when ``tighten`` (the coordinator's state directory, a directory that receives a private key), else left as it
    is (a participant's ledger may live in a directory the site shares). Existing parents are not touched.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, OWNER_DIR)
        except FileExistsError:  # created meanwhile by another writer; checked below like any existing one
            continue
        os.chmod(directory, OWNER_DIR)  # the umask may have removed owner bits too
    if path not in missing:
        if not path.is_dir():
            raise ConfigError(f"{what}: {path} exists and is not a directory")
        _refuse_shared(path, what, path.stat())
        if tighten:
            _tighten(path, what, OWNER_DIR)
    return path


def private_tree(root: Path, what: str) -> Path:
    """:func:`private_dir` for ``root``, then every directory and file below it checked the same way and tightened.

    For a directory Cohort owns entirely (the coordinator's state directory): files written by an older version,
    under a looser umask, become owner-only; a file or directory that group or others may write is refused.
    Symbolic links are left alone (their targets are not Cohort's to change).
    """
    private_dir(root, what)
    for directory, subdirs, filenames in os.walk(root):
        for name in [*subdirs, *filenames]:
            entry = Path(directory) / name
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            _refuse_shared(entry, what, st)
            _tighten(entry, what, OWNER_DIR if stat.S_ISDIR(st.st_mode) else OWNER_FILE)
    return root


def create_private(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 (or make an existing file 0600), for writers that take a file name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, OWNER_FILE)
    try:
        os.fchmod(fd, OWNER_FILE)
    finally:
        os.close(fd)
    return path


def open_private(path: Path) -> BinaryIO:
    """Open ``path`` for writing (truncated) with mode 0600; a symbolic link at ``path`` is refused (ELOOP)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, OWNER_FILE)
    try:
        os.fchmod(fd, OWNER_FILE)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory's own blocks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[int, Path]]:
    # mkstemp creates the file with os.open(..., 0o600): never readable by others, not even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        yield fd, Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int = OWNER_FILE) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode`` (0600 unless told otherwise).

    The bytes go to a temporary file beside ``path`` (created 0600), which is fsynced and renamed over ``path``, and
    the directory is fsynced, so a crash leaves the old file or the new one, never half of either; an old file with
    looser permissions is replaced, not reused. The directory must exist (see :func:`private_dir`).
    """
    with _temp_beside(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            if mode != OWNER_FILE:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
