"""A local user of the server's machine reads no secret: keys, the database, the uploads are 0600
in 0700 folders whatever the umask, and the server refuses to start on a store that exposes them."""

import stat

from support import Server, free_port, ncbench


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_build_writes_the_key_0600_in_a_0700_folder_under_umask_000(release):
    assert mode(release / "private") == 0o700
    assert mode(release / "private" / "key.h5") == 0o600


def test_publish_keeps_the_key_and_the_database_private_under_umask_000(published):
    store = published["store"]
    assert mode(store) == 0o700
    assert mode(store / "keys") == 0o700
    assert mode(store / "keys" / published["id"]) == 0o700
    assert mode(store / "keys" / published["id"] / "key.h5") == 0o600
    for database in store.glob("leaderboard.db*"):
        assert mode(database) == 0o600, database.name


def test_site_key_export_is_0600_under_umask_000(release, tmp_path):
    out = tmp_path / "site0.h5"
    exported = ncbench("challenge", "site-key", release / "private" / "key.h5", "--site", 0, "--out", out, umask=0)
    assert exported.returncode == 0, exported.stderr
    assert mode(out) == 0o600


def test_server_refuses_a_store_whose_database_others_can_read(published):
    database = published["store"] / "leaderboard.db"
    database.chmod(0o644)
    refused = ncbench("server", "--store", published["store"], "--port", free_port(), "--board-port", 0, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "leaderboard.db" in refused.stderr and f"chmod -R go= {published['store']}" in refused.stderr


def test_server_refuses_a_store_whose_key_folder_others_can_enter(published):
    (published["store"] / "keys" / published["id"]).chmod(0o755)
    refused = ncbench("server", "--store", published["store"], "--port", free_port(), "--board-port", 0, timeout=60)
    assert refused.returncode == 2 and "refusing to start" in refused.stderr


def test_server_starts_beside_the_verified_tracks_evaluation_folders(published):
    """keys/verified/run-N/ is made by an ordinary mkdir (0755) inside keys/ (0700): no refusal."""
    (published["store"] / "keys" / "verified" / "run-1").mkdir(parents=True, mode=0o755)
    server = Server(published["store"], "--board-port", "0")
    assert server.stop() == 0
