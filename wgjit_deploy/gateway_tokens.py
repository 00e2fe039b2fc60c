"""One registry token per gateway: made on the controller, kept there, known to the registry.

Each gateway host gets its own gateway-scope token, named after the host and
limited to the tenants in its host data `gateway_tenants` (its pool; empty: every
tenant), so that one gateway can be cut off (`wgjit token revoke ID` on the
registry host) without touching the others.

The controller keeps each token in WGJIT_GATEWAY_TOKEN_DIR (default
~/.config/wgjit/gateway-tokens, 0700) as `<host>.token` (0600), made on the first
deploy that names the host: the registry role imports its hash, the gateway role
uploads it into the gateway's 0600 token file, and a second deploy finds the same
token and changes nothing. A token travels only inside files and as pyinfra's
HiddenValue, never on a command line or in pyinfra's output. To give a gateway a
new token (after a revocation), remove its file and deploy the registry and that
gateway.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyinfra.api import HiddenValue
from pyinfra.api.exceptions import DeployError

from appliance.registry import tokens
from appliance.secrets import SecretFileError, read_secret, write_secret
from wgjit_deploy.operations import machine_name
from wgjit_deploy.secrets import token_id

TOKEN_DIR_ENV = "WGJIT_GATEWAY_TOKEN_DIR"
DEFAULT_TOKEN_DIR = "~/.config/wgjit/gateway-tokens"


def token_dir() -> Path:
    return Path(os.environ.get(TOKEN_DIR_ENV) or DEFAULT_TOKEN_DIR).expanduser()


def token_file(host_name: str) -> Path:
    return token_dir() / f"{machine_name(host_name)}.token"


def gateway_token(host_name: str) -> HiddenValue:
    """This gateway's own token, masked; made and kept on the first call for the host."""
    path = token_file(host_name)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The directory is created 0700; one made by hand must be as private.
        if path.parent.stat().st_mode & 0o077:
            raise DeployError(f"{TOKEN_DIR_ENV} {path.parent}: others can open it;"
                              f" chmod 700 {path.parent}")
        write_secret(path, tokens.generate())
    try:
        value = read_secret(path, what=f"gateway token of {machine_name(host_name)}")
    except SecretFileError as e:
        raise DeployError(str(e)) from e
    token_id(value)  # a DeployError for a file that holds no token
    return HiddenValue(value)


def gateway_pool(data) -> list[str]:
    """The tenants a gateway's token is limited to (host data gateway_tenants), sorted."""
    pool = data.get("gateway_tenants") or []
    if isinstance(pool, str) or not all(isinstance(t, str) and t for t in pool):
        raise DeployError("host data gateway_tenants: a list of tenant names")
    return sorted(set(pool))
