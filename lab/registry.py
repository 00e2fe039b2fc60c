"""The lab's registry host: the real `wgjit registry serve`, and a client for its API.

The lab talks to the registry over the lab underlay from a thread inside the
bridge namespace (see nsexec), like any gateway or operator on that network would.
That is not loopback, so the registry serves HTTPS: each lab makes a throwaway CA
in its state directory (`ca/`, key 0600) and issues every registry server a
certificate for its underlay addresses; gateways and the lab's own client verify
against the CA.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from appliance.secrets import read_secret, write_secret
from appliance.tlsca import CertificateAuthority
from lab import addressing, procs
from lab.netns import LabError
from lab.nsexec import NetnsWorker
from lab.state import Registry

TENANT = "lab"
HTTP_TIMEOUT = 5.0


def wgjit_argv() -> list[str]:
    """The appliance's CLI, from the same interpreter (and venv) as the lab."""
    return [sys.executable, "-m", "appliance"]


def create_token(db: str, scope: str, tenant: str | None = None,
                 name: str | None = None) -> str:
    argv = [*wgjit_argv(), "token", "create", "--db", db, "--scope", scope]
    if tenant:
        argv += ["--tenant", tenant]
    if name:
        argv += ["--name", name]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise LabError(f"wgjit token create --scope {scope} failed: {p.stderr.strip()[-500:]}")
    lines = [line.strip() for line in p.stdout.splitlines() if line.strip()]
    if not lines:
        raise LabError("wgjit token create printed no token")
    return lines[-1]


def _url(ip4: str) -> str:
    return f"https://{ip4}:{addressing.REGISTRY_PORT}"


def _issue(reg: Registry, n: int) -> Registry:
    """Server n's certificate, for both its underlay addresses, from the lab's CA."""
    ca = CertificateAuthority(Path(reg.ca_file).parent, name="wgjit lab CA")
    keys = Path(reg.admin_token_file).parent
    suffix = "" if n == 1 else str(n)
    cert, key = keys / f"registry{suffix}.pem", keys / f"registry{suffix}.key"
    ca.server_files(cert, key, [reg.underlay4, reg.underlay6])
    return dataclasses.replace(reg, tls_cert=str(cert), tls_key=str(key))


def start_registry(state_dir: str, ns: str) -> Registry:
    """Tokens first (they create the database), then the server in namespace ns."""
    ip4, ip6 = addressing.registry_underlay()
    d = Path(state_dir)
    ca = CertificateAuthority(d / "ca", name="wgjit lab CA")
    reg = _issue(Registry(
        url=_url(ip4), ns=ns, underlay4=ip4, underlay6=ip6,
        db=str(d / "registry.db"), admin_token_file=str(d / "keys" / "admin.token"),
        gateway_token_file=str(d / "keys" / "gateway.token"), tenant=TENANT,
        log=str(d / "registry.log"), ca_file=str(ca.cert_file)), 1)
    write_secret(reg.admin_token_file, create_token(reg.db, "admin"))
    write_secret(reg.gateway_token_file, create_token(reg.db, "gateway"))
    serve(reg)
    return reg


def gateway_token(reg: Registry, gateway: str) -> str:
    """The file of the gateway's own token, named after it (made on first use), as
    the deploy gives every gateway host its own credential. The registry's
    `gateway_token_file` stays the lab's shared one, for tests and tools."""
    path = Path(reg.gateway_token_file).with_name(f"gateway-{gateway}.token")
    if not path.exists():
        write_secret(path, create_token(reg.db, "gateway", name=gateway))
    return str(path)


def another_server(first: Registry, n: int, ns: str, state_dir: str) -> Registry:
    """Registry server n over the first one's database and tokens, in namespace ns.

    The lab's namespaces share one filesystem, so servers in two of them can
    serve the same SQLite file (WAL): the registry beyond one machine, in miniature.
    """
    ip4, ip6 = addressing.registry_underlay(n)
    reg = _issue(dataclasses.replace(first, url=_url(ip4), ns=ns, underlay4=ip4,
                                     underlay6=ip6, pid=0,
                                     log=str(Path(state_dir) / f"registry{n}.log")), n)
    serve(reg)
    return reg


def serve(reg: Registry) -> None:
    """Start the server over reg's existing database (again, after an outage)."""
    reg.pid = procs.spawn(reg.ns, [*wgjit_argv(), "registry", "serve", "--db", reg.db,
                                   "--listen", f"{reg.underlay4}:{addressing.REGISTRY_PORT}",
                                   "--tls-cert", reg.tls_cert, "--tls-key", reg.tls_key],
                          reg.log)


def key_path(public_key: str) -> str:
    """Standard base64 in a URL path: '/' and '+' must be percent-encoded."""
    return quote(public_key, safe="")


