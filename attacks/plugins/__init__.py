"""How plugins reach ncbench: found (built-ins, entry points, files, archives), checked and run.

``registry`` finds and loads attack classes, ``archive`` checks and unpacks wheel and sdist
plugins without running them, ``runner`` runs an attack on a release and checks a plugin's
declarations. Imports the attack interface and the challenge files, never the leaderboard.
"""

CHECK_MARK = "ncbench-check: "  # the line `attack check --json` ends with (the verified track's sandbox reads it)
