"""Install a pulled peer so that its first handshake completes at once.

Two install modes (--install-mode):
- reinject (default): install the peer as a responder and hand the client's
  captured initiation back to the data plane (reinject.py); the client stays
  the initiator and connects as fast as a pre-provisioned client. If the data
  plane has not answered it by REINJECT_DEADLINE, fall back to role inversion.
- invert: role inversion, described below; one round trip slower for the client.

Role inversion: the client's first initiation arrived before the peer existed,
so nobody answered it, and the client would retry only after REKEY_TIMEOUT
(5 s). Installing the peer with an endpoint (the initiation's source address)
and a persistent keepalive makes the data plane send a handshake towards the
client at once: the gateway becomes the session's initiator. The keepalive is
only the trigger; once the handshake completed it is turned off again, so an
idle peer really goes idle and can be evicted. If the handshake has not
completed after RETRIGGER_AFTER (the client's initiation and ours crossed, or
ours was lost), the peer is installed afresh, up to MAX_RETRIGGERS times.

Locks: the Installer is the one place that touches the device for peers, and
it has two locks with one job each.
- `_lock` guards the table of installed peers and orders each change to the
  device with the change to the table (install, update, fall back, retrigger,
  clear a keepalive, remove), so that two threads never leave the device and
  the table disagreeing about a peer. Held for one device write: one peer, a
  worker's batch of installs (install_many, up to provision.WORKER_TAKE peers
  in one transaction), or one batch of removals (evict.REMOVE_BATCH); never
  across a whole-device read.
- `_read_lock` lets one whole-device read (`device_read`) run at a time: the
  eviction pass, the handshake check and adoption each hold every peer in
  memory while they use the read (~40 MB at 50,000 peers), and two at once
  would double the daemon's peak. Installs do not wait for a read (the device
  orders its own reads and writes); a read sees an install or not, which is
  why forget_missing looks only at peers installed before the read. A pass
  removes and adopts while it still holds its read: `_read_lock` is always
  taken before `_lock`, never the other way round.
Nobody else takes either lock or writes to an Installed entry: the daemon goes
through methods (note_endpoint, fall_back, ...).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from appliance.gateway.overlap import OverlapGuard
from appliance.gateway.peer import RegistryPeer
from appliance.gateway.settings import TRIGGER_KEEPALIVE
from appliance.wg import PeerActivity, PeerConfig, WgDevice, WgError
from appliance.wg.model import parse_network

log = logging.getLogger(__name__)

# Any non-zero value triggers the immediate handshake; 25 s is the customary
# NAT keepalive, harmless for the moment until it is cleared.
# An all-zero preshared key is how both the kernel and the UAPI say "none".
NO_PRESHARED_KEY = "A" * 43 + "="
# How long to wait for the handshake before installing afresh, and how often.
RETRIGGER_AFTER = 0.3
MAX_RETRIGGERS = 3
# The data plane answers a re-injected initiation as fast as any other: the
# client's first reply comes 2 RTT + the install after its first packet, like
# a pre-provisioned one (bench/connect.py). The handshake check sees it on its
# next tick (every 0.1 s on a small gateway); half a second leaves room for a
# loaded host and keeps a failed re-injection well under the client's 5 s retry.
REINJECT_DEADLINE = 0.5


@dataclass(slots=True)  # one per installed peer: tens of thousands
class Installed:
    public_key: str
    installed_at: float  # time.time()
    endpoint: str | None
    trigger_pending: bool = True  # watched until its first handshake
    adopted: bool = False
    tenant: str = ""
    allowed_ips: tuple[str, ...] | None = field(default_factory=tuple)  # None: unknown
    preshared_key: str | None = field(default=None, repr=False)
    triggered_at: float = 0.0  # time.monotonic() of the latest (re)install
    retriggers: int = 0
    trigger_keepalive: bool = True  # role inversion: a keepalive to clear after the handshake
    reinjected: bool = False  # its initiation was re-injected and not yet answered
    # The data plane was handed the initiation that brought the peer in, so it
    # knows that timestamp and refuses replays of it (repair.py need not act).
    first_seen_by_data_plane: bool = False


class Installer:
    """Owns which peers this gateway put on the device, and when."""

    def __init__(self, device: WgDevice, trigger_keepalive: int = TRIGGER_KEEPALIVE,
                 overlaps: OverlapGuard | None = None) -> None:
        self.device = device
        self.trigger_keepalive = trigger_keepalive
        # Which installed peer holds which network: a peer overlapping another is refused.
        self.overlaps = overlaps if overlaps is not None else OverlapGuard()
        self._peers: dict[str, Installed] = {}
        self._lock = threading.Lock()  # the table and per-peer device writes
        self._read_lock = threading.Lock()  # one whole-device read at a time

    def __contains__(self, public_key: str) -> bool:
        return public_key in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, public_key: str) -> Installed | None:
        return self._peers.get(public_key)

    def snapshot(self) -> dict[str, Installed]:
        with self._lock:
            return dict(self._peers)

    @contextmanager
    def device_read(self, *, wait: bool = True) -> Iterator[list[PeerActivity] | None]:
        """The device's cheap activity read, the only one running while the block runs.

        wait=False: None at once if another read is under way (a periodic job
        skips its tick rather than queue behind a one-second read). Use the
        list inside the block only: the point of the lock is that no two such
        copies exist at once.
        """
        if not self._read_lock.acquire(blocking=wait):
            yield None
            return
        try:
            yield self.device.activity()
        finally:
            self._read_lock.release()

    def note_endpoint(self, public_key: str, endpoint: str) -> bool:
        """An installed peer's client initiated again, from `endpoint`: remember it
        as the peer's endpoint (repair.py puts it back after a replay). False if
        the peer is not installed.

        Without `_lock`: this runs on the capture thread for every repeated
        initiation, and waiting there for a batch install's device write held
        up verification during a herd (py-spy, bench/herd.py). One attribute
        store is atomic; whoever reads the endpoint next under the lock (a
        fall-back, a repair) sees the old or the new one, both addresses the
        client used."""
        entry = self._peers.get(public_key)
        if entry is None:
            return False
        entry.endpoint = endpoint
        return True

    def adopt(self, peers: list[PeerActivity] | None = None) -> list[str]:
        """Take over the peers the device holds (a restart loses nothing); returns their keys.

        `peers` is a read the caller already has, so a pass reads the device once.
        Only the cheap activity read is used: at 50,000 peers a full read would
        double the daemon's memory. So an adopted peer's allowed IPs and preshared
        key are unknown here; the feed checks adopted peers against the registry
        and writes the registry's (see differs).
        A keepalive on an adopted peer is taken for a trigger we did not get to
        clear (killed between install and handshake): it stays pending, so the
        handshake check turns it off. Left on, it would make the device rekey
        every REKEY_AFTER_TIME and the peer would never look idle.
        """
        if peers is None:
            with self.device_read() as read:
                return self.adopt(read)
        now = time.time()
        adopted = []
        with self._lock:
            for p in peers:
                if p.public_key in self._peers:
                    continue
                # A peer that never handshook gets the full grace period from now.
                leftover = p.persistent_keepalive > 0
                self._peers[p.public_key] = Installed(
                    p.public_key, now, None, trigger_pending=leftover,
                    trigger_keepalive=leftover, adopted=True, allowed_ips=None)
                adopted.append(p.public_key)
        return adopted

    def install(self, peer: RegistryPeer, endpoint: str, *, reinject: bool = False) -> bool:
        """Put the peer on the device; False if it already was.

        reinject=False: aimed at `endpoint` with the trigger keepalive (role
        inversion). reinject=True: as a responder with no endpoint, for the
        caller to re-inject the initiation; the data plane takes the endpoint
        from it. Either way the peer is watched until its first handshake.
        An installed peer is never re-aimed here: the packet that asked for it is
        unauthenticated as far as the data plane is concerned, and WireGuard's
        own roaming moves a live peer's endpoint on authenticated packets.
        Raises OverlapRefused (counted and logged by the guard) when one of its
        networks overlaps another installed peer's: installing it would take them.
        """
        result = self.install_many([(peer, endpoint)], reinject=reinject)[peer.public_key]
        if isinstance(result, Exception):
            raise result
        return result

    def install_many(self, wanted: list[tuple[RegistryPeer, str]], *,
                     reinject: bool = False) -> dict[str, bool | Exception]:
        """install() for a worker's batch, the device written in ONE set_peers call.

        Per key: True (installed), False (already was), or the exception that
        install() would have raised (OverlapRefused, WgError). A herd of 10,000
        made one UAPI transaction (and one socket) per peer, each under `_lock`:
        installs queued behind each other (bench/herd.py). If the batch write
        fails, the peers are written one by one, so that only the peer the
        device refuses fails (a set is add-or-update: rewriting a peer the
        failed batch already applied is harmless).
        """
        results: dict[str, bool | Exception] = {}
        with self._lock:
            entries: list[Installed] = []
            for peer, endpoint in wanted:
                key = peer.public_key
                if key in self._peers or key in results:
                    results.setdefault(key, False)
                    continue
                if (clash := self.overlaps.clash(key, peer.allowed_ips)) is not None:
                    self.overlaps.refuse(clash)
                    results[key] = clash
                    continue
                invert = self.role_inversion and not reinject
                entries.append(Installed(
                    key, time.time(), endpoint, tenant=peer.tenant,
                    allowed_ips=peer.allowed_ips, preshared_key=peer.preshared_key,
                    trigger_pending=invert or reinject, trigger_keepalive=invert,
                    reinjected=reinject, first_seen_by_data_plane=reinject))
                # Held at once: a later peer in this batch overlapping it is refused.
                self.overlaps.hold(key, peer.allowed_ips)
                results[key] = True
            try:
                self._put_many(entries)
                written = entries
            except WgError as e:
                if len(entries) == 1:
                    self.overlaps.release([entries[0].public_key])
                    results[entries[0].public_key] = e
                    return results
                written = []
                for entry in entries:
                    try:
                        self._put(entry)
                        written.append(entry)
                    except WgError as e:
                        results[entry.public_key] = e
                        self.overlaps.release([entry.public_key])
            for entry in written:
                self._peers[entry.public_key] = entry
        return results

    @property
    def role_inversion(self) -> bool:
        return self.trigger_keepalive > 0

    def _put(self, entry: Installed) -> None:
        self._put_many([entry])

    def _put_many(self, entries: list[Installed]) -> None:
        if not entries:
            return
        self.device.set_peers([self._config(e) for e in entries])
        now = time.monotonic()
        for entry in entries:
            entry.triggered_at = now

    def _config(self, entry: Installed) -> PeerConfig:
        # Without role inversion (trigger keepalive 0) and without re-injection the
        # peer is installed as a plain responder: the client's retry after
        # REKEY_TIMEOUT completes the handshake. Kept as the baseline the
        # benchmarks compare against. A re-injected peer gets no endpoint either.
        invert = entry.trigger_keepalive
        return PeerConfig(
            entry.public_key,
            allowed_ips=entry.allowed_ips,
            preshared_key=entry.preshared_key or NO_PRESHARED_KEY,
            endpoint=entry.endpoint if invert else None,
            persistent_keepalive=self.trigger_keepalive if invert else None,
        )

    def retrigger_due(self, public_key: str, now: float) -> bool:
        entry = self._peers.get(public_key)
        return _may_retrigger(entry) and now - entry.triggered_at > RETRIGGER_AFTER

    def may_retrigger(self, public_key: str) -> bool:
        """Could retrigger_due ever become true for it (without a new install)?"""
        return _may_retrigger(self._peers.get(public_key))

    def reinjection_overdue(self, public_key: str, now: float) -> bool:
        entry = self._peers.get(public_key)
        return (entry is not None and entry.reinjected
                and now - entry.triggered_at > REINJECT_DEADLINE)

    def is_reinjected(self, public_key: str) -> bool:
        """Its initiation was re-injected and the data plane has not answered yet."""
        entry = self._peers.get(public_key)
        return entry is not None and entry.reinjected

    def reinjection_answered(self, public_key: str) -> None:
        with self._lock:
            if (entry := self._peers.get(public_key)) is not None:
                entry.reinjected = False

    def fall_back(self, public_key: str) -> bool:
        """The re-injection went unanswered: aim the peer at the client, trigger keepalive on.

        False if there is nothing to do (peer gone, answered meanwhile, or role
        inversion disabled with --trigger-keepalive 0: the client's retry then
        completes the handshake).
        """
        return bool(self.fall_back_many([public_key]))

    def fall_back_many(self, public_keys: list[str]) -> list[str]:
        """fall_back() for every key, the device written once; returns those aimed."""
        with self._lock:
            aimed = []
            for key in public_keys:
                entry = self._peers.get(key)
                if entry is None or not entry.reinjected:
                    continue
                # Unanswered or never sent: the data plane may not have taken it.
                entry.reinjected = entry.first_seen_by_data_plane = False
                if not self.role_inversion or entry.endpoint is None:
                    continue
                entry.trigger_keepalive = True
                aimed.append(entry)
            self._put_many(aimed)
        return [e.public_key for e in aimed]

    def retrigger_many(self, public_keys: list[str]) -> list[str]:
        """Install these peers afresh (their handshakes did not complete within
        RETRIGGER_AFTER): one removal and one install for them all; returns those
        still watched, which were."""
        with self._lock:
            entries = [e for k in public_keys
                       if (e := self._peers.get(k)) is not None and e.trigger_pending]
            if not entries:
                return []
            self.device.remove_peers([e.public_key for e in entries])
            self._put_many(entries)
            for entry in entries:
                entry.retriggers += 1
        return [e.public_key for e in entries]

    def update(self, peer: RegistryPeer) -> bool:
        """Apply changed allowed IPs / preshared key to an installed peer, in place.
        False, leaving the peer as it was, when the new networks overlap another
        installed peer's (counted and logged like a refused install)."""
        with self._lock:
            current = self._peers.get(peer.public_key)
            if current is None:
                return False
            if (clash := self.overlaps.clash(peer.public_key, peer.allowed_ips)) is not None:
                self.overlaps.refuse(clash)
                return False
            self.device.set_peer(PeerConfig(
                peer.public_key, allowed_ips=peer.allowed_ips,
                preshared_key=peer.preshared_key or NO_PRESHARED_KEY), update_only=True)
            current.allowed_ips = peer.allowed_ips
            current.preshared_key = peer.preshared_key
            self.overlaps.hold(peer.public_key, peer.allowed_ips)
        return True

    def pending_triggers(self) -> list[str]:
        with self._lock:
            return [k for k, p in self._peers.items() if p.trigger_pending]

    def handshake_done(self, public_keys: list[str]) -> None:
        """Stop watching peers that completed a handshake; turn off trigger keepalives
        (one device write for all of them)."""
        with self._lock:
            clear = []
            for key in public_keys:
                entry = self._peers.get(key)
                if entry is None or not entry.trigger_pending:
                    continue
                if entry.trigger_keepalive:
                    clear.append(key)
                entry.trigger_pending = entry.trigger_keepalive = entry.reinjected = False
            if clear:
                self.device.clear_keepalives(clear)

    def remove(self, public_keys: list[str]) -> list[str]:
        """Remove peers from the device (batched); returns those we had."""
        if not public_keys:
            return []
        with self._lock:
            self.device.remove_peers(public_keys)
            self.overlaps.release(public_keys)
            return [k for k in public_keys if self._peers.pop(k, None) is not None]

    def forget_missing(self, present: set[str], dumped_at: float) -> list[str]:
        """Drop bookkeeping for peers that vanished from the device (removed by hand).

        Only peers installed before the dump (`dumped_at`, time.time()) count:
        one installed while the dump was read is simply not in it yet.
        """
        with self._lock:
            gone = [k for k, e in self._peers.items()
                    if k not in present and e.installed_at < dumped_at]
            for k in gone:
                del self._peers[k]
            self.overlaps.release(gone)
        return gone

    def differs(self, peer: RegistryPeer) -> bool:
        """Would `update(peer)` change the installed peer (allowed IPs or preshared key)?"""
        entry = self._peers.get(peer.public_key)
        if entry is None:
            return False
        if entry.allowed_ips is None:  # adopted: what the device holds is not known
            return True
        return (_networks(entry.allowed_ips) != _networks(peer.allowed_ips)
                or (entry.preshared_key or None) != (peer.preshared_key or None))


def _networks(cidrs: tuple[str, ...]) -> set:
    # The device reports networks normalised (host bits dropped); so compare them so.
    return {parse_network(c) for c in cidrs}


def _may_retrigger(entry: Installed | None) -> bool:
    """Role inversion's trigger still pending, and re-triggers left (not adopted)."""
    return (entry is not None and entry.trigger_pending and entry.trigger_keepalive
            and not entry.adopted and entry.retriggers < MAX_RETRIGGERS)
