"""The one rule for names: site ids and admin names (a certificate's CN, a data folder, an allow-list entry).

Names become directory names, log fields and audit actors: lower case letters, digits, ``.``, ``_`` and ``-``, 1 to 63
characters, starting with a letter or digit (so no path separators and no leading dot).
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
RULE = "1-63 of a-z 0-9 . _ - starting with a letter or digit"


def is_name(name: object) -> bool:
    # fullmatch, not a ``$`` anchor: ``$`` also matches before a trailing newline.
    return isinstance(name, str) and _NAME.fullmatch(name) is not None
