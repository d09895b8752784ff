"""The record of release files this user had checked (ncbench.checked)."""

import json
import stat

import pytest

from ncbench import checked


@pytest.fixture(autouse=True)
def _own_record(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_a_file_is_checked_as_it_was_and_only_the_owner_reads_the_record(tmp_path):
    release = tmp_path / "release.h5"
    release.write_bytes(b"x" * 100)
    assert not checked.was_checked(release)
    checked.mark_checked(release)
    assert checked.was_checked(release)
    assert stat.S_IMODE(checked.record_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(checked.record_path().parent.stat().st_mode) == 0o700
    release.write_bytes(b"y" * 100)  # same size, other bytes
    assert not checked.was_checked(release)


def test_a_file_written_to_while_it_was_checked_is_not_recorded(tmp_path):
    release = tmp_path / "release.h5"
    release.write_bytes(b"x")
    seen = checked.identity(release)
    with open(release, "ab") as handle:
        handle.write(b"y")
    checked.mark_checked(release, seen)
    assert not checked.was_checked(release)


def test_a_record_that_cannot_be_read_means_nothing_was_checked(tmp_path):
    release = tmp_path / "release.h5"
    release.write_bytes(b"x")
    checked.mark_checked(release)
    too_long = json.dumps([checked.identity(release)]).encode() + b" " * checked.RECORD_MAX_BYTES
    for damaged in (b"{not json", b'{"a": 1}', b"[1, 2]", too_long):
        checked.record_path().write_bytes(damaged)
        assert not checked.was_checked(release)
    checked.mark_checked(release)  # and it is written afresh
    assert checked.was_checked(release)
