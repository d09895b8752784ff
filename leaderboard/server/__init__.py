"""The live challenge server: ``api`` (FastAPI routes), ``channel`` (publishing, teams and
tokens, uploads and scoring jobs), ``worker`` (the Dask dispatcher), ``connections`` (timeouts,
the connection cap and the request log of the HTTP server), ``service`` (the API, dispatcher
and board started and stopped together) and ``client`` (the attacker's commands,
which speak to ``api`` over HTTP).

The top of the leaderboard: may import the verified track, the board's launcher and the core.
Nothing below imports it.
"""
