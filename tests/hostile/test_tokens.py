"""Token checks cost one HMAC, not a password hash: a flood of guesses cannot burn the server's CPU,
and a client that keeps guessing is stopped before any verification."""

import hashlib
import hmac
import stat

import httpx
import sqlalchemy as sa
from support import token_for

from ncbench.leaderboard.store import Store, schema_version, team_tokens, teams


def test_a_token_is_stored_as_its_hmac_under_a_private_server_secret(published):
    token = token_for(published["store"], "alice")
    secret_file = published["store"] / "token-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    key = bytes.fromhex(secret_file.read_text().strip())
    row_id, secret = token.split("_", 2)[1:]
    with Store(published["store"] / "leaderboard.db", create=False) as store, store._read() as conn:
        stored = conn.execute(sa.select(team_tokens.c.token_hash).where(team_tokens.c.id == int(row_id))).scalar_one()
    assert stored == "hmac-sha256:" + hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


def test_argon2_tokens_of_an_older_store_are_revoked_by_the_migration(published):
    database = published["store"] / "leaderboard.db"
    with Store(database, create=False) as store, store._write() as conn:
        conn.execute(teams.insert().values(id=99, name="old-team", created_utc="2026-01-01T00:00:00.000000Z"))
        conn.execute(
            team_tokens.insert().values(
                id=99, team_id=99, token_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", created_utc="x"
            )
        )
        conn.execute(schema_version.delete().where(schema_version.c.version >= 8))  # as before the migration
    with Store(database, create=False) as store, store._read() as conn:
        revoked = conn.execute(sa.select(team_tokens.c.revoked_utc).where(team_tokens.c.id == 99)).scalar_one()
    assert revoked is not None


def test_a_client_that_keeps_guessing_gets_429_before_any_verification(served):
    url = f"{served['url']}/api/v1/whoami"
    guesses = [httpx.get(url, headers={"Authorization": f"Bearer ncb_1_guess{k}"}).status_code for k in range(25)]
    assert guesses[:20] == [401] * 20 and set(guesses[20:]) == {429}
    # Even the right token waits out the minute: nothing is verified for this client meanwhile.
    assert httpx.get(url, headers={"Authorization": f"Bearer {served['token']}"}).status_code == 429
