"""The wgjit fleet deploy: `pyinfra INVENTORY deploy.py` (see README, "Deploy").

A host's roles come from its inventory groups: `postgres`, `registry`, `gateways`,
`clients`.
Secrets come from the operator's environment (WGJIT_ADMIN_TOKEN[_FILE],
WGJIT_DB_PASSWORD[_FILE] for the postgres group), never from git. Each gateway gets
its own token, made on the first deploy and kept in WGJIT_GATEWAY_TOKEN_DIR
(wgjit_deploy/gateway_tokens.py).
"""

from pyinfra import host

from wgjit_deploy import paths
from wgjit_deploy.appliance import install_appliance, release_path
from wgjit_deploy.client import client_role
from wgjit_deploy.gateway import gateway_role
from wgjit_deploy.operations import barrier, prune_releases
from wgjit_deploy.postgres import postgres_role
from wgjit_deploy.registry import registry_role

roles = [role for role, group in (("postgres", "postgres"), ("registry", "registry"),
                                  ("gateway", "gateways"), ("client", "clients"))
         if group in host.groups]
if "postgres" in roles:
    postgres_role()
# Registries migrate their database at once: it must exist first.
barrier(name="postgres ready")
if {"registry", "gateway"} & set(roles):
    install_appliance([r for r in roles if r != "postgres"])
if "registry" in roles:
    registry_role(release_path())
# Gateways check their token against a registry that must be up and know it.
barrier(name="registry ready")
if "gateway" in roles:
    gateway_role(release_path())
# Clients need their gateway's public key, printed when the gateway was deployed.
barrier(name="gateways ready")
if "client" in roles:
    client_role()
if {"registry", "gateway"} & set(roles):
    # Last: every service of this host now runs the new release.
    prune_releases(name="older releases removed", releases=paths.RELEASES,
                   keep=release_path())
