"""The deploy's own operations: each yields commands only when the host differs.

pyinfra's built-in operations cover packages, users, files and units; these cover
what is particular to wgjit: an offline venv per release, a key generated on the
host, secrets replaced only after they were checked, tokens imported into the
registry, and printing the gateway's public key.
"""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, HiddenValue, StringCommand, operation
from pyinfra.facts.files import File, FindDirectories, Sha1File

from wgjit_deploy.facts import PostgresLogin, RegistryTokens, WireGuardPublicKey
from wgjit_deploy.secrets import reveal, token_id

q = shlex.quote


@operation()
def venv_release(path: str, archive: str, requirement: str, python: str = "python3"):
    """A venv at `path`: `requirement` (no deps) and the archive's requirements.txt,
    installed from the archive's wheels, offline.

    A release is built once and never changed (`.complete` marks a finished one), so
    a running service keeps its files while the next release is built beside it.
    """
    if host.get_fact(File, path=f"{path}/.complete"):
        return
    p, wheels = q(path), q(f"{path}.wheels")
    # Debian's python3-venv ships pip as a wheel: running pip from it into a venv
    # made --without-pip skips ensurepip, which costs minutes on a slow target.
    pip = (f'W=$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | tail -n 1); '
           f'if [ -n "$W" ]; then {q(python)} -m venv --without-pip {p} && '
           f'set -- {q(python)} "$W/pip" --python {p}/bin/python; '
           f'else {q(python)} -m venv {p} && set -- {p}/bin/pip; fi')
    install = "\"$@\" install --quiet --no-index --disable-pip-version-check"
    yield (f"rm -rf {p} {wheels} && mkdir -p {wheels} && tar -xf {q(archive)} -C {wheels} && "
           f"{{ {pip}; }} && {install} --no-deps --find-links {wheels} {q(requirement)} && "
           f"{install} --find-links {wheels} -r {wheels}/requirements.txt && "
           f"rm -rf {wheels} && touch {p}/.complete")


@operation()
def wireguard_private_key(path: str, user: str, group: str):
    """Generate a WireGuard private key on the host, 0600 for `user`, unless one exists.

    The key is made by `wg genkey` on the host and never leaves it.
    """
    if host.get_fact(File, path=path):
        return
    tmp = q(f"{path}.new")
    yield (f"umask 077 && wg genkey > {tmp} && chown {q(user)}:{q(group)} {tmp} && "
           f"mv -f {tmp} {q(path)}")


def machine_name(host_name: str) -> str:
    """A host's name without its connector's prefix: `@vagrant/gw1` -> `gw1`.

    Inventories name the fleet's machines (a client's `gateway` data, the .pub files);
    connectors such as @vagrant prefix those names with their own.
    """
    return host_name.rpartition("/")[2] if host_name.startswith("@") else host_name


