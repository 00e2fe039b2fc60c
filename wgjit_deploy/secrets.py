"""The operator's secrets for a deploy: the admin token and the database password,
never stored in git (each gateway's own token: gateway_tokens.py).

Each comes from the environment, as the token itself (WGJIT_ADMIN_TOKEN) or as a
file outside the checkout (WGJIT_ADMIN_TOKEN_FILE), or from host data naming such
a file. A token never reaches a command line (where `ps` would show it): it travels
only inside uploaded 0600 files, whose content pyinfra never prints. It is handed to
operations as pyinfra's HiddenValue, so any argument dump or debug log of pyinfra
shows *MASKED*; tests/vm/test_deploy.py checks the output.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyinfra.api import HiddenValue
from pyinfra.api.exceptions import DeployError

from appliance.secrets import SecretFileError, read_secret

TOKENS = {"admin": "WGJIT_ADMIN_TOKEN"}
# The registry's PostgreSQL role password (hosts in the `postgres` group).
DB_PASSWORD = "WGJIT_DB_PASSWORD"


def token(scope: str, data_file: str | None = None) -> HiddenValue:
    """The operator's `scope` token, masked; a DeployError says how to provide a missing one."""
    return HiddenValue(_token(scope, data_file))


def db_password(data_file: str | None = None) -> HiddenValue:
    """The operator's PostgreSQL password for the registry's role, masked."""
    if os.environ.get(DB_PASSWORD):
        return HiddenValue(os.environ[DB_PASSWORD].strip())
    path = os.environ.get(f"{DB_PASSWORD}_FILE") or data_file
    if not path:
        raise DeployError(f"no database password: set {DB_PASSWORD} or {DB_PASSWORD}_FILE "
                          "(a 0600 file outside git)")
    try:
        return HiddenValue(read_secret(Path(path).expanduser(), what="database password"))
    except SecretFileError as e:
        raise DeployError(str(e)) from e


def reveal(value: str | HiddenValue) -> str:
    return value.unmask() if isinstance(value, HiddenValue) else value


def _token(scope: str, data_file: str | None = None) -> str:
    var = TOKENS[scope]
    if os.environ.get(var):
        return os.environ[var].strip()
    path = os.environ.get(f"{var}_FILE") or data_file
    if not path:
        raise DeployError(
            f"no {scope} token: set {var} or {var}_FILE (a 0600 file outside git); "
            "`wgjit token generate --output FILE` makes one")
    try:
        return read_secret(Path(path).expanduser(), what=f"{scope} token")
    except SecretFileError as e:
        raise DeployError(str(e)) from e


def token_id(value: str | HiddenValue) -> str:
    """The public half of a token (`wgj_<id>_<secret>`), what `wgjit token list` shows."""
    parts = reveal(value).split("_", 2)
    if len(parts) != 3 or parts[0] != "wgj" or not parts[1]:
        raise DeployError("a token must look like wgj_<id>_<secret>")
    return parts[1]
