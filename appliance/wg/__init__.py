"""WireGuard device backends: one interface over kernel netlink and over the UAPI socket.

    from appliance.wg import open_device, PeerConfig
    with open_device("wg0") as dev:                 # auto: UAPI socket wins, else netlink
        dev.set_peer(PeerConfig(pub, allowed_ips=["198.18.0.2/32"], endpoint="192.0.2.7:51820",
                                persistent_keepalive=1))
        for p in dev.peers(): ...                   # Peer(last_handshake=datetime|None, ...)
        dev.remove_peers(idle_keys)                 # batched
"""

from .device import WgDevice
from .errors import (
    BackendUnavailable,
    DeviceTimeout,
    InterfaceExists,
    InterfaceMissing,
    InvalidConfig,
    NotWireGuard,
    PermissionDenied,
    ProtocolError,
    WgError,
)
from .factory import BACKENDS, choose_backend, create_device, ensure_device, open_device
from .model import DeviceDump, DeviceInfo, Endpoint, Peer, PeerActivity, PeerConfig
from .uapi import start_wireguard_go, stop_wireguard_go

__all__ = [
    "BACKENDS", "BackendUnavailable", "DeviceDump", "DeviceInfo", "DeviceTimeout", "Endpoint",
    "InterfaceExists", "InterfaceMissing", "InvalidConfig", "NotWireGuard", "PermissionDenied",
    "Peer", "PeerActivity", "PeerConfig", "ProtocolError", "WgDevice", "WgError", "choose_backend",
    "create_device", "ensure_device", "open_device", "start_wireguard_go", "stop_wireguard_go",
]
