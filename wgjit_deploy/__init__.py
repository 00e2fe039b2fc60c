"""The fleet deploy, as pyinfra deploys: deploy.py at the top of the checkout calls them.

    appliance.install_appliance   apt packages, the appliance in a venv (offline wheels)
    registry.registry_role        `wgjit registry serve` under systemd (gunicorn)
    gateway.gateway_role          kernel WireGuard interface + `wgjit gateway run`
    client.client_role            a plain wg-quick client configured from the registry

Nothing happens at import: pyinfra runs deploy.py, which calls these.
"""
