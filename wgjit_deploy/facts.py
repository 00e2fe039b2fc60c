"""Facts the deploy's own operations decide by (pyinfra runs them on the target)."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase


class WireGuardPublicKey(FactBase):
    """The public key of the WireGuard private key in `path`, or None if there is none."""

    requires_command = "wg"

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"if [ -s {p} ]; then wg pubkey < {p}; fi"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


class RegistryTokens(FactBase):
    """The active tokens in the registry database by id, each with its `name` and
    `pool` (none before the database exists)."""

    def command(self, wgjit: str, db: str, user: str, password_file: str | None = None) -> str:
        w, d = shlex.quote(wgjit), shlex.quote(db)
        if password_file:
            # PostgreSQL: a database not created yet holds no token either.
            return (f"if [ -x {w} ]; then runuser -u {shlex.quote(user)} -- {w} token list "
                    f"--db {d} --db-password-file {shlex.quote(password_file)} --json "
                    f"2>/dev/null || echo '[]'; else echo '[]'; fi")
        # As the service's user: sqlite may create its -wal/-shm files, which must
        # stay the service's.
        # A database of an older schema (before this release migrates it) lists
        # nothing: the import that follows migrates it and finds what is there.
        return (f"if [ -x {w} ] && [ -f {d} ]; then runuser -u {shlex.quote(user)} -- "
                f"{w} token list --db {d} --json 2>/dev/null || echo '[]'; else echo '[]'; fi")

    def process(self, output: list[str]) -> dict[str, dict]:
        rows = json.loads("\n".join(output) or "[]")
        return {r["id"]: {"name": r.get("name"), "pool": sorted(r.get("pool") or [])}
                for r in rows if not r.get("revoked_at")}


class PostgresLogin(FactBase):
    """Whether `role` logs into `database` over loopback TCP with the password in `path`.

    What the registry will do: when it works, the role, its password and the
    database are all as the deploy wants them.
    """

    requires_command = "psql"

    def command(self, role: str, database: str, path: str) -> str:
        return (f"if [ -s {shlex.quote(path)} ]; then PGPASSWORD=\"$(cat {shlex.quote(path)})\" "
                f"psql -X -h 127.0.0.1 -U {shlex.quote(role)} -d {shlex.quote(database)} "
                f"-tAc 'SELECT 1' 2>/dev/null || true; fi")

    def process(self, output: list[str]) -> bool:
        return [line.strip() for line in output] == ["1"]
