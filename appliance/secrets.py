"""Secrets (tokens, private keys) live in 0600 files, never on a command line."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(ValueError):
    pass


def read_secret(path: str | os.PathLike[str], *, what: str = "secret") -> str:
    """Read a one-line secret, refusing files that others can read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        raise SecretFileError(f"{what} file {p}: not found") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"{what} file {p}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it;"
            f" chmod 600 {p}"
        )
    value = p.read_text().strip()
    if not value:
        raise SecretFileError(f"{what} file {p}: empty")
    return value


def write_secret(path: str | os.PathLike[str], value: str) -> Path:
    """Create or replace a 0600 file atomically; the secret is never world-readable."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (value.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p
