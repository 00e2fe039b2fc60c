# Registry hosts: `wgjit registry serve` under gunicorn.
registry_listen = "0.0.0.0:8080"
registry_workers = 2
registry_threads = 4
