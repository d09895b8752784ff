"""Attack plugins: the interface a plugin derives from, and the answer it returns.

A plugin file needs only::

    from ncbench.attacks import Attack, Release, Submission, param

The room holds the interface (``base``, ``submission``), the built-in attacks (one file each),
their shared statistics (``alignment``, ``pairing``, ``statistics``, ``self_keyed``) and the
plugin machinery (``plugins/``). It may import challenge and the shared infrastructure; it never
imports the leaderboard: the scorer stays the organizer's.
"""

import importlib

# Loaded on first use (PEP 562): importing a module of this package, such as the plugin archive
# checks, must not load torch through the interface.
_EXPORTS = {
    "Attack": "ncbench.attacks.base",
    "param": "ncbench.attacks.base",
    "chunk_param": "ncbench.attacks.base",
    "Submission": "ncbench.attacks.submission",
    "Release": "ncbench.challenge.files",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ncbench.attacks' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
