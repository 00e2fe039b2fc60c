"""The `uapi` backend: wireguard-go or boringtun over /var/run/wireguard/<ifname>.sock.

One connection per transaction, as wg(8) does: boringtun serves a single command
per connection, and a fresh connection cannot inherit a half-read answer. That
also makes a device object safe to share between threads (the daemon serialises
transactions itself).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from . import uapi_protocol as proto
from .device import WgDevice, check_ifname, check_keys
from .errors import (
    BackendUnavailable,
    DeviceTimeout,
    InterfaceExists,
    InterfaceMissing,
    PermissionDenied,
    ProtocolError,
    WgError,
)
from .model import DeviceDump, DeviceInfo, IPInterface, PeerActivity, PeerConfig, check_key

UAPI_DIR = Path("/var/run/wireguard")
# wireguard-go refuses to start where it believes the kernel has WireGuard.
WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
DEFAULT_TIMEOUT = 5.0
# Peers per set=1 transaction in the batch calls. wireguard-go holds its IPC lock
# for a whole transaction, so one giant transaction would stall the capture
# path's installs behind an eviction pass. bench/backends.py, removing 10,000
# peers from wireguard-go: ~21k/s at 10 per transaction, ~62k/s at 100, ~115k/s
# at 1,000 and no better at 10,000.
PEERS_PER_TRANSACTION = 1000
_READ_CHUNK = 1 << 16


def socket_path(ifname: str, uapi_dir: Path = UAPI_DIR) -> Path:
    return uapi_dir / f"{ifname}.sock"


def socket_alive(path: Path, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the UAPI socket (what wg(8) checks)."""
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class UapiDevice(WgDevice):
    backend = "uapi"

    def __init__(self, ifname: str, *, timeout: float = DEFAULT_TIMEOUT,
                 path: str | os.PathLike[str] | None = None,
                 peers_per_transaction: int = PEERS_PER_TRANSACTION) -> None:
        super().__init__(ifname)
        self.path = Path(path) if path is not None else socket_path(ifname)
        self.timeout = timeout
        self.peers_per_transaction = max(1, peers_per_transaction)
        self._dialect: str | None = None

    # -- transport ----------------------------------------------------------------

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except FileNotFoundError as e:
            s.close()
            raise InterfaceMissing(
                f"{self.ifname}: no UAPI socket at {self.path}; is wireguard-go (or boringtun) "
                f"running for this interface?", ifname=self.ifname, errno=e.errno) from e
        except ConnectionRefusedError as e:
            s.close()
            raise InterfaceMissing(
                f"{self.ifname}: {self.path} is stale (nothing listens on it; the userspace "
                f"WireGuard process died); remove it and restart the interface",
                ifname=self.ifname, errno=e.errno) from e
        except PermissionError as e:
            s.close()
            raise PermissionDenied(
                f"{self.ifname}: may not connect to {self.path}; run as root",
                ifname=self.ifname, errno=e.errno) from e
        except TimeoutError as e:
            s.close()
            raise DeviceTimeout(f"{self.ifname}: connecting to {self.path} timed out after "
                                f"{self.timeout}s", ifname=self.ifname) from e
        except OSError as e:
            s.close()
            raise WgError(f"{self.ifname}: cannot connect to {self.path}: {e}",
                          ifname=self.ifname, errno=e.errno) from e
        return s

    def transact(self, request: bytes, what: str) -> str:
        """Send one request, return the whole answer (up to and including its blank line)."""
        with self._connect() as s:
            try:
                s.sendall(request)
            except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
                # The daemon stops reading at the first bad line and answers at
                # once; its errno says more than our EPIPE, so try to read it.
                answer = self._read_answer(s, what, tolerate_eof=True)
                if answer:
                    return answer
                if isinstance(e, TimeoutError):
                    raise DeviceTimeout(f"{self.ifname}: sending {what} timed out after "
                                        f"{self.timeout}s", ifname=self.ifname) from e
                raise ProtocolError(f"{self.ifname}: the device closed the connection during "
                                    f"{what}", ifname=self.ifname) from e
            return self._read_answer(s, what)

    def _read_answer(self, s: socket.socket, what: str, *, tolerate_eof: bool = False) -> str:
        """The whole answer as text; with tolerate_eof, "" when no complete one comes."""
        try:
            chunks = self._read_chunks(s, what)
        except (DeviceTimeout, ProtocolError):
            if tolerate_eof:
                return ""
            raise
        return b"".join(chunks).decode(errors="replace")

    def _set(self, lines: Sequence[str], what: str) -> None:
        answer = self.transact(proto.set_request(lines), what)
        proto.check_errno(answer, what, self.ifname)

    # -- reading ------------------------------------------------------------------

    def dump(self) -> DeviceDump:
        answer = self.transact(proto.GET_REQUEST, "get")
        now = datetime.now(UTC)
        result = proto.parse_get(answer, self.ifname, now=now)
        if self._dialect is None and result.info.private_key is not None:
            self._dialect = proto.WIREGUARD_GO
        return result

    def info(self) -> DeviceInfo:
        """The interface's own settings. The answer is cut at the first peer (we hang
        up), so this stays cheap on an interface holding 50,000 peers."""
        with self._connect() as s:
            s.sendall(proto.GET_REQUEST)
            buf = bytearray()
            while True:
                try:
                    chunk = s.recv(_READ_CHUNK)
                except TimeoutError as e:
                    raise DeviceTimeout(f"{self.ifname}: no answer to get within "
                                        f"{self.timeout}s", ifname=self.ifname) from e
                buf += chunk
                # Where the first peer's section starts (0: none yet, or no device lines).
                peers_start = buf.find(b"\npublic_key=") + 1
                if peers_start or buf.startswith(b"public_key="):
                    head = bytes(buf[:peers_start]) + b"errno=0\n\n"
                    break
                if not chunk or buf.endswith(b"\n\n"):
                    head = bytes(buf)
                    break
        return proto.parse_get(head.decode(errors="replace"), self.ifname).info

    def activity(self) -> list[PeerActivity]:
        # The answer is read at once, as raw chunks (wireguard-go holds its
        # configuration lock until the last byte is read, and installs wait on
        # it), then parsed chunk by chunk, each freed once parsed: the whole
        # answer is never held twice (bytes and text), which at 50,000 peers
        # is ~30 MB less at the peak.
        with self._connect() as s:
            try:
                s.sendall(proto.GET_REQUEST)
            except OSError as e:
                raise ProtocolError(f"{self.ifname}: sending get: {e}",
                                    ifname=self.ifname) from e
            chunks = self._read_chunks(s, "get")
        return proto.activity_from_lines(_chunk_lines(chunks), self.ifname, now=time.time())

    def _read_chunks(self, s: socket.socket, what: str) -> deque[bytes]:
        """A whole answer (up to and including its blank line) as received."""
        chunks: deque[bytes] = deque()
        tail = b""
        while True:
            try:
                chunk = s.recv(_READ_CHUNK)
            except TimeoutError as e:
                raise DeviceTimeout(f"{self.ifname}: no complete answer to {what} within "
                                    f"{self.timeout}s", ifname=self.ifname) from e
            except OSError as e:
                raise ProtocolError(f"{self.ifname}: reading the answer to {what}: {e}",
                                    ifname=self.ifname) from e
            if not chunk:
                raise ProtocolError(f"{self.ifname}: the device closed the connection before "
                                    f"answering {what} completely", ifname=self.ifname)
            chunks.append(chunk)
            tail = (tail + chunk)[-2:]
            if tail == b"\n\n":  # an answer has no blank line before its end
                return chunks

    def dialect(self) -> str:
        """wireguard-go or boringtun, told by the first line of a get (cheap even with
        many peers: we hang up after it)."""
        if self._dialect is None:
            with self._connect() as s:
                s.sendall(proto.GET_REQUEST)
                f = s.makefile("rb")
                try:
                    first = f.readline().decode(errors="replace")
                except TimeoutError as e:
                    raise DeviceTimeout(f"{self.ifname}: no answer to get within "
                                        f"{self.timeout}s", ifname=self.ifname) from e
                finally:
                    f.close()
            self._dialect = (proto.BORINGTUN if first.startswith("own_public_key=")
                             else proto.WIREGUARD_GO)
        return self._dialect

    # -- writing ------------------------------------------------------------------

    def configure(self, *, private_key: str | None = None, listen_port: int | None = None,
                  fwmark: int | None = None) -> None:
        if private_key is not None:
            private_key = check_key(private_key, "private key")
        lines = proto.encode_device_set(private_key=private_key, listen_port=listen_port,
                                        fwmark=fwmark)
        if lines:
            self._set(lines, "the interface settings")

    def set_peers(self, peers: Iterable[PeerConfig], *, update_only: bool = False) -> None:
        # boringtun rejects update_only (EINVAL). There the follow-up change is sent
        # without it: at worst it re-creates an evicted peer with no allowed IPs,
        # which carries no traffic and the never-handshaken eviction removes.
        use_update_only = update_only and self.dialect() != proto.BORINGTUN
        batch: list[str] = []
        count = 0
        for peer in peers:
            batch.extend(proto.encode_peer(peer, update_only=use_update_only))
            count += 1
            if count == self.peers_per_transaction:
                self._set(batch, f"{count} peer update(s)")
                batch, count = [], 0
        if count:
            self._set(batch, f"{count} peer update(s)" if count > 1 else "the peer update")

    def remove_peers(self, public_keys: Iterable[str]) -> None:
        keys = check_keys(public_keys)
        step = self.peers_per_transaction
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            lines = [line for k in chunk for line in proto.encode_remove(k)]
            self._set(lines, f"removing {len(chunk)} peer(s)")


