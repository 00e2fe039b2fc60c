"""The postgres role: Debian's PostgreSQL holding the registry's database.

Hosts in the `postgres` group get the server, a login role and a database for the
registry (names in group_data/postgres.py). Registry hosts whose data sets
`registry_db = "postgresql://ROLE@HOST:PORT/DB"` use it; a registry host without it
keeps its SQLite file. The role's password is the operator's (WGJIT_DB_PASSWORD or
WGJIT_DB_PASSWORD_FILE), masked in pyinfra's output and carried only in 0600 files.

Registry servers on other hosts reach it once `postgres_listen` names an address of
this host and `postgres_clients` their networks (scram-sha-256 logins only).
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, systemd

from wgjit_deploy import packages, paths, secrets
from wgjit_deploy.operations import postgres_login, secret_file

SETUP_SQL = "/etc/postgresql/wgjit-setup.sql"
PASSWORD_FILE = "/etc/postgresql/wgjit.password"


@deploy("wgjit postgres")
def postgres_role() -> None:
    data = host.data
    apt.packages(name="PostgreSQL", packages=packages.POSTGRES,
                 update=data.get("apt_update", True), cache_time=3600, no_recommends=True)
    conf_dir = f"/etc/postgresql/{data.postgres_version}/main"
    listen = files.put(
        name="PostgreSQL listen addresses", src=_listen_conf(data.postgres_listen),
        dest=f"{conf_dir}/conf.d/wgjit.conf", user="postgres", group="postgres", mode="644")
    hba = [files.line(name=f"pg_hba: {net} may log in as {data.postgres_role}",
                      path=f"{conf_dir}/pg_hba.conf",
                      line=f"host {data.postgres_database} {data.postgres_role} {net} "
                           "scram-sha-256")
           for net in data.postgres_clients]
    systemd.service(name="postgresql enabled and running", service="postgresql.service",
                    running=True, enabled=True)
    systemd.service(name="restart postgresql", service="postgresql.service", restarted=True,
                    _if=listen.did_change)
    if hba:
        systemd.service(name="reload postgresql", service="postgresql.service", reloaded=True,
                        _if=lambda: any(op.did_change() for op in hba))
    files.put(name=SETUP_SQL, src=str(paths.FILES / "postgres-setup.sql"), dest=SETUP_SQL,
              user="root", group="root", mode="644")
    secret_file(name=f"{PASSWORD_FILE} (the registry role's password)", path=PASSWORD_FILE,
                value=secrets.db_password(data.get("db_password_file")), user="postgres",
                group="postgres")
    postgres_login(name=f"role {data.postgres_role} and database {data.postgres_database}",
                   role=data.postgres_role, database=data.postgres_database,
                   password_file=PASSWORD_FILE, script=SETUP_SQL)


def _listen_conf(addresses: str) -> StringIO:
    return StringIO("# Written by the wgjit deploy (deploy.py); local edits are overwritten.\n"
                    f"listen_addresses = '{addresses}'\n")
