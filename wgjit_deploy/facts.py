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


class RegistryTokenIds(FactBase):
    """Ids of the active tokens in the registry database (none before it exists)."""

    def command(self, wgjit: str, db: str, user: str) -> str:
        w, d = shlex.quote(wgjit), shlex.quote(db)
        # As the service's user: sqlite may create its -wal/-shm files, which must
        # stay the service's.
        return (f"if [ -x {w} ] && [ -f {d} ]; then runuser -u {shlex.quote(user)} -- "
                f"{w} token list --db {d} --json; else echo '[]'; fi")

    def process(self, output: list[str]) -> list[str]:
        rows = json.loads("\n".join(output) or "[]")
        return [r["id"] for r in rows if not r.get("revoked_at")]
