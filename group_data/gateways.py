# Gateway hosts: kernel WireGuard interface + `wgjit gateway run` (netlink backend).
wg_interface = "wgjit0"
wg_backend = "netlink"
# Unset options take the daemon's defaults, declared once in
# appliance/gateway/settings.py (`wgjit gateway run --help` shows them). Set any of
# wgjit_deploy/gateway.py's TUNABLES here or per host to override, e.g.
#   idle_timeout = 600      # keep it above 180 s (REJECT_AFTER_TIME): README, "Defaults"
#   install_mode = "invert" # default: re-injection (README, "Install modes")
# and wg_listen_port / metrics_listen for the interface and the local endpoint.
# systemd MemoryMax: 50,000 installed peers measured ~110 MiB RSS (bench/evict.py).
gateway_memory_max = "512M"
# The tenants this gateway's own registry token is limited to (its pool): it pulls
# no other tenant's peers or changes. Empty: every tenant. Names may precede the
# tenants' creation.
gateway_tenants: list[str] = []
