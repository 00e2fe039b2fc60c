"""wgjit: just-in-time WireGuard peer provisioning."""

__version__ = "0.1.0"
