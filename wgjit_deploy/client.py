"""The client role (the Vagrant lab): an ordinary wg-quick client, nothing of wgjit's.

Its key is made on the client; the controller registers the public key with the
registry (admin token from the operator's environment) and writes the client's
config from the registry's record of the peer (its allowed IPs) and the public key
its gateway printed when it was deployed.
"""

from __future__ import annotations

import os
from io import StringIO
from pathlib import Path
from urllib.parse import quote

from pyinfra import host
from pyinfra.api import OperationError, deploy, operation
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from wgjit_deploy import packages, paths, secrets, tls
from wgjit_deploy.facts import WireGuardPublicKey
from wgjit_deploy.operations import machine_name, wireguard_private_key

TIMEOUT = 10


def registry_peer(url: str, token: str, tenant: str, public_key: str, allowed_ips: list[str],
                  name: str, ca_file: str) -> dict:
    """The registry's record of this peer, registering it first if it is new.

    From the controller, verifying the registry against the fleet CA (ca_file).
    """
    import requests

    auth = {"Authorization": f"Bearer {token}"}
    # verify on each call: REQUESTS_CA_BUNDLE would override a session's own.
    kw = {"headers": auth, "timeout": TIMEOUT, "verify": ca_file}
    with requests.Session() as s:
        r = s.get(f"{url}/v1/peers/{quote(public_key, safe='')}", **kw)
        if r.status_code == 404:
            t = s.post(f"{url}/v1/tenants", json={"name": tenant}, **kw)
            if t.status_code not in (200, 201, 409):
                raise OperationError(f"registry: create tenant {tenant}: HTTP {t.status_code}")
            r = s.post(f"{url}/v1/peers", **kw, json={
                "tenant": tenant, "public_key": public_key, "allowed_ips": allowed_ips,
                "name": name})
        if r.status_code not in (200, 201):
            raise OperationError(f"registry: peer {name}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()


def render(peer: dict, gateway_key: str, endpoint: str, gateway_ips: list[str]) -> str:
    return "\n".join([
        "# Written by the wgjit deploy from the registry's record of this peer.",
        "[Interface]",
        f"Address = {', '.join(peer['allowed_ips'])}",
        # The key stays in its own 0600 file; wg-quick takes none from here.
        f"PostUp = wg set %i private-key {paths.CLIENT_KEY}",
        "",
        "[Peer]",
        f"PublicKey = {gateway_key}",
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(gateway_ips)}",
        "PersistentKeepalive = 25",
        "",
    ])


@operation()
def client_config(path: str, registry_url: str, tenant: str, address: str, gateway: str,
                  endpoint: str, gateway_ips: list[str], pubkey_dir: str):
    """The client's wg-quick config, from the registry's record and its gateway's key.

    Both are known only once the deploy has run on the key's host and the gateway,
    so this is decided at execution time.
    """
    own = host.get_fact(WireGuardPublicKey, path=paths.CLIENT_KEY)
    gw_file = Path(pubkey_dir) / f"{gateway}.pub"
    if not own or not gw_file.is_file():
        if host.state.is_executing:
            raise OperationError(f"no public key for {host.name if not own else gateway} yet")
        return
    token = secrets.reveal(secrets.token("admin", host.data.get("admin_token_file")))
    peer = registry_peer(registry_url, token, tenant, own, [address], machine_name(host.name),
                         str(tls.fleet_ca().cert_file))
    conf = render(peer, gw_file.read_text().strip(), endpoint, gateway_ips)
    yield from files.put._inner(src=StringIO(conf), dest=path, user="root", group="root",
                                mode="600")


@deploy("wgjit client")
def client_role() -> None:
    data = host.data
    ifname = data.get("client_interface", "wgjit")
    apt.packages(name="Debian packages", packages=packages.for_roles("client"),
                 update=data.get("apt_update", True), cache_time=3600, no_recommends=True)
    files.directory(name="/etc/wireguard/", path="/etc/wireguard", user="root", group="root",
                    mode="700")
    key = wireguard_private_key(name=f"{paths.CLIENT_KEY} (made here, never copied)",
                                path=paths.CLIENT_KEY, user="root", group="root")
    conf = client_config(
        name=f"/etc/wireguard/{ifname}.conf", path=f"/etc/wireguard/{ifname}.conf",
        registry_url=tls.check_registry_url(data.get("registry_url"), host.name,
                                            bool(data.get("allow_insecure_http", False))),
        tenant=data.get("client_tenant", "lab"),
        address=data.get("wg_address")[0], gateway=data.get("gateway"),
        endpoint=data.get("gateway_endpoint"), gateway_ips=data.get("gateway_ips"),
        pubkey_dir=os.environ.get("WGJIT_PUBKEY_DIR") or data.get("pubkey_dir", "pubkeys"))
    unit = f"wg-quick@{ifname}.service"
    systemd.service(name=f"restart {unit}", service=unit, restarted=True,
                    _if=any_changed(key, conf))
    systemd.service(name=f"{unit} enabled and running", service=unit, running=True,
                    enabled=True)
