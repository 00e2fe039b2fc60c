"""How clients (the CLI, gateways) reach the registry: TLS, and the plain-HTTP rule.

The gateway token and every preshared key cross this connection, and a feed
page that hides a revocation keeps a revoked client's tunnel up, so a client
talks HTTPS and verifies the server against `registry_ca` (or the system's
trust store when none is given). Plain `http://` is accepted only to a loopback
address (127.0.0.0/8, ::1, `localhost`), where nothing crosses a network, unless
the operator sets `allow_insecure_http` for a network they trust.
"""

from __future__ import annotations

import argparse
import ipaddress
import ssl
import urllib.parse
from collections.abc import Iterable
from typing import Any

from appliance import config
from appliance.config import ConfigError, Option


def _ca_file(path: str) -> str | None:
    """A file of PEM certificates that Python's TLS stack can load as trust anchors."""
    if not path:
        return "must name a file (leave the setting out for the system's trust store)"
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        return "no such file"
    except (ssl.SSLError, OSError, ValueError) as e:
        return f"not a file of PEM CA certificates ({e})"
    return None


# One declaration for every registry client: `wgjit peer ...` and `wgjit gateway run`.
OPTIONS = [
    Option("registry-ca", check=_ca_file, metavar="FILE",
           help="CA certificate(s) to verify the registry's HTTPS certificate against "
                "(default: the system's trust store)"),
    Option("allow-insecure-http", config.BOOL, False,
           help="allow plain http:// to a registry that is not on loopback (tokens and "
                "preshared keys then cross the network in clear)"),
]


def add_flags(p: argparse.ArgumentParser) -> None:
    config.add_flags(p, OPTIONS)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_urls(urls: Iterable[str], allow_insecure_http: bool, key: str = "registry") -> None:
    """Refuse plain http:// to anything but loopback, unless explicitly allowed."""
    if allow_insecure_http:
        return
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            raise ConfigError(
                f"{key}: {url} is plain HTTP to {parts.hostname}, which is not a loopback "
                "address: the token and preshared keys would cross the network in clear and "
                "anyone on the path could change the answers. Use https:// (with "
                "registry_ca), or set allow_insecure_http (--allow-insecure-http, "
                "WGJIT_ALLOW_INSECURE_HTTP) on a network you trust")


def verify(ca_file: str | None) -> str | bool:
    """requests' `verify`: the CA file, or True for the system's trust store."""
    return ca_file or True


def _find(exc: BaseException | None, kind: type, depth: int = 0) -> Any:
    """The first `kind` inside requests' and urllib3's wrapping of an error."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, kind):
        return exc
    for inner in (getattr(exc, "reason", None), exc.__cause__, exc.__context__,
                  *[a for a in exc.args if isinstance(a, BaseException)]):
        if isinstance(inner, BaseException) and (hit := _find(inner, kind, depth + 1)):
            return hit
    return None


def tls_failure(url: str, exc: BaseException, verify_arg: str | bool) -> str:
    """A one-line reason for a failed TLS connection that names what to check."""
    trust = f"CA file {verify_arg}" if isinstance(verify_arg, str) else "the system trust store"
    bad = _find(exc, ssl.SSLCertVerificationError)
    if bad is not None:
        why = bad.verify_message or str(bad)
        return (f"registry {url}: TLS certificate verification failed against {trust}: {why}"
                " (check --registry-ca / registry_ca)")
    inner = _find(exc, ssl.SSLError)
    return f"registry {url}: TLS handshake failed: {inner or exc}"
