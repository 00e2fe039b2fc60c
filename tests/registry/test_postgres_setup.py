"""The deploy's PostgreSQL setup script against a real server: role, password, database.

wgjit_deploy/postgres.py runs wgjit_deploy/files/postgres-setup.sql as the postgres
superuser on a fleet's database host; here it runs the same way against the
session's test server.
"""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from appliance.secrets import write_secret
from lab.postgres import USER
from wgjit_deploy import paths
from wgjit_deploy.facts import PostgresLogin

SCRIPT = paths.FILES / "postgres-setup.sql"


def setup(pg, role: str, db: str, pwfile) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": pg.password}
    with SCRIPT.open() as script:
        return subprocess.run(
            ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER,
             "-d", "postgres", "-v", f"role={role}", "-v", f"db={db}", "-v",
             f"pwfile={pwfile}"], stdin=script, capture_output=True, text=True, env=env,
            timeout=60)


def can_log_in(pg, role: str, db: str, password: str) -> bool:
    try:
        with psycopg.connect(host="127.0.0.1", port=pg.port, user=role, dbname=db,
                             password=password, connect_timeout=10) as conn:
            return conn.execute("SELECT current_user").fetchone()[0] == role
    except psycopg.OperationalError:
        return False


def test_setup_makes_role_and_database_and_is_idempotent(pg_server, tmp_path):
    pwfile = write_secret(tmp_path / "pw", "first-secret")
    first = setup(pg_server, "reg_a", "regdb_a", pwfile)
    assert first.returncode == 0, first.stderr
    assert can_log_in(pg_server, "reg_a", "regdb_a", "first-secret")
    assert not can_log_in(pg_server, "reg_a", "regdb_a", "wrong")
    # Again: nothing breaks, and the database's owner can create the registry's tables.
    again = setup(pg_server, "reg_a", "regdb_a", pwfile)
    assert again.returncode == 0, again.stderr
    with psycopg.connect(host="127.0.0.1", port=pg_server.port, user="reg_a",
                         dbname="regdb_a", password="first-secret") as conn:
        conn.execute("CREATE TABLE probe (x int)")
    # A new password from the operator replaces the old one.
    write_secret(pwfile, "second-secret")
    assert setup(pg_server, "reg_a", "regdb_a", pwfile).returncode == 0
    assert can_log_in(pg_server, "reg_a", "regdb_a", "second-secret")
    assert not can_log_in(pg_server, "reg_a", "regdb_a", "first-secret")


@pytest.mark.parametrize("output, ok", [(["1"], True), ([], False), (["0"], False)])
def test_login_fact_reads_psql_output(output, ok):
    assert PostgresLogin().process(output) is ok
    cmd = PostgresLogin().command("wgjit", "wgjit", "/etc/postgresql/wgjit.password")
    assert "PGPASSWORD=\"$(cat /etc/postgresql/wgjit.password)\"" in cmd
