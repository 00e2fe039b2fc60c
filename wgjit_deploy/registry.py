"""The registry role: `wgjit registry serve` (gunicorn) under systemd, as its own user.

It serves HTTPS with a certificate from the fleet CA (wgjit_deploy/tls.py), on
the address gateways reach it at (the host and port of `registry_url`, its
management address) unless `registry_listen` says otherwise: never on every
interface by accident.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host, inventory
from pyinfra.api import HiddenValue, deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from wgjit_deploy import paths, secrets, tls
from wgjit_deploy.gateway_tokens import gateway_pool, gateway_token
from wgjit_deploy.operations import machine_name, registry_token, secret_file, wait_healthy

UNIT = "wgjit-registry.service"
WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def listen_address(data, host_name: str) -> str:
    """registry_listen, or the host and port of registry_url (its management address)."""
    if data.get("registry_listen"):
        return data.get("registry_listen")
    url = tls.check_registry_url(data.get("registry_url"), host_name,
                                 data.get("allow_insecure_http", False))
    addr, port = tls.split_url(url)
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _local_host(listen: str) -> str:
    """Where the deploy checks the registry from on its own host."""
    host_part = listen.rpartition(":")[0]
    return "127.0.0.1" if host_part in WILDCARDS else host_part


@deploy("wgjit registry")
def registry_role(release: str) -> None:
    user = paths.REGISTRY_USER
    listen = listen_address(host.data, host.name)
    local = _local_host(listen)
    cert_pem, key_pem = tls.registry_certificate(host.name, [
        *tls.registry_names(host.data.get("registry_url") or "", host.name, host.data),
        local])
    server.user(name=f"system user {user}", user=user, system=True,
                home=paths.REGISTRY_STATE, shell="/usr/sbin/nologin", create_home=False)
    files.directory(name=f"{paths.REGISTRY_STATE}/", path=paths.REGISTRY_STATE, user=user,
                    group=user, mode="750")
    # The key is made on the controller by its CA and kept there (so a second
    # deploy changes nothing); here only the service's user can read it.
    cert = files.put(name=f"{paths.REGISTRY_CERT} (from the fleet CA)", src=StringIO(cert_pem),
                     dest=paths.REGISTRY_CERT, user="root", group="root", mode="644")
    key = secret_file(name=f"{paths.REGISTRY_KEY} (0600, the registry's)",
                      path=paths.REGISTRY_KEY, value=HiddenValue(key_pem), user=user,
                      group=user)
    # A PostgreSQL URL (hosts of the postgres group serve one), else the SQLite file.
    db = host.data.get("registry_db") or paths.REGISTRY_DB
    password_file = paths.REGISTRY_DB_PASSWORD if db.startswith("postgresql:") else None
    if password_file:
        secret_file(name=f"{password_file} (the database password)", path=password_file,
                    value=secrets.db_password(host.data.get("db_password_file")), user=user,
                    group=user)
    conf = files.template(
        name=paths.REGISTRY_CONFIG, src=str(paths.TEMPLATES / "registry.toml.j2"),
        dest=paths.REGISTRY_CONFIG, user="root", group="root", mode="644",
        db=db, db_password_file=password_file, listen=listen, tls_cert=paths.REGISTRY_CERT,
        tls_key=paths.REGISTRY_KEY,
        # Unset: `registry serve`'s own defaults (appliance/registry/cli.py).
        workers=host.data.get("registry_workers"), threads=host.data.get("registry_threads"))
    wgjit = f"{release}/bin/wgjit"
    # The operator's admin token, and each gateway's own token (named after it,
    # limited to its pool): every gateway of the inventory, deployed in this run or not.
    registry_token(name="admin token known to the registry", wgjit=wgjit, db=db,
                   password_file=password_file, user=user, scope="admin",
                   token=secrets.token("admin", host.data.get("admin_token_file")),
                   token_name="deploy-admin")
    for gw in inventory.get_group("gateways", []):
        gw_name = machine_name(gw.name)
        registry_token(name=f"gateway token of {gw_name} known to the registry", wgjit=wgjit,
                       db=db, password_file=password_file, user=user, scope="gateway",
                       token=gateway_token(gw.name), token_name=gw_name,
                       pool=gateway_pool(gw.data))
    unit = files.template(
        name=f"{paths.SYSTEMD_DIR}/{UNIT}", src=str(paths.TEMPLATES / f"{UNIT}.j2"),
        dest=f"{paths.SYSTEMD_DIR}/{UNIT}", user="root", group="root", mode="644",
        service_user=user, release=release, config=paths.REGISTRY_CONFIG,
        state_dir_name=paths.REGISTRY_STATE.rsplit("/", 1)[1],
        memory_max=host.data.registry_memory_max)
    changed = any_changed(unit, conf, cert, key)
    systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    systemd.service(name=f"restart {UNIT}", service=UNIT, restarted=True, _if=changed)
    systemd.service(name=f"{UNIT} enabled and running", service=UNIT, running=True,
                    enabled=True)
    local_url = f"https://[{local}]" if ":" in local else f"https://{local}"
    wait_healthy(name="registry healthy", url=f"{local_url}:{listen.rpartition(':')[2]}/healthz",
                 ca=paths.CA_CERT, _if=changed)
