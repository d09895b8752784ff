"""Files and folders only their owner may read: keys, the results database, the server's secret.

Modes are set explicitly after creation, never left to the umask (a umask of 000 would otherwise
give every local user the key). One place for the rule, used by ``challenge build``, the store and
the server's start-up check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents, which keep their usual mode) and make it 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(DIR_MODE)
    return path


def private_file(path: str | os.PathLike) -> Path:
    """Make an existing file 0600."""
    path = Path(path)
    path.chmod(FILE_MODE)
    return path


def create_private_file(path: str | os.PathLike) -> bool:
    """Create ``path`` empty and 0600 unless it exists; True when it was created here.

    Created with ``O_EXCL`` and mode 0600, so there is no moment when the file is readable by others.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.fchmod(fd, FILE_MODE)  # the umask may have removed bits, never added: set exactly 0600
    os.close(fd)
    return True


def exposed(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The existing ``paths`` that group or others may read, write or enter (symbolic links are
    judged by what they point to)."""
    found = []
    for path in map(Path, paths):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            found.append(path)
    return found
