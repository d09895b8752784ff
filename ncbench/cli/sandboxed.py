"""The command a verified-track sandbox runs: ``python -P -m ncbench.cli.sandboxed ARGV`` is
``ncbench attack ARGV`` with the root command's rule (a user mistake is one ``error:`` line and
exit status 2), importing only the attack tools: every run starts a fresh interpreter, and the
other command groups would cost it a second more."""

from __future__ import annotations

import sys

import click

from ncbench.cli.attack import group
from ncbench.errors import NcbenchError


def _entry(argv: list[str]) -> int:
    try:
        group.main(argv, prog_name="ncbench attack", standalone_mode=False)
    except (NcbenchError, click.ClickException) as error:
        message = error.format_message() if isinstance(error, click.ClickException) else str(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
