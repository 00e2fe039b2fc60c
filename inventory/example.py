"""An example inventory for a real fleet: copy it (outside git if it names real hosts).

    export WGJIT_ADMIN_TOKEN_FILE=~/.config/wgjit/admin.token      # 0600, outside git
    export WGJIT_GATEWAY_TOKEN_DIR=~/.config/wgjit/gateway-tokens  # each gateway's own, made here
    export WGJIT_CA_DIR=~/.config/wgjit/ca   # the fleet CA, made by the first deploy
    pyinfra inventory/example.py deploy.py --dry   # what would change
    pyinfra inventory/example.py deploy.py         # do it

Groups: `registry` (one host) and `gateways`; `clients` only for lab clients. Every
value in group_data/*.py can be overridden per host here. Targets are Debian 12
hosts reachable over SSH; a non-root SSH user needs `_sudo: True`. They need the
Debian mirror for the apt packages, never PyPI: the controller builds the wheels.
"""

# The registry's URL as the gateways reach it (documentation addresses here). HTTPS:
# its certificate comes from the fleet CA; the registry listens on this address.
_registry = "https://192.0.2.2:8080"
_common = {"ssh_user": "deploy", "_sudo": True, "registry_url": _registry}

registry = [
    ("registry.example.net", {**_common, "ssh_hostname": "192.0.2.2"}),
]

gateways = [
    # wg_address: the gateway's own tunnel addresses; clients route the tunnel net to it.
    ("gw1.example.net", {**_common, "ssh_hostname": "192.0.2.11",
                         "wg_address": ["198.18.0.1/16", "fd00::1/64"]}),
    ("gw2.example.net", {**_common, "ssh_hostname": "192.0.2.12",
                         "wg_address": ["198.18.0.2/16", "fd00::2/64"],
                         # Watch only the underlay NIC (default: every Ethernet interface).
                         "capture_interfaces": ["eth0"],
                         # Its token pulls only these tenants' peers (default: all).
                         "gateway_tenants": ["acme", "globex"]}),
]
