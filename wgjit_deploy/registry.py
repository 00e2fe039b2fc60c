"""The registry role: `wgjit registry serve` (gunicorn) under systemd, as its own user."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from wgjit_deploy import paths, secrets
from wgjit_deploy.operations import registry_token, secret_file, wait_healthy

UNIT = "wgjit-registry.service"


def _local_url(listen: str) -> str:
    host_part, _, port = listen.rpartition(":")
    if host_part in ("0.0.0.0", "::", "[::]", ""):
        host_part = "127.0.0.1"
    return f"http://{host_part}:{port}"


@deploy("wgjit registry")
def registry_role(release: str) -> None:
    user = paths.REGISTRY_USER
    listen = host.data.get("registry_listen", "0.0.0.0:8080")
    server.user(name=f"system user {user}", user=user, system=True,
                home=paths.REGISTRY_STATE, shell="/usr/sbin/nologin", create_home=False)
    files.directory(name=f"{paths.REGISTRY_STATE}/", path=paths.REGISTRY_STATE, user=user,
                    group=user, mode="750")
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
        db=db, db_password_file=password_file, listen=listen,
        workers=host.data.get("registry_workers", 2),
        threads=host.data.get("registry_threads", 4))
    wgjit = f"{release}/bin/wgjit"
    # The operator's tokens, so that gateways and admins holding them are let in.
    for scope in ("admin", "gateway"):
        registry_token(name=f"{scope} token known to the registry", wgjit=wgjit,
                       db=db, password_file=password_file, user=user, scope=scope,
                       token=secrets.token(scope, host.data.get(f"{scope}_token_file")),
                       token_name=f"deploy-{scope}")
    unit = files.template(
        name=f"{paths.SYSTEMD_DIR}/{UNIT}", src=str(paths.TEMPLATES / f"{UNIT}.j2"),
        dest=f"{paths.SYSTEMD_DIR}/{UNIT}", user="root", group="root", mode="644",
        service_user=user, release=release, config=paths.REGISTRY_CONFIG,
        state_dir_name=paths.REGISTRY_STATE.rsplit("/", 1)[1],
        memory_max=host.data.registry_memory_max)
    changed = any_changed(unit, conf)
    systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    systemd.service(name=f"restart {UNIT}", service=UNIT, restarted=True, _if=changed)
    systemd.service(name=f"{UNIT} enabled and running", service=UNIT, running=True,
                    enabled=True)
    wait_healthy(name="registry healthy", url=_local_url(listen) + "/healthz", _if=changed)
