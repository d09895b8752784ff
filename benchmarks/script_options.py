"""The command line every benchmark script takes: ``--name=value`` options, and ``--help``."""

from __future__ import annotations

import sys


def script_options(argv: list[str], usage: str) -> dict[str, str]:
    """``{name: value}`` of the ``--name=value`` arguments in ``argv``; with ``-h`` or
    ``--help`` anywhere, print ``usage`` (the script's docstring) and exit 0."""
    if {"-h", "--help"} & set(argv):
        print(usage)
        sys.exit(0)
    return {a.split("=")[0].lstrip("-"): a.partition("=")[2] for a in argv if a.startswith("--")}


def int_list(text: str) -> list[int]:
    """Comma-separated integers; anything else is a one-line error (exit 2), not a traceback."""
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        print(f"error: expected whole numbers separated by commas, got {text!r}", file=sys.stderr)
        raise SystemExit(2) from None
