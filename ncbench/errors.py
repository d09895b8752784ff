"""The one error type for user mistakes; the CLI turns it into a one-line message and exit code 2."""

import errno
import re

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# h5py reports HDF5's failed writes as a RuntimeError or an OSError whose text carries the errno.
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|errno = (28|122)\b")


class NcbenchError(Exception):
    """A mistake the user can fix (bad path, wrong file, malformed input): shown as one line."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says that a disk or a quota is full, by its errno or by h5py's text."""
    if getattr(error, "errno", None) in DISK_FULL_ERRNOS:
        return True
    return isinstance(error, (OSError, RuntimeError)) and DISK_FULL_TEXT.search(str(error)) is not None


def one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters, as someone reads a message
    that quotes text from outside (a file, a plugin, a library): every run of white space (line
    breaks included) becomes one space, any other unprintable character a space, and a longer
    text is cut and ends in "..."."""
    text = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
