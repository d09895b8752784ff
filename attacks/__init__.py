"""Attack plugins: the interface a plugin derives from, and the answer it returns.

A plugin file needs only::

    from ncbench.attacks import Attack, Release, Submission, param

The room holds the interface (``base``, ``submission``), the built-in attacks (one file each),
their shared statistics (``alignment``, ``pairing``, ``statistics``, ``self_keyed``) and the
plugin machinery (``plugins/``). It may import challenge and the shared infrastructure; it never
imports the leaderboard: the scorer stays the organizer's.
"""

from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.submission import Submission
from ncbench.challenge.files import Release

__all__ = ["Attack", "Release", "Submission", "chunk_param", "param"]
