"""ncbench: challenge releases, attacks, scoring and a public leaderboard for NeuraCrypt encodings.

The domain packages live in the repository's root folders and install as ``ncbench.challenge``,
``ncbench.attacks``, ``ncbench.baselines``, ``ncbench.leaderboard`` and ``ncbench.data_manifest``.
This folder holds only what every room shares (``errors``, ``h5io``, ``progress``, ``hardware``,
``names``, ``assignment``, ``canonical``), which imports no room, and the command line
(``cli/``), which may import every room. See docs/architecture.md.
"""

import importlib.metadata
import os

# Before any module imports h5py: ncbench writes every HDF5 file atomically (a temporary sibling
# renamed into place), so it never relies on HDF5's own file locks, and those locks misfire in the
# challenge server, whose threads fork sandboxes: a child holds copies of the parent's descriptors
# until it execs, and a flock held through such a copy made a concurrent open in another thread
# fail with EAGAIN (seen once in the verified-track tests). A user's own setting wins.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

# The one version string lives in pyproject.toml.
__version__ = importlib.metadata.version("neuracrypt-bench")
