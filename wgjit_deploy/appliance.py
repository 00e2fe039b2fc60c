"""Every wgjit host: Debian packages and the appliance in a venv, installed offline."""

from __future__ import annotations

import io
import tarfile
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files

from wgjit_deploy import packages, paths
from wgjit_deploy.operations import venv_release
from wgjit_deploy.tls import fleet_ca
from wgjit_deploy.wheels import wheelhouse


def wheels_archive(wheel_dir: Path) -> Path:
    """One tar of the wheel directory, byte-identical for identical wheels.

    One file to compare and upload instead of forty: each remote check costs a
    round trip, and a slow target (a TCG VM) makes those add up.
    """
    out = wheel_dir.parent / f"{wheel_dir.name}.tar"
    if out.is_file():
        return out
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted([*wheel_dir.glob("*.whl"), wheel_dir / "requirements.txt"]):
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = f.stat().st_size, 0o644, 0
            with f.open("rb") as fh:
                tar.addfile(info, fh)
    out.write_bytes(buf.getvalue())
    return out


def release_path() -> str:
    """Where this checkout's release lives on the targets."""
    return paths.release(wheelhouse(host.data.get("target_python", "3.11")).key)


@deploy("wgjit: packages and the appliance")
def install_appliance(roles: list[str]) -> None:
    apt.packages(
        name="Debian packages",
        packages=packages.for_roles(*roles),
        update=host.data.get("apt_update", True),
        cache_time=3600,
        no_recommends=True,
    )
    for d in (paths.PREFIX, paths.RELEASES, paths.LIBEXEC, paths.CONFIG_DIR):
        files.directory(name=f"{d}/", path=d, user="root", group="root", mode="755")
    # Public: the fleet CA's certificate, which registry clients verify against.
    files.put(name=f"{paths.CA_CERT} (the fleet CA)", src=StringIO(fleet_ca().cert_pem),
              dest=paths.CA_CERT, user="root", group="root", mode="644")
    for helper in ("check-registry-token", "wait-healthy"):
        files.put(name=f"{paths.LIBEXEC}/{helper}", src=str(paths.FILES / helper),
                  dest=f"{paths.LIBEXEC}/{helper}", user="root", group="root", mode="755")
    wh = wheelhouse(host.data.get("target_python", "3.11"))
    files.put(name="wheels of the appliance and its dependencies",
              src=str(wheels_archive(wh.path)), dest=paths.WHEELS_ARCHIVE, user="root",
              group="root", mode="644")
    venv_release(name=f"release {wh.key}", path=paths.release(wh.key),
                 archive=paths.WHEELS_ARCHIVE, requirement=wh.requirement)
