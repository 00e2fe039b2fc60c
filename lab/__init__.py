"""The wgjit lab: network namespaces (and qemu VMs) with real WireGuard."""
