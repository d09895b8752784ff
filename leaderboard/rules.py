"""The board's rules as plain data: the daily limit, who the organizer's runs belong to, where
rows come from. No database and no arrays here, so the command line's help quotes them without
loading pandas or SQLAlchemy (``leaderboard.store`` re-exports each one)."""

DEFAULT_DAILY_LIMIT = 5  # scored submissions per team, challenge and UTC day
MAX_DAILY_LIMIT = 1_000_000  # any limit an organizer may set (the database holds 64-bit integers)
ORIGIN_ORGANIZER, ORIGIN_SELF = "organizer", "self-reported"
BUILTIN_TEAM = "ncbench-builtin"  # the organizer's own runs of the built-in attacks, and nobody else's
DB_ENV = "NCBENCH_DB"  # how `leaderboard serve` hands the database to the app (not argv: passwords)
