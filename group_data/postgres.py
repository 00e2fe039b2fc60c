# PostgreSQL hosts: the registry's database (wgjit_deploy/postgres.py).
postgres_version = 15  # Debian 12's
postgres_role = "wgjit"
postgres_database = "wgjit"
# Addresses the server listens on; add this host's address for remote registries.
postgres_listen = "localhost"
# Networks whose registry servers may log in (pg_hba, scram-sha-256); loopback always may.
postgres_clients: list[str] = []
