# Gateway hosts: kernel WireGuard interface + `wgjit gateway run` (netlink backend).
wg_interface = "wgjit0"
wg_listen_port = 51820
wg_backend = "netlink"
metrics_listen = "127.0.0.1:9587"
# Keep the idle timeout above 180 s (REJECT_AFTER_TIME) in production: README,
# "Defaults that matter".
idle_timeout = 300
evict_interval = 30
handshake_grace = 15
# install_mode = "invert"  # unset: the daemon's default, re-injection (README, "Install modes")
# systemd MemoryMax: 50,000 installed peers measured ~110 MiB RSS (bench/evict.py).
gateway_memory_max = "512M"
# The tenants this gateway's own registry token is limited to (its pool): it pulls
# no other tenant's peers or changes. Empty: every tenant. Names may precede the
# tenants' creation.
gateway_tenants: list[str] = []
