"""Pieces of the fleet deploy that need no target: wheels, the archive, templates, secrets."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import jinja2
import pytest
from pyinfra.api.exceptions import DeployError

from appliance.secrets import write_secret
from wgjit_deploy import paths, secrets, wheels
from wgjit_deploy.appliance import wheels_archive

ROOT = Path(__file__).resolve().parents[2]


def _render(name: str, **values) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES),
                             undefined=jinja2.StrictUndefined)
    return env.get_template(name).render(**values)


def test_targets_get_the_runtime_dependencies_only():
    reqs = wheels.runtime_requirements()
    assert not any(r.lower().startswith("pyinfra") for r in reqs)
    assert any(r.startswith("flask") for r in reqs) and any(r.startswith("pyroute2") for r in reqs)


def test_wheels_archive_is_byte_identical_for_identical_wheels(tmp_path):
    outs = []
    for run in ("a", "b"):
        d = tmp_path / run / "wheelhouse-x-0.1.0-k"
        d.mkdir(parents=True)
        (d / "z-1.0-py3-none-any.whl").write_bytes(b"zz")
        (d / "a-1.0-py3-none-any.whl").write_bytes(b"aa")
        (d / "requirements.txt").write_text("a\nz\n")
        (d / ".complete").write_text("k\n")
        outs.append(wheels_archive(d))
    assert outs[0].name == "wheelhouse-x-0.1.0-k.tar"
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with tarfile.open(outs[0]) as t:
        assert t.getnames() == ["a-1.0-py3-none-any.whl", "requirements.txt",
                                "z-1.0-py3-none-any.whl"]


def test_gateway_unit_grants_only_net_admin_and_net_raw():
    unit = _render("wgjit-gateway.service.j2", service_user="wgjit-gateway",
                   release="/opt/wgjit/releases/r1", config=paths.GATEWAY_CONFIG,
                   state_dir_name="wgjit-gateway", memory_max="512M")
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line
                 and not line.startswith("#"))
    assert lines["User"] == "wgjit-gateway"
    assert lines["AmbientCapabilities"].split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert lines["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert lines["ExecStart"].startswith("/opt/wgjit/releases/r1/bin/wgjit gateway run")
    # The hardening systemd-analyze scores (tests/vm/test_deploy.py checks it live).
    assert lines["UMask"] == "0077" and lines["MemoryMax"] == "512M"
    assert set(lines["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}


def test_interface_unit_and_gateway_config_render(tmp_path):
    unit = _render("wgjit-wireguard.service.j2", ifname="wgjit0", listen_port=51820,
                   private_key=paths.GATEWAY_KEY, addresses=["198.18.0.1/16", "fd00::1/64"])
    assert "ip link add wgjit0 type wireguard" in unit
    assert unit.count("ip address add") == 2
    import tomllib

    from appliance.tlsca import CertificateAuthority
    from wgjit_deploy.gateway import TUNABLES, tunables

    ca = CertificateAuthority(tmp_path / "ca")
    conf = tomllib.loads(_render(
        "gateway.toml.j2", ifname="wgjit0", registry_url="https://192.0.2.2:8080",
        registry_ca=str(ca.cert_file), allow_insecure_http=False,
        token_file=paths.GATEWAY_TOKEN, state_dir=paths.GATEWAY_STATE, backend="netlink",
        listen_port=51820, metrics_listen="127.0.0.1:9587", capture_interfaces=["eth0"],
        tunables=tunables({})))
    from appliance import config
    from appliance.gateway.settings import OPTIONS

    # The daemon's own resolver accepts every key the template writes.
    s = config.resolve(OPTIONS, {}, conf, "gateway", environ={})
    assert s["backend"] == "netlink" and s["capture_interface"] == ["eth0"]
    assert s["registry_ca"] == str(ca.cert_file) and s["allow_insecure_http"] is False
    assert "private_key_file" not in conf["gateway"]  # the interface unit holds the key
    # Nothing the inventory leaves unset is written: the daemon's defaults apply.
    assert s["install_mode"] == "reinject" and "install_mode" not in conf["gateway"]
    assert s["idle_timeout"] == 300.0 and "idle_timeout" not in conf["gateway"]
    conf = tomllib.loads(_render(
        "gateway.toml.j2", ifname="wgjit0", registry_url="https://192.0.2.2:8080",
        registry_ca=str(ca.cert_file), allow_insecure_http=False, token_file=paths.GATEWAY_TOKEN,
        state_dir=paths.GATEWAY_STATE, backend="netlink",
        listen_port=51820, metrics_listen="127.0.0.1:9587", capture_interfaces=[],
        tunables=tunables({"install_mode": "invert", "idle_timeout": 600.0, "burst": 7})))
    s = config.resolve(OPTIONS, {}, conf, "gateway", environ={})
    assert (s["install_mode"], s["idle_timeout"], s["burst"]) == ("invert", 600.0, 7)
    # Every tunable the deploy forwards is an option of the daemon's.
    assert set(TUNABLES) <= {o.key for o in OPTIONS}


def test_tokens_from_env_or_file_never_from_a_readable_file(tmp_path, monkeypatch):
    monkeypatch.delenv("WGJIT_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("WGJIT_ADMIN_TOKEN_FILE", raising=False)
    with pytest.raises(DeployError, match="WGJIT_ADMIN_TOKEN"):
        secrets.token("admin")
    f = write_secret(tmp_path / "a.token", "wgj_abc_" + "s" * 43)
    monkeypatch.setenv("WGJIT_ADMIN_TOKEN_FILE", str(f))
    value = secrets.token("admin")
    assert secrets.reveal(value) == "wgj_abc_" + "s" * 43
    assert "sss" not in str(value) and "sss" not in repr(value)  # masked in pyinfra output
    f.chmod(0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        secrets.token("admin")
    monkeypatch.setenv("WGJIT_ADMIN_TOKEN", "wgj_def_" + "t" * 43)
    assert secrets.reveal(secrets.token("admin")).startswith("wgj_def_")
    assert secrets.token_id("wgj_def_" + "t" * 43) == "def"
    # The fleet-wide gateway token is gone: each gateway has its own.
    with pytest.raises(KeyError):
        secrets.token("gateway")


def test_each_gateway_gets_its_own_token_made_once_and_kept_private(tmp_path, monkeypatch):
    from wgjit_deploy import gateway_tokens

    d = tmp_path / "tokens"
    monkeypatch.setenv("WGJIT_GATEWAY_TOKEN_DIR", str(d))
    gw1 = gateway_tokens.gateway_token("gw1.example.net")
    gw2 = gateway_tokens.gateway_token("@vagrant/gw2")  # connector prefix dropped
    assert d.stat().st_mode & 0o777 == 0o700
    for name, value in (("gw1.example.net", gw1), ("gw2", gw2)):
        f = d / f"{name}.token"
        assert f.stat().st_mode & 0o777 == 0o600
        assert f.read_text().strip() == secrets.reveal(value)
        assert secrets.reveal(value) not in str(value) + repr(value)  # masked
    assert secrets.reveal(gw1) != secrets.reveal(gw2)
    # A second deploy finds the same token: nothing to change anywhere.
    assert secrets.reveal(gateway_tokens.gateway_token("gw1.example.net")) == \
        secrets.reveal(gw1)
    (d / "gw2.token").chmod(0o644)
    with pytest.raises(DeployError, match="chmod 600"):
        gateway_tokens.gateway_token("@vagrant/gw2")
    (d / "gw3.token").write_text("not a token\n")
    (d / "gw3.token").chmod(0o600)
    with pytest.raises(DeployError, match="wgj_"):
        gateway_tokens.gateway_token("gw3")
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    monkeypatch.setenv("WGJIT_GATEWAY_TOKEN_DIR", str(loose))
    with pytest.raises(DeployError, match="chmod 700"):
        gateway_tokens.gateway_token("gw1")
    assert not (loose / "gw1.token").exists()


def test_gateway_pool_from_host_data():
    from wgjit_deploy.gateway_tokens import gateway_pool

    assert gateway_pool({}) == [] and gateway_pool({"gateway_tenants": None}) == []
    assert gateway_pool({"gateway_tenants": ["b", "a", "b"]}) == ["a", "b"]
    with pytest.raises(DeployError, match="gateway_tenants"):
        gateway_pool({"gateway_tenants": "acme"})


def test_registry_token_is_imported_only_when_missing_renamed_or_repooled():
    from wgjit_deploy.operations import token_is_current

    token = "wgj_abc_" + "s" * 43
    known = {"abc": {"name": "gw1", "pool": ["acme", "globex"]}}
    assert token_is_current(known, token, "gw1", ["globex", "acme"])
    assert not token_is_current(known, token, "gw1", ["acme"])
    assert not token_is_current(known, token, "gw2", ["acme", "globex"])
    assert not token_is_current({}, token, "gw1", [])  # unknown or revoked: the fact omits it
    # The fact's parsing: revoked tokens are not "known".
    from wgjit_deploy.facts import RegistryTokens

    rows = [{"id": "abc", "name": "gw1", "pool": ["b", "a"], "revoked_at": None},
            {"id": "def", "name": "gw2", "pool": [], "revoked_at": "2026-01-01T00:00:00Z"}]
    import json

    assert RegistryTokens().process([json.dumps(rows)]) == {
        "abc": {"name": "gw1", "pool": ["a", "b"]}}


def test_example_inventory_groups():
    # The pyinfra of the interpreter running the tests, wherever its venv is.
    p = subprocess.run([sys.executable, "-m", "pyinfra", "inventory/example.py",
                        "debug-inventory"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert "--> Groups: registry, example" in out
    assert out.count("--> Groups: gateways, example") == 2


@pytest.mark.parametrize("db, password_file", [
    ("/var/lib/wgjit-registry/registry.db", None),
    ("postgresql://wgjit@127.0.0.1:5432/wgjit", "/etc/wgjit/registry-db.password"),
])
def test_registry_config_names_its_engine(db, password_file):
    conf = tomllib.loads(_render(
        "registry.toml.j2", db=db, db_password_file=password_file, listen="127.0.0.1:8080",
        workers=2, threads=4, tls_cert=paths.REGISTRY_CERT, tls_key=paths.REGISTRY_KEY,
    ))["registry"]
    assert conf["db"] == db
    assert conf.get("db_password_file") == password_file


def test_postgres_hosts_get_debians_server():
    from wgjit_deploy import packages

    assert "postgresql" in packages.for_roles("postgres")
    assert "postgresql" not in packages.for_roles("registry")


def test_registry_config_renders_tls_that_serve_accepts():
    import tomllib

    from appliance import config
    from appliance.registry.cli import SERVE_OPTIONS

    conf = tomllib.loads(_render(
        "registry.toml.j2", db=paths.REGISTRY_DB, db_password_file=None,
        listen="192.0.2.2:8080", workers=2, threads=4,
        tls_cert=paths.REGISTRY_CERT, tls_key=paths.REGISTRY_KEY))
    s = config.resolve(SERVE_OPTIONS, {}, conf, "registry", environ={})
    assert (s["tls_cert"], s["tls_key"]) == (paths.REGISTRY_CERT, paths.REGISTRY_KEY)
    assert s["listen"] == "192.0.2.2:8080"


def test_registry_listens_on_its_management_address_not_everywhere():
    from wgjit_deploy.registry import listen_address

    assert listen_address({"registry_url": "https://192.0.2.2:8080"}, "reg") == "192.0.2.2:8080"
    assert listen_address({"registry_url": "https://[2001:db8::2]:8443"}, "reg") == \
        "[2001:db8::2]:8443"
    # An explicit registry_listen still wins.
    assert listen_address({"registry_url": "https://192.0.2.2:8080",
                           "registry_listen": "0.0.0.0:8080"}, "reg") == "0.0.0.0:8080"
    with pytest.raises(DeployError, match="registry_url is not set"):
        listen_address({}, "reg")
    import group_data.registry as defaults

    assert defaults.registry_listen is None


def test_plain_http_registry_url_is_refused_before_anything_changes():
    from wgjit_deploy.tls import check_registry_url

    with pytest.raises(DeployError, match=r"gw1: registry_url: http://192\.0\.2\.2:8080 is plain"):
        check_registry_url("http://192.0.2.2:8080", "gw1", False)
    assert check_registry_url("http://192.0.2.2:8080", "gw1", True)
    assert check_registry_url("https://192.0.2.2:8080", "gw1", False)


def test_fleet_ca_issues_the_registry_certificate_once(tmp_path, monkeypatch):
    from cryptography import x509

    from appliance.tlsca import cert_names
    from wgjit_deploy import tls

    monkeypatch.setenv("WGJIT_CA_DIR", str(tmp_path / "ca"))
    tls.fleet_ca.cache_clear()
    try:
        names = tls.registry_names("https://registry.example.net:8080", "registry",
                                   {"ssh_hostname": "192.0.2.2",
                                    "registry_tls_names": ["198.51.100.2"]})
        assert names == ["registry.example.net", "registry", "192.0.2.2", "198.51.100.2"]
        cert, key = tls.registry_certificate("registry", names)
        assert sorted(cert_names(x509.load_pem_x509_certificate(cert.encode()))) == \
            sorted(names)
        assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "ca" / "issued" / "registry.key").stat().st_mode & 0o777 == 0o600
        # The next deploy gets the very same files: nothing to upload, nothing to restart.
        assert tls.registry_certificate("registry", names) == (cert, key)
    finally:
        tls.fleet_ca.cache_clear()


def test_machine_name_drops_a_connectors_prefix():
    from wgjit_deploy.operations import machine_name

    assert machine_name("@vagrant/gw1") == "gw1"
    assert machine_name("@docker/abc") == "abc"
    assert machine_name("gw1") == "gw1"
    assert machine_name("192.0.2.11") == "192.0.2.11"
