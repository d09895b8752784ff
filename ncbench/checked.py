"""The release files this user has had checked already, so that `attack run` checks a release
from elsewhere once, not before every run.

A file is known by its device, inode, size, modification and change times: any write to it (and
any rename, which sets its change time) makes it unchecked again, and nobody can set a change time
by hand. The record lies in the user's own cache folder (``$XDG_CACHE_HOME/ncbench``, else
``~/.cache/ncbench``, made 0700), where whoever supplied the release cannot write. It is a cache
only: a record that cannot be read or written means the file is checked again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ncbench.private import FILE_MODE, private_dir

RECORD_NAME = "checked-releases.json"
KEPT = 1000  # the most recent files kept in the record
RECORD_MAX_BYTES = 1 << 20


def record_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ncbench" / RECORD_NAME


def identity(path: Path) -> str:
    found = path.stat()
    return f"{found.st_dev}:{found.st_ino}:{found.st_size}:{found.st_mtime_ns}:{found.st_ctime_ns}"


def _recorded() -> list[str]:
    try:
        with open(record_path(), "rb") as handle:
            text = handle.read(RECORD_MAX_BYTES + 1)
        known = json.loads(text) if len(text) <= RECORD_MAX_BYTES else []
    except (OSError, ValueError):
        return []
    return [item for item in known if isinstance(item, str)] if isinstance(known, list) else []


def was_checked(path: Path) -> bool:
    """Whether ``path``, as it is now, passed a check this user had run."""
    try:
        return identity(path) in _recorded()
    except OSError:
        return False


def mark_checked(path: Path, seen: str | None = None) -> None:
    """Record that ``path`` passed the check, as it was when the check began (``seen``, its
    :func:`identity` then; by default as it is now): a file written to while it was checked is
    not recorded. Nothing happens where the record cannot be written."""
    temporary = None
    try:
        this = identity(path)
        if seen is not None and seen != this:
            return
        known = [item for item in _recorded() if item != this] + [this]
        folder = private_dir(record_path().parent)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".checked-", delete=False) as handle:
            temporary = handle.name
            os.fchmod(handle.fileno(), FILE_MODE)
            json.dump(known[-KEPT:], handle)
        os.replace(temporary, record_path())
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
