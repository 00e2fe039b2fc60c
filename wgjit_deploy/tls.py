"""The fleet's CA, on the controller: the registry's certificate, the CA for everyone else.

The CA lives in the operator's directory WGJIT_CA_DIR (default ~/.config/wgjit/ca):
`ca.key` (0600, in a 0700 directory) never leaves it; `ca.pem` goes to every
host, and the operator's own `wgjit peer ... --registry-ca` uses it too. The
registry's certificate and key are kept there as well (`issued/<host>.*`), so a
second deploy uploads the same files and restarts nothing; a new certificate is
issued only when the registry's names change or it nears its end.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from pathlib import Path

from pyinfra.api.exceptions import DeployError

from appliance.secrets import SecretFileError
from appliance.tlsca import CertificateAuthority
from appliance.transport import check_urls

CA_DIR_ENV = "WGJIT_CA_DIR"
DEFAULT_CA_DIR = "~/.config/wgjit/ca"


def ca_dir() -> Path:
    return Path(os.environ.get(CA_DIR_ENV) or DEFAULT_CA_DIR).expanduser()


@functools.cache
def fleet_ca() -> CertificateAuthority:
    """The fleet's CA, made on the first deploy."""
    try:
        return CertificateAuthority(ca_dir(), name="wgjit fleet CA")
    except SecretFileError as e:
        raise DeployError(f"fleet CA ({CA_DIR_ENV}): {e}") from e


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of a registry URL; the port defaults to the scheme's."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def registry_names(url: str, host_name: str, data: dict) -> list[str]:
    """What the registry's certificate is for: the name or address in registry_url
    (what gateways dial), the inventory name and SSH address, and any extra
    `registry_tls_names`. The role adds the address it listens on."""
    names = [split_url(url)[0], host_name, data.get("ssh_hostname") or "",
             *(data.get("registry_tls_names") or [])]
    return [n.strip("[]") for n in dict.fromkeys(names) if n]


def registry_certificate(host_name: str, names: list[str]) -> tuple[str, str]:
    """(certificate PEM, key PEM) for the registry host, issued once and kept."""
    issued = ca_dir() / "issued"
    cert, key = issued / f"{host_name}.pem", issued / f"{host_name}.key"
    fleet_ca().server_files(cert, key, names)
    return cert.read_text(), key.read_text()


def check_registry_url(url: str | None, host_name: str, allow_insecure_http: bool) -> str:
    """The registry URL a gateway or client is given, refused before anything changes
    if it is missing or plain HTTP across a network (the gateway would refuse it anyway)."""
    if not url:
        raise DeployError(f"{host_name}: host data registry_url is not set (inventory)")
    try:
        check_urls([url], allow_insecure_http, key=f"{host_name}: registry_url")
    except ValueError as e:
        raise DeployError(str(e)) from e
    return url
