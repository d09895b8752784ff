"""The leaderboard: the results core, and the three services built on it.

The core, in this folder: ``store`` (the results database, SQLite or PostgreSQL), ``scoring``
(a submission against its key), ``metrics`` (pure functions on arrays), ``tables`` (what the
board and exports show), ``workqueue`` (the durable job queue). On top of it: ``verified/``
(plugins run sandboxed on fresh hidden releases), ``board/`` (the Streamlit app) and
``server/`` (the HTTP API, its job channel and workers, the attacker's client).

Layers, kept by import-linter (pyproject.toml): server > board > verified > core; the board never
imports the server. The leaderboard may import challenge, attacks and baselines; they never
import it.
"""
