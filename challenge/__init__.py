"""Challenge releases: the NeuraCrypt encoder, building a release with a fresh secret key, the
release and key files, verification.

Owns ``encoders`` (the published architecture), ``release`` (build), ``files`` (read the
release, key and site-key formats), ``verify``, and the image sources (``sources``, ``images``,
``phantom``, ``sample``). May import the shared infrastructure in ``ncbench`` and
``data_manifest``; never attacks, baselines or the leaderboard.
"""