@operation()
def public_key(private_key: str, host_name: str, local_dir: str | None = None):
    """Print the public key of `private_key` (and keep it in local_dir/<name>.pub).

    Changes nothing on the host, so it never counts as a change.
    """
    key = host.get_fact(WireGuardPublicKey, path=private_key)
    if key and host.state.is_executing:
        logger.info(f"{host.print_prefix}WireGuard public key of {host_name}: {key}")
        if local_dir:
            out = Path(local_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{host_name}.pub").write_text(key + "\n")
    yield from ()


@operation()
def secret_file(path: str, value: str | HiddenValue, user: str, group: str,
                verify: str | None = None):
    """A 0600 file holding `value`, owned by user:group, replaced only when it differs.

    The new content goes to `path.new` first (created 0600 before anything is written
    into it); `verify`, a command with {path} in it, must accept that file before it
    replaces the live one. A failed check fails the deploy and leaves the old file.
    """
    content = reveal(value).strip() + "\n"
    info = host.get_fact(File, path=path)
    if (info and host.get_fact(Sha1File, path=path) == hashlib.sha1(content.encode()).hexdigest()
            and info.get("user") == user and info.get("group") == group
            and info.get("mode") == 600):
        return
    new = f"{path}.new"
    yield StringCommand("install", "-m", "0600", "-o", user, "-g", group, "/dev/null", q(new))
    yield FileUploadCommand(StringIO(content), new)
    if verify:
        yield f"{verify.format(path=q(new))} || {{ rm -f {q(new)}; exit 1; }}"
    yield f"mv -f {q(new)} {q(path)}"


def token_is_current(known: dict[str, dict], token: str | HiddenValue, token_name: str,
                     pool: list[str]) -> bool:
    """Whether the registry (`known`, the RegistryTokens fact) holds `token` active,
    with this name and exactly this pool of tenants."""
    row = known.get(token_id(token))
    return row is not None and row["name"] == token_name and row["pool"] == sorted(set(pool))


@operation()
def registry_token(wgjit: str, db: str, user: str, scope: str, token: str | HiddenValue,
                   token_name: str, password_file: str | None = None,
                   pool: list[str] | None = None):
    """The registry database holds `token` (its hash) with `scope`, named `token_name`
    and limited to `pool` (a gateway token's tenants); import it, or set its name and
    pool, if not. A revoked token is never brought back: the import fails.

    The token travels in a 0600 file that only exists during the import.
    password_file: the database password's file, for a PostgreSQL `db`.
    """
    pool = pool or []
    known = host.get_fact(RegistryTokens, wgjit=wgjit, db=db, user=user,
                          password_file=password_file)
    if token_is_current(known, token, token_name, pool):
        return
    tmp = f"/run/wgjit-import-{token_id(token)}.token"
    yield StringCommand("install", "-m", "0600", "-o", user, "/dev/null", tmp)
    yield FileUploadCommand(StringIO(reveal(token).strip() + "\n"), tmp)
    pw = f" --db-password-file {q(password_file)}" if password_file else ""
    tenants = "".join(f" --tenant {q(t)}" for t in sorted(set(pool)))
    yield (f"runuser -u {q(user)} -- {q(wgjit)} token import --db {q(db)}{pw} "
           f"--scope {q(scope)} --name {q(token_name)}{tenants} --token-file {tmp}; rc=$?; "
           f"rm -f {tmp}; exit $rc")


@operation()
def postgres_login(role: str, database: str, password_file: str, script: str):
    """`role` logs into `database` with the password in `password_file`; else make it so.

    The password is set by psql reading that file (`script`, run as the postgres
    superuser), never passed on a command line where `ps` would show it.
    """
    if host.get_fact(PostgresLogin, role=role, database=database, path=password_file):
        return
    yield (f"runuser -u postgres -- psql -X -q -v role={q(role)} -v db={q(database)} "
           f"-v pwfile={q(password_file)} < {q(script)}")


@operation()
def wait_healthy(url: str, seconds: int = 120, helper: str = "/opt/wgjit/libexec/wait-healthy",
                 ca: str | None = None):
    """Fail the deploy unless `url` answers 200 within `seconds` (use after a restart).

    An https:// url is verified against the CA file `ca`.
    """
    yield StringCommand(helper, q(url), str(seconds), *([q(ca)] if ca else []))


@operation()
def barrier():
    """Every host runs this at the same point of deploy.py: no host's later operations
    start before every host's earlier ones finished (pyinfra orders operations per host;
    a shared operation joins the hosts' chains). Changes nothing.
    """
    yield from ()


@operation()
def prune_releases(releases: str, keep: str):
    """Remove every release under `releases` but `keep`.

    deploy.py runs it last, so only a host whose services all restarted onto `keep`
    gets here; a host whose deploy failed keeps the release it still runs.
    """
    found = host.get_fact(FindDirectories, path=releases, maxdepth=1, quote_path=True)
    stale = [d for d in found if d.rstrip("/") not in (releases.rstrip("/"), keep)]
    if stale:
        yield StringCommand("rm", "-rf", *[q(d) for d in sorted(stale)])
