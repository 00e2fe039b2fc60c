"""Wheels of the appliance and every dependency, built on the controller for the targets.

Targets need no package index: the controller builds the appliance's wheel from this
checkout, `pip download`s binary wheels of its dependencies for the targets' Python
(Debian 12: CPython 3.11 on x86_64 glibc), and the deploy uploads the directory.
The result is cached by a hash of the sources and the target, so an unchanged
checkout uploads byte-identical files and the deploy reports no change.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
# manylinux tags a Debian 12 (glibc 2.36) target accepts, newest first.
PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# Wheels carry file dates; a fixed one keeps a rebuild of the same source identical.
SOURCE_DATE_EPOCH = "315532800"
# Dependencies the controller needs and the targets do not (pyinfra and its gevent,
# paramiko, pydantic... would double what a target installs and compiles).
CONTROLLER_ONLY = frozenset({"pyinfra"})
REQUIREMENTS = "requirements.txt"


@dataclass(frozen=True)
class Wheelhouse:
    path: Path  # the wheels, and requirements.txt: what the targets install besides
    key: str  # names the release on the target
    requirement: str  # the appliance itself, e.g. "wgjit==0.1.0", installed --no-deps


def cache_root() -> Path:
    return Path(os.environ.get("WGJIT_DEPLOY_CACHE", CHECKOUT / ".cache" / "wgjit-deploy"))


def _source_hash(python_version: str) -> str:
    h = hashlib.sha256(f"{python_version}\0{' '.join(PLATFORMS)}\0"
                       f"{' '.join(sorted(CONTROLLER_ONLY))}\0".encode())
    files = [CHECKOUT / "pyproject.toml", *sorted((CHECKOUT / "appliance").rglob("*.py"))]
    for f in files:
        h.update(str(f.relative_to(CHECKOUT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _project() -> dict:
    import tomllib

    return tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]


def runtime_requirements() -> list[str]:
    """The appliance's dependencies that targets need (pyproject's, less CONTROLLER_ONLY)."""
    import re

    def name(req: str) -> str:
        return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")

    return [r for r in _project()["dependencies"] if name(r) not in CONTROLLER_ONLY]


def _pip(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                       env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
                            "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if p.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args[:2])} failed:\n{(p.stderr or p.stdout)[-3000:]}")


@functools.cache
def wheelhouse(python_version: str = "3.11") -> Wheelhouse:
    """Build (or reuse) the wheel directory for targets running CPython `python_version`."""
    project = _project()
    name, version = project["name"], project["version"]
    key = f"{name}-{version}-{_source_hash(python_version)}"
    out = cache_root() / f"wheelhouse-{key}"
    if not (out / ".complete").is_file():
        cache_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".build-") as tmp:
            wheels = Path(tmp) / "wheels"
            _pip("wheel", "--quiet", "--no-deps", "-w", str(wheels), str(CHECKOUT))
            reqs = wheels / REQUIREMENTS
            reqs.write_text("".join(f"{r}\n" for r in runtime_requirements()))
            abi = "cp" + python_version.replace(".", "")
            _pip("download", "--quiet", "--only-binary=:all:", "--python-version",
                 python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                 "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)],
                 "-d", str(wheels), "-r", str(reqs))
            (wheels / ".complete").write_text(key + "\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(wheels, out)
        for stale in cache_root().glob(f"wheelhouse-{name}-*"):
            if stale.is_dir() and stale != out:
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.is_file() and stale.name != f"{out.name}.tar":
                stale.unlink(missing_ok=True)
    return Wheelhouse(out, key, f"{name}=={version}")
