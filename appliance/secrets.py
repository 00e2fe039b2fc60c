"""Secrets (tokens, private keys) live in 0600 files, never on a command line."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class SecretFileError(ValueError):
    pass


def check_private(path: str | os.PathLike[str], *, what: str = "secret") -> Path:
    """Refuse a secret file that is missing or that anyone but its owner can use."""
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
    return p


def read_secret(path: str | os.PathLike[str], *, what: str = "secret") -> str:
    """Read a one-line secret, refusing files that others can read."""
    p = check_private(path, what=what)
    value = p.read_text().strip()
    if not value:
        raise SecretFileError(f"{what} file {p}: empty")
    return value


def write_secret(path: str | os.PathLike[str], value: str) -> Path:
    """Create or replace a 0600 file atomically; the secret is never world-readable.

    The temporary file gets a random name and is created with O_EXCL|O_NOFOLLOW
    (mkstemp): a name planted beforehand, say a symlink to a file the attacker can
    read, makes the create fail instead of being written through. The final rename
    replaces a symlink at `path` itself rather than following it.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((value.rstrip("\n") + "\n").encode())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p
