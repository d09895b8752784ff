"""ncbench: challenge releases, attacks, scoring and a public leaderboard for NeuraCrypt encodings.

The domain packages live in the repository's root folders and install as ``ncbench.challenge``,
``ncbench.attacks``, ``ncbench.baselines``, ``ncbench.leaderboard`` and ``ncbench.data_manifest``.
"""

import importlib.metadata

# The one version string lives in pyproject.toml.
__version__ = importlib.metadata.version("neuracrypt-bench")
