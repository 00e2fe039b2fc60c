# Registry hosts: `wgjit registry serve` under gunicorn.
# Where it listens: by default the host and port of registry_url, the address the
# gateways reach it at (never every interface by accident). Set "HOST:PORT" to override.
registry_listen = None
# More names or addresses for the registry's certificate (it always has the host
# in registry_url, the inventory name, ssh_hostname and the listen address).
registry_tls_names = []
registry_workers = 2
registry_threads = 4
# systemd MemoryMax for gunicorn and its workers (SQLite page cache 64 MiB a thread).
registry_memory_max = "2G"
