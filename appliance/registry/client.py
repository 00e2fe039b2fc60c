"""A small HTTP client for the registry API, used by the CLI and the lab."""

from __future__ import annotations

import urllib.parse
from typing import Any

import requests

from appliance import transport


class RegistryError(Exception):
    """The registry answered with an error, or could not be reached (status 0)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}" if status else message)
        self.status = status
        self.error = error
        self.message = message


def quote_key(key: str) -> str:
    """Standard base64 in a path: '/' and '+' and '=' percent-encoded."""
    return urllib.parse.quote(key, safe="")


class RegistryClient:
    def __init__(self, base_url: str, token: str, timeout: float = 10.0,
                 session: requests.Session | None = None,
                 ca_file: str | None = None) -> None:
        """ca_file: verify an https:// registry against it (None: the system trust store)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.verify = transport.verify(ca_file)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            # verify per request: requests lets REQUESTS_CA_BUNDLE override a
            # session's own `verify`, and the operator's CA must win.
            resp = self.session.request(method, self.base_url + path, timeout=self.timeout,
                                        verify=self.verify, **kw)
        except requests.exceptions.SSLError as e:
            # Said apart from "unreachable": a wrong CA or name is a configuration
            # problem that no retry fixes.
            raise RegistryError(0, "tls", transport.tls_failure(self.base_url, e,
                                                                self.verify)) from e
        except requests.RequestException as e:
            raise RegistryError(0, "unreachable", f"registry {self.base_url}: {e}") from e
        if resp.status_code >= 400:
            try:
                body = resp.json()
                raise RegistryError(resp.status_code, body.get("error", "error"),
                                    body.get("message", resp.text))
            except ValueError:
                raise RegistryError(resp.status_code, "error", resp.text[:200]) from None
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # tenants
    def create_tenant(self, name: str) -> dict:
        return self.request("POST", "/v1/tenants", json={"name": name})

    def list_tenants(self) -> list[dict]:
        return self.request("GET", "/v1/tenants")["tenants"]

    # peers
    def create_peer(self, tenant: str, public_key: str, allowed_ips: list[str],
                    name: str | None = None, preshared_key: str | None = None,
                    allow_broad: bool = False) -> dict:
        body: dict[str, Any] = {"tenant": tenant, "public_key": public_key,
                                "allowed_ips": allowed_ips}
        if allow_broad:
            body["allow_broad"] = True
        if name is not None:
            body["name"] = name
        if preshared_key is not None:
            body["preshared_key"] = preshared_key
        return self.request("POST", "/v1/peers", json=body)

    def list_peers(self, tenant: str | None = None, limit: int = 100,
                   after: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if tenant:
            params["tenant"] = tenant
        if after:
            params["after"] = after
        return self.request("GET", "/v1/peers", params=params)

    def iter_peers(self, tenant: str | None = None, page: int = 500):
        after = None
        while True:
            result = self.list_peers(tenant, page, after)
            yield from result["peers"]
            after = result["next"]
            if after is None:
                return

    def get_peer(self, key: str) -> dict:
        return self.request("GET", f"/v1/peers/{quote_key(key)}")

    def update_peer(self, key: str, **fields: Any) -> dict:
        return self.request("PATCH", f"/v1/peers/{quote_key(key)}", json=fields)

    def revoke_peer(self, key: str) -> dict:
        return self.request("POST", f"/v1/peers/{quote_key(key)}/revoke")

    def restore_peer(self, key: str) -> dict:
        return self.request("POST", f"/v1/peers/{quote_key(key)}/restore")

    def delete_peer(self, key: str) -> None:
        self.request("DELETE", f"/v1/peers/{quote_key(key)}")

    # gateway scope
    def gateway_peer(self, key: str) -> dict:
        return self.request("GET", f"/v1/gateway/peers/{quote_key(key)}")

    def gateway_lookup(self, keys: list[str]) -> dict:
        """Several lookups in one request: {"peers": [...], "not_found": [...]}."""
        return self.request("POST", "/v1/gateway/lookup", json={"keys": keys})

    def gateway_keys(self, salt: bytes) -> dict:
        return self.request("GET", "/v1/gateway/keys", params={"salt": salt.hex()})

    def changes(self, since: int = 0, limit: int = 1000, digest: str | None = None) -> dict:
        params: dict = {"since": since, "limit": limit}
        if digest is not None:
            params["digest"] = digest
        return self.request("GET", "/v1/gateway/changes", params=params)
