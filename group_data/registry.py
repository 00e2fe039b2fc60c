# Registry hosts: `wgjit registry serve` under gunicorn.
registry_listen = "0.0.0.0:8080"
registry_workers = 2
registry_threads = 4
# systemd MemoryMax for gunicorn and its workers (SQLite page cache 64 MiB a thread).
registry_memory_max = "2G"
