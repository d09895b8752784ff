"""Attack plugins: the interface a plugin derives from, and the answer it returns.

A plugin file needs only::

    from ncbench.attacks import Attack, Release, Submission, param
"""

from ncbench.attacks.base import Attack, param
from ncbench.attacks.submission import Submission
from ncbench.challenge.files import Release

__all__ = ["Attack", "Release", "Submission", "param"]
