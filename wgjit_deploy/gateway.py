"""The gateway role: a kernel WireGuard interface and `wgjit gateway run` under systemd.

Order matters for "a failed step leaves the old version running": the new gateway
token is checked against the registry before it replaces the live one, and nothing
is restarted until every file is in place. The token is this gateway's own
(wgjit_deploy/gateway_tokens.py), which the registry role made known.
"""

from __future__ import annotations

import json
import os
import shlex

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from appliance.gateway.settings import default
from wgjit_deploy import paths, tls
from wgjit_deploy.gateway_tokens import gateway_token
from wgjit_deploy.operations import (
    machine_name,
    public_key,
    secret_file,
    wait_healthy,
    wireguard_private_key,
)

WG_UNIT = "wgjit-wireguard.service"
UNIT = "wgjit-gateway.service"


# Daemon options an inventory may set per host or group, under the option's own
# key (group_data/gateways.py). Re-injection needs no sysctl for install_mode: the
# packet is looped back locally and never meets rp_filter.
TUNABLES = ("idle_timeout", "evict_interval", "handshake_grace", "max_peers", "feed_interval",
            "reconcile_interval", "install_mode", "rate", "burst", "positive_ttl",
            "negative_ttl", "stale_ttl", "workers", "lookup_batch", "cookies", "key_filter")


def tunables(data) -> list[tuple[str, str]]:
    """(key, TOML value) of each tunable the inventory sets, in TUNABLES' order."""
    return [(key, json.dumps(data.get(key))) for key in TUNABLES
            if data.get(key) is not None]


@deploy("wgjit gateway")
def gateway_role(release: str) -> None:
    user = paths.GATEWAY_USER
    data = host.data
    insecure = bool(data.get("allow_insecure_http", False))
    registry_url = tls.check_registry_url(data.get("registry_url"), host.name, insecure)
    ifname = data.wg_interface
    metrics = data.get("metrics_listen") or default("metrics-listen")
    listen_port = data.get("wg_listen_port") or default("listen-port")
    server.user(name=f"system user {user}", user=user, system=True,
                home=paths.GATEWAY_STATE, shell="/usr/sbin/nologin", create_home=False)
    token = secret_file(
        name=f"{paths.GATEWAY_TOKEN} (checked against the registry first)",
        path=paths.GATEWAY_TOKEN,
        value=gateway_token(host.name), user=user, group=user,
        verify=f"{paths.LIBEXEC}/check-registry-token {shlex.quote(registry_url)} {{path}} "
               f"{paths.CA_CERT}")
    key = wireguard_private_key(name=f"{paths.GATEWAY_KEY} (made here, never copied)",
                                path=paths.GATEWAY_KEY, user="root", group="root")
    public_key(name="gateway public key", private_key=paths.GATEWAY_KEY,
               host_name=machine_name(host.name),
               local_dir=os.environ.get("WGJIT_PUBKEY_DIR") or data.get("pubkey_dir"))
    conf = files.template(
        name=paths.GATEWAY_CONFIG, src=str(paths.TEMPLATES / "gateway.toml.j2"),
        dest=paths.GATEWAY_CONFIG, user="root", group="root", mode="644",
        ifname=ifname, registry_url=registry_url, registry_ca=paths.CA_CERT,
        allow_insecure_http=insecure, token_file=paths.GATEWAY_TOKEN,
        state_dir=paths.GATEWAY_STATE, backend=data.wg_backend, listen_port=listen_port,
        metrics_listen=metrics, capture_interfaces=data.get("capture_interfaces", []),
        # Only what the inventory sets; the rest is the daemon's own default
        # (appliance/gateway/settings.py), written nowhere else.
        tunables=tunables(data))
    wg_unit = files.template(
        name=f"{paths.SYSTEMD_DIR}/{WG_UNIT}", src=str(paths.TEMPLATES / f"{WG_UNIT}.j2"),
        dest=f"{paths.SYSTEMD_DIR}/{WG_UNIT}", user="root", group="root", mode="644",
        ifname=ifname, listen_port=listen_port,
        private_key=paths.GATEWAY_KEY, addresses=data.get("wg_address", []))
    unit = files.template(
        name=f"{paths.SYSTEMD_DIR}/{UNIT}", src=str(paths.TEMPLATES / f"{UNIT}.j2"),
        dest=f"{paths.SYSTEMD_DIR}/{UNIT}", user="root", group="root", mode="644",
        service_user=user, release=release, config=paths.GATEWAY_CONFIG,
        state_dir_name=paths.GATEWAY_STATE.rsplit("/", 1)[1],
        memory_max=data.gateway_memory_max)
    systemd.daemon_reload(name="systemd daemon-reload", _if=any_changed(wg_unit, unit))
    # A new interface drops every installed peer; the gateway puts back, just in
    # time, those that are still talking.
    systemd.service(name=f"restart {WG_UNIT}", service=WG_UNIT, restarted=True,
                    _if=any_changed(wg_unit, key))
    systemd.service(name=f"{WG_UNIT} enabled and running", service=WG_UNIT, running=True,
                    enabled=True)
    changed = any_changed(wg_unit, unit, conf, token, key)
    systemd.service(name=f"restart {UNIT}", service=UNIT, restarted=True, _if=changed)
    systemd.service(name=f"{UNIT} enabled and running", service=UNIT, running=True,
                    enabled=True)
    wait_healthy(name="gateway healthy", url=f"http://{metrics}/healthz", _if=changed)
