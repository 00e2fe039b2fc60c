"""A peer as the gateway gets it from the registry, and the ways a registry read fails.

Apart from the HTTP client (pull.py), so that the cache, the installer and the
feed speak of peers without importing requests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryPeer:
    """What a gateway needs to install a peer."""

    public_key: str
    allowed_ips: tuple[str, ...]
    preshared_key: str | None
    tenant: str = ""

    @classmethod
    def from_json(cls, data: dict) -> RegistryPeer:
        return cls(data["public_key"], tuple(data["allowed_ips"]), data.get("preshared_key"),
                   data.get("tenant", ""))

    def to_json(self) -> dict:
        return {"public_key": self.public_key, "allowed_ips": list(self.allowed_ips),
                "preshared_key": self.preshared_key, "tenant": self.tenant}


class PeerNotFound(Exception):
    """The registry says no: unknown or revoked."""


class RegistryUnavailable(Exception):
    """The registry could not answer (down, timing out, 5xx, refusing our token)."""


class CursorMismatch(Exception):
    """The registry holds a different change at our feed cursor than the one we
    applied (a restored backup, or commits lost to a power cut): reconcile."""
