"""The one error type for user mistakes; the CLI turns it into a one-line message and exit code 2."""


class NcbenchError(Exception):
    """A mistake the user can fix (bad path, wrong file, malformed input): shown as one line."""
