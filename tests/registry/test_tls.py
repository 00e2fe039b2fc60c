"""The registry over HTTPS: a real gunicorn with its own TLS on loopback, real clients."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.pull import PeerNotFound, RegistryUnavailable, build_gateway_registry
from appliance.keys import generate_keypair
from appliance.tlsca import CertificateAuthority
from tests.conftest import WGJIT, make_token

pytestmark = pytest.mark.slow


def wgjit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*WGJIT, *args], capture_output=True, text=True, timeout=60)


def test_cli_over_tls_verifies_the_server(registry_server, tmp_path):
    db = tmp_path / "registry.db"
    tokfile = tmp_path / "admin.token"
    assert wgjit("token", "create", "--db", str(db), "--scope", "admin", "--output",
                 str(tokfile)).returncode == 0
    srv = registry_server(db, tls=True)
    assert srv.url.startswith("https://127.0.0.1:")
    common = ["--registry", srv.url, "--token-file", str(tokfile), "--registry-ca", srv.ca_file]
    assert wgjit("tenant", "add", *common, "acme").returncode == 0
    key = generate_keypair()[1]
    added = wgjit("peer", "add", *common, "--tenant", "acme", "--public-key", key,
                  "--allowed-ip", "198.18.0.2/32")
    assert added.returncode == 0, added.stderr
    listed = wgjit("peer", "list", *common, "--json")
    assert [p["public_key"] for p in json.loads(listed.stdout)] == [key]

    # Another CA (what an attacker on the path would sign with): refused, and said so.
    other = CertificateAuthority(tmp_path / "other-ca")
    wrong = wgjit("peer", "list", "--registry", srv.url, "--token-file", str(tokfile),
                  "--registry-ca", str(other.cert_file))
    assert wrong.returncode == 1
    assert "TLS certificate verification failed" in wrong.stderr
    assert str(other.cert_file) in wrong.stderr and "Traceback" not in wrong.stderr
    # No CA given: the system trust store does not know the fleet's CA either.
    bare = wgjit("peer", "list", "--registry", srv.url, "--token-file", str(tokfile))
    assert bare.returncode == 1 and "the system trust store" in bare.stderr
    # A CA given by environment works like the flag.
    env = subprocess.run([*WGJIT, "peer", "list", "--registry", srv.url, "--token-file",
                          str(tokfile)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WGJIT_REGISTRY_CA": srv.ca_file})
    assert env.returncode == 0, env.stderr


def test_gateway_with_the_wrong_ca_refuses_and_says_why(registry_server, tmp_path):
    db = tmp_path / "registry.db"
    token = make_token(db, "gateway")
    srv = registry_server(db, tls=True)
    key = generate_keypair()[1]

    other = CertificateAuthority(tmp_path / "other-ca")
    metrics = GatewayMetrics()
    wrong = build_gateway_registry([srv.url], token, metrics, timeout=2.0,
                                   ca_file=str(other.cert_file))
    with pytest.raises(RegistryUnavailable, match="certificate verification failed"):
        wrong.peer(key)
    [health] = wrong.servers.health()
    assert health["up"] is False
    assert "TLS certificate verification failed" in health["last_error"]
    assert str(other.cert_file) in health["last_error"]

    # The right CA: the same lookup gets an answer (404: the key is unknown).
    right = build_gateway_registry([srv.url], token, GatewayMetrics(), timeout=2.0,
                                   ca_file=srv.ca_file)
    with pytest.raises(PeerNotFound):
        right.peer(key)
    assert right.servers.health()[0]["up"] is True


def _serve(*args: str) -> subprocess.CompletedProcess:
    # Config errors stop `serve` before gunicorn starts, so this returns at once.
    return subprocess.run([*WGJIT, "registry", "serve", "--listen", "127.0.0.1:9", *args],
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_loose_or_mismatched_key(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.server_files(cert, key, ["127.0.0.1"])
    db = str(tmp_path / "r.db")
    only_cert = _serve("--db", db, "--tls-cert", str(cert))
    assert only_cert.returncode == 2 and "tls_key" in only_cert.stderr
    key.chmod(0o644)
    loose = _serve("--db", db, "--tls-cert", str(cert), "--tls-key", str(key))
    assert loose.returncode == 2 and "tls_key" in loose.stderr and "chmod 600" in loose.stderr
    key.chmod(0o600)
    cert2, key2 = tmp_path / "other.pem", tmp_path / "other.key"
    ca.server_files(cert2, key2, ["127.0.0.1"])
    mismatched = _serve("--db", db, "--tls-cert", str(cert), "--tls-key", str(key2))
    assert mismatched.returncode == 2 and "do not load" in mismatched.stderr