def _chunk_lines(chunks: deque[bytes]) -> Iterator[tuple[str, str]]:
    """(key, value) per line of an answer held as chunks, freeing each chunk once split."""
    rest = ""
    while chunks:
        lines = (rest + chunks.popleft().decode(errors="replace")).split("\n")
        rest = lines.pop()
        for line in lines:
            if not line:
                return
            yield proto.key_value(line)


# -- starting wireguard-go ------------------------------------------------------------

def start_wireguard_go(ifname: str, *, netns: str | None = None,
                       timeout: float = DEFAULT_TIMEOUT, binary: str = "wireguard-go",
                       output: int | None = None,
                       uapi_dir: Path = UAPI_DIR) -> subprocess.Popen:
    """Start `wireguard-go -f IFNAME` and wait until its UAPI socket answers.

    Returns the process; the caller owns it (stop it with stop_wireguard_go).
    `output` is where its stdout/stderr go: by default they are inherited, so
    under systemd they land in the journal. Don't pass a pipe nobody reads: a full
    pipe blocks wireguard-go's logging and with it the data plane.
    `netns` runs it inside a named network namespace (the lab uses this).
    """
    check_ifname(ifname)
    path = socket_path(ifname, uapi_dir)
    exe = shutil.which(binary)
    if exe is None:
        raise BackendUnavailable(f"{binary} not found on PATH: install Debian's wireguard-go "
                                 f"package to run userspace WireGuard", ifname=ifname)
    if socket_alive(path):
        raise InterfaceExists(f"{ifname}: {path} is already served by another process; "
                              f"pick another interface name or adopt it", ifname=ifname)
    argv = [exe, "-f", ifname]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv, env=dict(os.environ, **WG_GO_ENV), stdin=subprocess.DEVNULL,
                            stdout=output, stderr=output)
    deadline = time.monotonic() + timeout
    while not socket_alive(path, timeout=0.5):
        if proc.poll() is not None:
            raise BackendUnavailable(
                f"{ifname}: wireguard-go exited with status {proc.returncode} before serving "
                f"{path} (its output says why; /dev/net/tun and root are needed)", ifname=ifname)
        if time.monotonic() > deadline:
            stop_wireguard_go(proc, ifname, uapi_dir=uapi_dir)
            raise DeviceTimeout(f"{ifname}: wireguard-go did not serve {path} within "
                                f"{timeout}s", ifname=ifname)
        time.sleep(0.01)
    return proc


