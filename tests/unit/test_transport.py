"""The plain-HTTP rule and the CA option, as the gateway and the CLI read them; the small CA."""

from __future__ import annotations

import ssl
import stat

import pytest

from appliance.cli import build_parser, main
from appliance.config import ConfigError
from appliance.gateway.cli import settings_from
from appliance.tlsca import CertificateAuthority, cert_names
from appliance.transport import check_urls, is_loopback


def _gateway(*argv: str):
    args = build_parser().parse_args(["gateway", "run", "--interface", "wg0",
                                      "--token-file", "/nonexistent", *argv])
    return settings_from(args)[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["192.0.2.2", "2001:db8::2", "0.0.0.0", "::",
                                  "registry.example.net", "localhost.example.net", ""])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_plain_http_to_a_non_loopback_address_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^registry: http://192\.0\.2\.2:8080 is plain HTTP"
                       r".*allow_insecure_http"):
        check_urls(["http://127.0.0.1:8080", "http://192.0.2.2:8080"], False)
    check_urls(["http://192.0.2.2:8080"], True)  # explicitly allowed
    check_urls(["https://192.0.2.2:8080", "http://[::1]:8080", "http://localhost:8080"], False)


def test_gateway_refuses_plain_http_at_config_time(monkeypatch):
    monkeypatch.delenv("WGJIT_ALLOW_INSECURE_HTTP", raising=False)
    with pytest.raises(ConfigError, match=r"registry: http://\[2001:db8::2\]:8080 is plain"):
        _gateway("--registry", "https://192.0.2.2:8080", "--registry", "http://[2001:db8::2]:8080")
    # Loopback needs nothing; the flag and the environment variable both allow it.
    assert _gateway("--registry", "http://127.0.0.1:8080").registries == ["http://127.0.0.1:8080"]
    assert _gateway("--registry", "http://192.0.2.2:8080", "--allow-insecure-http").registries
    monkeypatch.setenv("WGJIT_ALLOW_INSECURE_HTTP", "yes")
    assert _gateway("--registry", "http://192.0.2.2:8080").registries


def test_gateway_registry_ca_must_be_a_ca_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--registry-ca: .*no such file"):
        _gateway("--registry", "https://192.0.2.2:8080", "--registry-ca",
                 str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"--registry-ca: .*not a file of PEM CA"):
        _gateway("--registry", "https://192.0.2.2:8080", "--registry-ca", str(junk))
    ca = CertificateAuthority(tmp_path / "ca")
    s = _gateway("--registry", "https://192.0.2.2:8080", "--registry-ca", str(ca.cert_file))
    assert s.registry_ca == str(ca.cert_file)


def test_gateway_config_file_key_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("WGJIT_ALLOW_INSECURE_HTTP", raising=False)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nregistry = "http://198.51.100.7:8080"\n')
    with pytest.raises(ConfigError, match=r"^registry: http://198\.51\.100\.7:8080"):
        _gateway("--config", str(cfg))
    cfg.write_text('[gateway]\nregistry = "http://198.51.100.7:8080"\n'
                   "allow_insecure_http = true\n")
    assert _gateway("--config", str(cfg)).registries == ["http://198.51.100.7:8080"]


def test_cli_refuses_plain_http_before_reading_the_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WGJIT_ALLOW_INSECURE_HTTP", raising=False)
    rc = main(["peer", "list", "--registry", "http://203.0.113.9:8080", "--token-file",
               str(tmp_path / "no.token")])
    err = capsys.readouterr().err
    assert rc == 2 and "registry: http://203.0.113.9:8080 is plain HTTP" in err
    assert "--allow-insecure-http" in err


def test_ca_key_stays_private_and_server_files_are_reissued_only_when_needed(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    assert stat.S_IMODE(ca.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.dir.stat().st_mode) == 0o700
    cert, key = tmp_path / "srv.pem", tmp_path / "srv.key"
    names = ["registry.example.net", "192.0.2.2", "2001:db8::2"]
    assert ca.server_files(cert, key, names) is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = cert.read_text()
    # A second deploy with the same names changes nothing; loading the CA again too.
    assert CertificateAuthority(tmp_path / "ca").server_files(cert, key, names) is False
    assert cert.read_text() == first
    # New names: a new certificate with exactly them.
    assert ca.server_files(cert, key, [*names, "198.51.100.2"]) is True
    from cryptography import x509
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert sorted(cert_names(issued)) == sorted([*names, "198.51.100.2"])
    # A certificate from another CA is replaced by one of ours.
    CertificateAuthority(tmp_path / "other").server_files(cert, key, names)
    assert ca.server_files(cert, key, names) is True
    # And Python's TLS stack accepts the pair, with our CA as its trust anchor.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ssl.create_default_context(cafile=str(ca.cert_file))


def test_a_loose_ca_key_is_refused(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    ca.key_file.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        CertificateAuthority(tmp_path / "ca")
