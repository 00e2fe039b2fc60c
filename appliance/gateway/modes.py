"""How a just-in-time peer's first handshake completes (see install.py and reinject.py).

Apart from install.py so that the CLI can name them without importing the packet
path: `wgjit registry serve` must set PROMETHEUS_MULTIPROC_DIR before anything
imports prometheus_client, and the CLI builds every command's parser first.
"""

INSTALL_MODES = ("reinject", "invert")
DEFAULT_INSTALL_MODE = "reinject"
