"""Where things live on a target host: one place, so units, configs and checks agree."""

from __future__ import annotations

from pathlib import Path

PREFIX = "/opt/wgjit"
RELEASES = f"{PREFIX}/releases"
LIBEXEC = f"{PREFIX}/libexec"
WHEELS_ARCHIVE = f"{PREFIX}/wheels.tar"
CONFIG_DIR = "/etc/wgjit"
SYSTEMD_DIR = "/etc/systemd/system"
# The fleet CA's certificate, on every host: what clients verify the registry against.
CA_CERT = f"{CONFIG_DIR}/ca.pem"

REGISTRY_USER = "wgjit-registry"
REGISTRY_STATE = "/var/lib/wgjit-registry"
REGISTRY_CONFIG = f"{CONFIG_DIR}/registry.toml"
REGISTRY_DB = f"{REGISTRY_STATE}/registry.db"
REGISTRY_DB_PASSWORD = f"{CONFIG_DIR}/registry-db.password"
REGISTRY_CERT = f"{CONFIG_DIR}/registry.pem"
REGISTRY_KEY = f"{CONFIG_DIR}/registry.key"

GATEWAY_USER = "wgjit-gateway"
GATEWAY_STATE = "/var/lib/wgjit-gateway"
GATEWAY_CONFIG = f"{CONFIG_DIR}/gateway.toml"
GATEWAY_TOKEN = f"{CONFIG_DIR}/gateway.token"
GATEWAY_KEY = f"{CONFIG_DIR}/gateway.key"

CLIENT_KEY = "/etc/wireguard/wgjit.key"

# On the controller: the deploy's own files.
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
FILES = HERE / "files"


def release(key: str) -> str:
    return f"{RELEASES}/{key}"
