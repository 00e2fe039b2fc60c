"""Secrets in 0600 files: written atomically, never through a planted link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from appliance.secrets import SecretFileError, read_secret, write_secret


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_written_0600_and_read_back(tmp_path):
    p = write_secret(tmp_path / "sub" / "gateway.token", "s3cret\n")
    assert _mode(p) == 0o600
    assert read_secret(p) == "s3cret"
    assert [f.name for f in p.parent.iterdir()] == ["gateway.token"]  # no temporary left


def test_a_symlink_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    victim.chmod(0o644)
    # The name the temporary file used to have: predictable from the pid.
    (tmp_path / f".gateway.token.tmp{os.getpid()}").symlink_to(victim)
    p = write_secret(tmp_path / "gateway.token", "s3cret")
    assert victim.read_text() == "untouched\n" and _mode(victim) == 0o644
    assert not p.is_symlink() and _mode(p) == 0o600 and read_secret(p) == "s3cret"


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (tmp_path / "admin.token").symlink_to(victim)
    p = write_secret(tmp_path / "admin.token", "s3cret")
    assert victim.read_text() == "untouched\n"
    assert not p.is_symlink() and read_secret(p) == "s3cret"


def test_readable_by_others_is_refused_with_the_fix(tmp_path):
    p = tmp_path / "t"
    p.write_text("x\n")
    p.chmod(0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret(p)


def test_the_cli_creates_the_registry_database_for_its_owner_only(tmp_path):
    # Preshared keys live in the database, its WAL and its SHM: 0600 whatever the
    # caller's umask (here the common 022).
    db = tmp_path / "registry.db"
    subprocess.run([sys.executable, "-m", "appliance", "token", "create", "--db", str(db),
                    "--scope", "admin", "--output", str(tmp_path / "admin.token")],
                   check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022))
    made = [p for p in tmp_path.iterdir() if p.name.startswith("registry.db")]
    assert db in made
    for p in made:
        assert _mode(p) == 0o600, (p.name, oct(_mode(p)))
