"""What a lab made, kept as JSON under /run/wgjit-lab/<prefix>/ so later commands find it.

`python -m lab up` exits while its namespaces and daemons live on; `status`,
`connect`, `down` run in other processes and read this file. Private keys and
tokens sit beside it in 0600 files; the JSON holds only their paths.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# /run is a tmpfs: a reboot, which also drops every namespace, drops the state too.
STATE_ROOT = Path(os.environ.get("WGJIT_LAB_STATE_ROOT", "/run/wgjit-lab"))
STATE_FILE = "state.json"

# Short, so that "<prefix>c506" fits IFNAMSIZ (15) and the UAPI socket name.
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")


class StateError(RuntimeError):
    pass


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise StateError(f"lab prefix {prefix!r}: use 2-8 characters, a-z then a-z/0-9")
    return prefix


@dataclass
class Registry:
    url: str = ""
    ns: str = ""
    underlay4: str = ""
    underlay6: str = ""
    db: str = ""
    admin_token_file: str = ""
    gateway_token_file: str = ""
    tenant: str = "lab"
    pid: int = 0
    log: str = ""
    # HTTPS: the lab's throwaway CA (what every client verifies against) and this
    # server's certificate and 0600 key, issued for its underlay addresses.
    ca_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""


@dataclass
class Gateway:
    name: str  # "g1"
    ns: str
    ifname: str
    mode: str  # "jit" | "plain"
    underlay4: str
    underlay6: str
    tunnel4: str  # with prefix length, e.g. 198.18.0.1/16
    tunnel6: str
    listen_port: int
    public_key: str = ""
    private_key_file: str = ""
    wg_pid: int = 0
    wg_log: str = ""
    daemon_pid: int = 0
    daemon_log: str = ""
    metrics: str = ""  # host:port inside the gateway namespace
    daemon_argv: list[str] = field(default_factory=list)  # how it was started (for restarts)

    @property
    def tunnel4_ip(self) -> str:
        return self.tunnel4.split("/")[0]

    @property
    def tunnel6_ip(self) -> str:
        return self.tunnel6.split("/")[0]


@dataclass
class Client:
    name: str  # "c1"
    ns: str
    ifname: str
    gateway: str  # name of the gateway it talks to
    underlay4: str
    underlay6: str
    tunnel4: str  # /32
    tunnel6: str  # /128
    endpoint_family: int = 4  # which underlay family the client reaches its gateway on
    public_key: str = ""
    private_key_file: str = ""
    psk_file: str = ""
    wg_pid: int = 0
    wg_log: str = ""
    registered: bool = False
    ping_pid: int = 0
    ping_log: str = ""
    ping_started: float = 0.0  # unix time the current ping began
    # Round-trip time added by the relay (lab/relay.py), ms; None: no relay, direct.
    rtt_ms: float | None = None


@dataclass
class LabState:
    prefix: str
    dir: str
    created: float
    namespaces: list[str] = field(default_factory=list)
    # Registry servers over one database; the first made it (and the tokens).
    registries: list[Registry] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ready: bool = False
    relay_pid: int = 0  # the delaying relay in the internet namespace, if any
    relay_log: str = ""
    # The process whose exit ends the lab (tests, the demo); 0: it outlives its maker.
    owner_pid: int = 0

    @property
    def path(self) -> Path:
        return Path(self.dir) / STATE_FILE

    @property
    def registry(self) -> Registry | None:
        """The first registry server (the only one unless the lab asked for more)."""
        return self.registries[0] if self.registries else None

    def gateway(self, name: str) -> Gateway:
        for g in self.gateways:
            if g.name == name:
                return g
        raise StateError(f"lab {self.prefix} has no gateway {name!r}")

    def client(self, name: str) -> Client:
        for c in self.clients:
            if c.name == name:
                return c
        raise StateError(
            f"lab {self.prefix} has no client {name!r} "
            f"(clients: {', '.join(c.name for c in self.clients) or 'none'})")

    def save(self) -> None:
        tmp = self.path.with_name(f".{STATE_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabState:
        d = dict(d)
        regs = d.pop("registries", [])
        gws = d.pop("gateways", [])
        cls_ = d.pop("clients", [])
        return cls(**d, registries=[Registry(**r) for r in regs],
                   gateways=[Gateway(**g) for g in gws], clients=[Client(**c) for c in cls_])


def state_dir(prefix: str) -> Path:
    return STATE_ROOT / check_prefix(prefix)


def create_state(prefix: str, created: float) -> LabState:
    """Claim the prefix: fails if a lab of that name already exists."""
    d = state_dir(prefix)
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir(mode=0o700)
    except FileExistsError as e:
        raise StateError(f"lab {prefix} already exists ({d}); `python -m lab down "
                         f"--prefix {prefix}` first") from e
    st = LabState(prefix=prefix, dir=str(d), created=created)
    st.save()
    return st


def load_state(prefix: str) -> LabState | None:
    p = state_dir(prefix) / STATE_FILE
    try:
        return LabState.from_dict(json.loads(p.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise StateError(f"{p}: unreadable lab state ({e}); `down --prefix` still works") from e


def list_labs() -> list[str]:
    """Prefixes with a state directory, whether or not their state file is complete."""
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if p.is_dir() and PREFIX_RE.match(p.name))
