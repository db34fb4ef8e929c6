"""The installed Cohort version, as declared to peers."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("cohort")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    VERSION = "0.0.0+unknown"