def stop_wireguard_go(proc: subprocess.Popen, ifname: str, *, timeout: float = 5.0,
                      uapi_dir: Path = UAPI_DIR) -> None:
    """Stop it (SIGTERM, then SIGKILL) and remove its socket if it left one behind.
    Its tun interface goes away with the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    path = socket_path(ifname, uapi_dir)
    if not socket_alive(path, timeout=0.2):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def create(ifname: str, *, private_key: str, listen_port: int | None = None,
           addresses: Iterable[str | IPInterface] = (), up: bool = True,
           netns: str | None = None, timeout: float = DEFAULT_TIMEOUT,
           output: int | None = None) -> UapiDevice:
    """Start wireguard-go for a new interface and configure it. The returned device's
    `.process` is the wireguard-go process (the caller stops it)."""
    from . import link

    proc = start_wireguard_go(ifname, netns=netns, timeout=timeout, output=output)
    try:
        dev = UapiDevice(ifname, timeout=timeout)
        dev.configure(private_key=private_key, listen_port=listen_port)
        link.configure_link(ifname, addresses=addresses, up=up, netns=netns)
    except BaseException:
        stop_wireguard_go(proc, ifname)
        raise
    dev.process = proc
    dev.created = True
    return dev


def open_uapi(ifname: str, *, timeout: float = DEFAULT_TIMEOUT) -> UapiDevice:
    """A handle on a running userspace interface; InterfaceMissing when nothing serves it."""
    dev = UapiDevice(ifname, timeout=timeout)
    with dev._connect():
        pass
    return dev


