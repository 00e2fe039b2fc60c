"""The one interface both backends implement.

A device object is a handle on an existing interface; creating interfaces lives in
the backend modules and in `appliance.wg.factory`.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterable

from .errors import InvalidConfig
from .model import (
    DeviceDump,
    DeviceInfo,
    Endpoint,
    Peer,
    PeerActivity,
    PeerConfig,
    check_key,
)

# Linux's IFNAMSIZ is 16 including the terminating NUL.
IFNAME_MAX = 15


def check_ifname(ifname: str) -> str:
    if not ifname or len(ifname) > IFNAME_MAX or "/" in ifname or ifname in {".", ".."} or any(
            c.isspace() for c in ifname):
        raise InvalidConfig(f"interface name {ifname!r}: 1..{IFNAME_MAX} characters, "
                            "no '/' or spaces")
    return ifname


class WgDevice(ABC):
    """A WireGuard interface: read it, add/update/remove peers one at a time or in batches.

    Peer changes are incremental: peers that are not named are never touched.
    Removing a peer that is not there is not an error (both the kernel and the
    UAPI treat it as a no-op), so eviction can race with a client's return.
    """

    backend: str = ""

    def __init__(self, ifname: str) -> None:
        self.ifname = check_ifname(ifname)
        # The wireguard-go process started for this interface, if this program
        # started it (see uapi.start_wireguard_go); None for adopted interfaces.
        self.process: subprocess.Popen | None = None
        # True when this program created the interface (so it may tear it down).
        self.created = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ifname!r})"

    # -- reading ----------------------------------------------------------------

    @abstractmethod
    def dump(self) -> DeviceDump:
        """The interface and all its peers, read consistently in one go."""

    def info(self) -> DeviceInfo:
        return self.dump().info

    def peers(self) -> list[Peer]:
        return list(self.dump().peers)

    def activity(self) -> list[PeerActivity]:
        """Every peer's key, latest handshake, received bytes and keepalive, in one read.
        Backends override it where they can skip the rest (allowed IPs above all)."""
        return [PeerActivity(p.public_key,
                             p.last_handshake.timestamp() if p.last_handshake else None,
                             p.rx_bytes, p.persistent_keepalive) for p in self.peers()]

    # -- writing ----------------------------------------------------------------

    @abstractmethod
    def configure(self, *, private_key: str | None = None, listen_port: int | None = None,
                  fwmark: int | None = None) -> None:
        """Set interface-level fields; None leaves a field as it is. Peers are untouched."""

    @abstractmethod
    def set_peers(self, peers: Iterable[PeerConfig], *, update_only: bool = False) -> None:
        """Add or update several peers, in as few device transactions as the backend allows.

        With update_only, peers that do not exist are skipped instead of created:
        use it for follow-up changes (e.g. clearing a keepalive) that must not
        resurrect a peer evicted in the meantime.
        """

    def set_peer(self, peer: PeerConfig, *, update_only: bool = False) -> None:
        """Add the peer, or update the fields it sets; other peers are not touched."""
        self.set_peers([peer], update_only=update_only)

    @abstractmethod
    def remove_peers(self, public_keys: Iterable[str]) -> None:
        """Remove these peers (absent ones are ignored), batched."""

    def remove_peer(self, public_key: str) -> None:
        self.remove_peers([public_key])

    def set_keepalive(self, public_key: str, seconds: int) -> None:
        """Change only the persistent keepalive of an existing peer (0 turns it off)."""
        self.set_peer(PeerConfig(public_key, persistent_keepalive=seconds), update_only=True)

    def clear_keepalive(self, public_key: str) -> None:
        """Turn off a peer's trigger keepalive once it has handshaken, so that an idle
        peer really goes idle; a no-op when the peer is gone."""
        self.clear_keepalives([public_key])

    def clear_keepalives(self, public_keys: Iterable[str]) -> None:
        """clear_keepalive for several peers, batched like set_peers."""
        self.set_peers((PeerConfig(k, persistent_keepalive=0) for k in public_keys),
                       update_only=True)

    def set_endpoint(self, public_key: str, endpoint: Endpoint | str) -> None:
        """Point an existing peer at a new UDP address (an Endpoint or `host:port`)."""
        if not isinstance(endpoint, Endpoint):
            endpoint = Endpoint.parse(endpoint)
        self.set_peer(PeerConfig(public_key, endpoint=endpoint), update_only=True)

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sockets. Does not stop a wireguard-go this handle started."""

    def __enter__(self) -> WgDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_keys(public_keys: Iterable[str]) -> list[str]:
    return [check_key(k, "peer public key") for k in public_keys]