class RegistryError(LabError):
    pass


class RegistryClient:
    """The registry API as the lab's operator uses it, from inside namespace `worker.ns`."""

    def __init__(self, worker: NetnsWorker, reg: Registry) -> None:
        self.worker = worker
        self.reg = reg
        self.session = requests.Session()
        worker.on_close(self.session.close)
        # Per request, not session.verify: REQUESTS_CA_BUNDLE would override that.
        self.verify = reg.ca_file

    def _get(self, path: str, timeout: float) -> requests.Response:
        return self.worker.call(self.session.get, self.reg.url + path, timeout=timeout,
                                verify=self.verify)

    def _request(self, method: str, path: str, *, token_file: str | None = None,
                 json: Any = None) -> requests.Response:
        token = read_secret(token_file or self.reg.admin_token_file, what="registry token")
        headers = {"Authorization": f"Bearer {token}"}
        return self.worker.call(self.session.request, method, self.reg.url + path,
                                headers=headers, json=json, timeout=HTTP_TIMEOUT,
                                verify=self.verify)

    @staticmethod
    def _fail(what: str, r: requests.Response) -> RegistryError:
        try:
            detail = r.json().get("error", "")
        except ValueError:
            detail = r.text[:200]
        return RegistryError(f"registry: {what}: HTTP {r.status_code} {detail}")

    def healthy(self) -> bool:
        try:
            r = self._get("/healthz", timeout=1.0)
        except requests.RequestException:
            return False
        return r.status_code == 200

    def metrics_text(self) -> str:
        """This server's /metrics (Prometheus text): its own counters, not the others'."""
        r = self._get("/metrics", timeout=HTTP_TIMEOUT)
        if r.status_code != 200:
            raise self._fail("metrics", r)
        return r.text

    def wait_healthy(self, timeout: float = 60.0) -> float:
        """Seconds until /healthz answered; fails early if the server died.

        60 s, not 20: inside a quick VM (qemu TCG, Python ~10x slower) at load 7-12
        the workers had booted and still not answered after 20 s. A server that
        dies is caught at once whatever the timeout, so a long one costs nothing.
        """
        t0 = time.monotonic()
        while not self.healthy():
            if not procs.alive(self.reg.pid):
                raise RegistryError(f"registry exited:\n{procs.tail(self.reg.log)}")
            if time.monotonic() - t0 > timeout:
                raise RegistryError(f"registry not healthy after {timeout}s:\n"
                                    f"{procs.tail(self.reg.log)}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def create_tenant(self, name: str) -> None:
        r = self._request("POST", "/v1/tenants", json={"name": name})
        if r.status_code not in (200, 201, 409):  # 409: it exists, which is what we want
            raise self._fail(f"create tenant {name}", r)

    def add_peer(self, *, public_key: str, allowed_ips: list[str], name: str,
                 preshared_key: str | None = None, tenant: str | None = None) -> dict:
        body: dict[str, Any] = {"tenant": tenant or self.reg.tenant, "public_key": public_key,
                                "allowed_ips": allowed_ips, "name": name}
        if preshared_key:
            body["preshared_key"] = preshared_key
        r = self._request("POST", "/v1/peers", json=body)
        if r.status_code != 201:
            raise self._fail(f"add peer {name}", r)
        return r.json()

    def get_peer(self, public_key: str) -> dict | None:
        r = self._request("GET", f"/v1/peers/{key_path(public_key)}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._fail("get peer", r)
        return r.json()

    def gateway_peer(self, public_key: str) -> dict | None:
        """What a gateway pulls on a first initiation, with the gateway token."""
        r = self._request("GET", f"/v1/gateway/peers/{key_path(public_key)}",
                          token_file=self.reg.gateway_token_file)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._fail("gateway peer lookup", r)
        return r.json()

    def revoke_peer(self, public_key: str) -> None:
        r = self._request("POST", f"/v1/peers/{key_path(public_key)}/revoke")
        if r.status_code not in (200, 204):
            raise self._fail("revoke peer", r)

    def restore_peer(self, public_key: str) -> None:
        r = self._request("POST", f"/v1/peers/{key_path(public_key)}/restore")
        if r.status_code not in (200, 204):
            raise self._fail("restore peer", r)

    def update_peer(self, public_key: str, **fields: Any) -> dict:
        """PATCH the peer: allowed_ips, name, preshared_key."""
        r = self._request("PATCH", f"/v1/peers/{key_path(public_key)}", json=fields)
        if r.status_code != 200:
            raise self._fail("update peer", r)
        return r.json()

    def delete_peer(self, public_key: str) -> None:
        r = self._request("DELETE", f"/v1/peers/{key_path(public_key)}")
        if r.status_code not in (200, 204, 404):
            raise self._fail("delete peer", r)
