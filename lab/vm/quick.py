"""Quick VMs: run commands as root under the machine's own Debian kernel in qemu.

The host kernel has no WireGuard module; a qemu guest booting the kernel from /boot
does. The guest's root is the host's root, read-only over 9p, with a tmpfs overlay
on top: the checkout, the venv and every tool are there at the same paths, and
whatever the guest writes vanishes when it powers off. Each VM gets its own /proc,
/sys, /dev and /run, loopback up, and the WireGuard module loaded; its /tmp is the
host's /tmp as seen at boot, writable but private (so a checkout or test files
under the host's /tmp are still there). The guest has no network unless asked.

    from lab.vm import VM, run_in_vm

    result = run_in_vm(["ip", "link", "add", "wg0", "type", "wireguard"])
    assert result.returncode == 0, result.output

    with VM() as vm:                      # one boot, many commands
        vm.run(["ip", "netns", "add", "a"], check=True)
        out = vm.run([".venv/bin/python", "-m", "pytest", "tests/x"], echo=True)

Files: `VM.shared_dir` is a host directory mounted read-write, uncached, at the same
path in the guest: the way for files to come back, and the dependable way in (the
root is cached, so a host file changed after boot may look stale inside). Nothing
else the guest writes reaches the host.

Logs: <cache>/logs/<time>-<pid>-<rand>/ holds console.log (kernel; WGJIT_VM_VERBOSE=1
keeps the boot messages), qemu.log and commands.log (every command and its output).

How it works: qemu (TCG: KVM does not work on these machines) boots the kernel with
a small initramfs (lab/vm/initramfs.py, lab/vm/init/), whose PID 1 ends as a shell
loop, the agent, reading commands from a virtio-serial port. Commands go as shell
scripts through the shared per-VM directory; their output streams back over the
port and ends with a per-command random marker carrying the exit code, so neither
kernel messages (on the serial console, kept in console.log) nor the command's own
output can be mistaken for it.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import dataclasses
import os
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from lab.vm.initramfs import CHECKOUT, Kernel, boot_image, cache_dir, find_kernel, initramfs

QEMU = "qemu-system-x86_64"
# What every command starts with; `env` adds to or overrides it.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    # Progress shows as it happens, and no .pyc is written to a root that is thrown away.
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
# 9p: big messages and a loose cache make Python imports over 9p tolerable; the
# guest lives minutes, so a stale view of host files edited meanwhile is acceptable.
P9_MSIZE = 512 * 1024
P9_CACHE = "loose"
KEEP_LOGS = 30
_PR_SET_PDEATHSIG = 1


class VMError(RuntimeError):
    """The VM failed to boot, died, or broke the protocol. `log_dir` has the logs."""

    def __init__(self, message: str, log_dir: Path | None = None) -> None:
        super().__init__(message + (f" (logs: {log_dir})" if log_dir else ""))
        self.log_dir = log_dir


class VMTimeout(VMError):
    """A command outlived its timeout; the VM was killed. `output` is what came so far."""

    def __init__(self, message: str, output: str, log_dir: Path | None = None) -> None:
        super().__init__(message, log_dir)
        self.output = output


@dataclasses.dataclass(frozen=True)
class VMResult:
    returncode: int
    output: str  # stdout and stderr interleaved, as the command wrote them
    seconds: float = 0.0

    def check(self) -> VMResult:
        if self.returncode != 0:
            raise VMError(f"command failed with exit code {self.returncode}:\n{self.output}")
        return self


def _die_with_parent() -> None:
    # qemu must not outlive a test run that was SIGKILLed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _new_log_dir() -> Path:
    root = cache_dir() / "logs"
    root.mkdir(parents=True, exist_ok=True)
    old = sorted(root.iterdir())
    for stale in old[:max(0, len(old) - KEEP_LOGS + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
    path.mkdir()
    return path


class VM:
    """One booted guest; use as a context manager. Not thread-safe: one command at a time.

    memory_mb: guest RAM; the guest's writes (overlay, /tmp) live in it.
    cpus: guest CPUs (TCG runs one host thread per guest CPU).
    modules: loaded with modprobe at boot; a failure aborts the boot.
    boot_timeout: seconds from qemu start to the agent saying ready.
    log_dir: where console.log (kernel), qemu.log and commands.log go; default a fresh
        directory under <cache>/logs (the last few are kept).
    echo: stream every command's output to this text stream (True: sys.stdout).
    netns: run qemu inside this network namespace, e.g. so that a tap device made
        there can back a NIC given in qemu_args.
    qemu_args: extra qemu arguments (NICs, disks). The guest has no network unless
        these add one.
    kernel: which /boot kernel to boot; default find_kernel() (the stock one, or
        $WGJIT_VM_KERNEL).
    """

    def __init__(self, *, memory_mb: int = 1024, cpus: int = 1,
                 modules: Sequence[str] = ("wireguard",), boot_timeout: float = 120,
                 log_dir: str | Path | None = None, echo: bool | IO[str] = False,
                 netns: str | None = None, qemu_args: Sequence[str] = (),
                 hostname: str = "wgjit-vm", kernel: Kernel | None = None) -> None:
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.modules = tuple(modules)
        self.boot_timeout = boot_timeout
        self.log_dir = Path(log_dir) if log_dir else None
        self.echo = echo
        self.netns = netns
        self.qemu_args = list(qemu_args)
        self.hostname = hostname
        self.kernel: Kernel | None = kernel
        self.kernel_version = ""  # as the guest's `uname -r` reported it
        self.boot_seconds = 0.0
        self._rundir: Path | None = None
        self._boot_image: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._cmdlog: IO[str] | None = None
        self._count = 0
        self._busy = False  # a command is running: the agent will not hear "poweroff"

    # -- lifecycle --------------------------------------------------------

    @property
    def shared_dir(self) -> Path:
        """Host directory mounted read-write at the same path inside the guest."""
        if self._rundir is None:
            raise VMError("VM not started")
        return self._rundir / "share"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> VM:
        """Boot and wait for the agent. On any failure everything is torn down."""
        if self._proc is not None:
            raise VMError("VM already started")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        self._buf = bytearray()
        self._busy = False
        if self.kernel is None:
            self.kernel = find_kernel()
        self._boot_image = boot_image(self.kernel)
        image = initramfs(self.kernel)
        if self.log_dir is None:
            self.log_dir = _new_log_dir()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._cmdlog = (self.log_dir / "commands.log").open("a", encoding="utf-8")
        # mkdtemp names are [a-z0-9_] only: safe on the kernel command line.
        self._rundir = Path(tempfile.mkdtemp(prefix="wgjit-vm-"))
        (self._rundir / "jobs").mkdir()
        (self._rundir / "share").mkdir()
        sock_path = self._rundir / "ctl.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(sock_path))
            listener.listen(1)
            self._spawn(image, sock_path)
            self._sock = self._accept(listener, t0 + self.boot_timeout)
        finally:
            listener.close()
        line = self._read_line(t0 + self.boot_timeout, "boot")
        if not line.startswith("wgjit-agent ready "):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)  # it powers off; then console.log is complete
            raise VMError(f"VM failed to boot: {line}{self._tail()}", self.log_dir)
        self.kernel_version = line.split()[-1]
        self.boot_seconds = time.monotonic() - t0
        self._log(f"# booted {self.kernel_version} in {self.boot_seconds:.1f}s, "
                  f"qemu pid {self._proc.pid}, run dir {self._rundir}\n")

    def _qemu_argv(self, image: Path, sock_path: Path) -> list[str]:
        assert self.kernel is not None and self._rundir is not None and self.log_dir
        # WGJIT_VM_VERBOSE=1 keeps the kernel's boot messages in console.log.
        quiet = "" if os.environ.get("WGJIT_VM_VERBOSE") else "quiet"
        append = " ".join([
            "console=ttyS0", quiet, "panic=-1", "rdinit=/init",
            f"wgjit.msize={P9_MSIZE}", f"wgjit.cache={P9_CACHE}",
            f"wgjit.rundir={self._rundir}", f"wgjit.hostname={self.hostname}",
            f"wgjit.modules={','.join(self.modules)}",
        ])
        argv = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(self.memory_mb),
            "-smp", str(self.cpus), "-nodefaults", "-no-user-config", "-nic", "none",
            "-display", "none", "-no-reboot",
            "-kernel", str(self._boot_image), "-initrd", str(image), "-append", append,
            "-serial", f"file:{self.log_dir / 'console.log'}",
            # multidevs=remap: / spans several host filesystems (/proc, /sys, ...).
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                       "readonly=on,multidevs=remap",
            "-virtfs", f"local,path={self._rundir},mount_tag=wgjitrun,"
                       "security_model=passthrough",
            "-chardev", f"socket,id=ctl,path={sock_path}",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=ctl,name=wgjit.ctl",
            *self.qemu_args,
        ]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def _spawn(self, image: Path, sock_path: Path) -> None:
        assert self.log_dir is not None
        if shutil.which(QEMU) is None:
            raise VMError(f"{QEMU} not found: apt-get install qemu-system-x86")
        with (self.log_dir / "qemu.log").open("wb") as qlog:
            self._proc = subprocess.Popen(
                self._qemu_argv(image, sock_path), stdin=subprocess.DEVNULL, stdout=qlog,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)  # only a prctl: safe between fork and exec

    def _accept(self, listener: socket.socket, deadline: float) -> socket.socket:
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
                conn.setblocking(False)
                return conn
            except TimeoutError:
                self._check_alive("boot")
                if time.monotonic() > deadline:
                    raise VMError("qemu did not connect its control port", self.log_dir) \
                        from None

    def close(self) -> None:
        """Power off (killing qemu if it does not stop) and remove everything temporary."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None and self._busy:
            proc.kill()
        if proc is not None and proc.poll() is None:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.setblocking(True)
                    self._sock.sendall(b"poweroff\n")
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None
        if self._cmdlog is not None:
            self._cmdlog.close()
            self._cmdlog = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    # -- commands ---------------------------------------------------------

    def run(self, argv: Sequence[str], *, cwd: str | Path = CHECKOUT, timeout: float = 300,
            env: Mapping[str, str] | None = None, check: bool = False,
            echo: bool | IO[str] | None = None) -> VMResult:
        """Run argv as root in the guest, in cwd, with BASE_ENV plus env; wait for it.

        stdin is /dev/null; a cwd that does not exist in the guest gives exit code 125.
        Returns the exit code and the interleaved stdout+stderr.
        check=True raises VMError on a non-zero exit. On timeout the VM is killed
        and VMTimeout raised (it carries the output so far). echo overrides the
        VM's echo setting for this command.
        """
        if not self.alive or self._sock is None or self._rundir is None:
            raise VMError("VM is not running", self.log_dir)
        if not argv:
            raise ValueError("empty argv")
        self._count += 1
        job_id = str(self._count)
        nonce = secrets.token_hex(16)
        script = self._rundir / "jobs" / f"{job_id}.sh"
        # The guest sees the host's tree at the same paths, so a relative cwd means the
        # same directory on both sides once made absolute here.
        cwd = Path(cwd).absolute()
        script.write_text(_job_script(argv, cwd, env))
        stream = self.echo if echo is None else echo
        out: IO[str] | None = sys.stdout if stream is True else (stream or None)
        self._log(f"$ {shlex.join(argv)}  # cwd={cwd}\n")
        t0 = time.monotonic()
        self._busy = True
        self._send(f"run {job_id} {nonce}\n".encode())
        try:
            output, rc = self._collect(f"{nonce}:{job_id}:".encode(), t0 + timeout, out)
        except VMTimeout:
            self._kill()
            raise
        finally:
            script.unlink(missing_ok=True)
        self._busy = False
        result = VMResult(rc, output, time.monotonic() - t0)
        self._log(f"# exit {rc} after {result.seconds:.1f}s\n")
        if check:
            result.check()
        return result

    def _collect(self, marker: bytes, deadline: float,
                 out: IO[str] | None) -> tuple[str, int]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text: list[str] = []
        # Held back so a marker split across reads is never echoed or returned.
        hold = len(marker) + 16
        pending = self._buf
        self._buf = bytearray()
        while True:
            at = pending.find(marker)
            if at >= 0:
                chunk, rest = pending[:at], pending[at + len(marker):]
                end = rest.find(b"\n")
                if end >= 0:
                    self._emit(decoder.decode(bytes(chunk), final=True), text, out)
                    self._buf = rest[end + 1:]
                    return "".join(text), int(rest[:end])
            elif len(pending) > hold:
                self._emit(decoder.decode(bytes(pending[:-hold])), text, out)
                del pending[:-hold]
            try:
                pending += self._recv(deadline)
            except VMTimeout as e:
                self._emit(decoder.decode(bytes(pending), final=True), text, out)
                raise VMTimeout(str(e.args[0]), "".join(text), self.log_dir) from None

    def _emit(self, s: str, text: list[str], out: IO[str] | None) -> None:
        if not s:
            return
        text.append(s)
        self._log(s)
        if out is not None:
            out.write(s)
            out.flush()

    def _log(self, s: str) -> None:
        if self._cmdlog is not None:
            self._cmdlog.write(s)
            self._cmdlog.flush()

    # -- control port -----------------------------------------------------

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.setblocking(True)
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise VMError(f"control port broken: {e}", self.log_dir) from e
        finally:
            self._sock.setblocking(False)

    def _recv(self, deadline: float) -> bytes:
        assert self._sock is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMTimeout("timed out", "", self.log_dir)
            ready, _, _ = select.select([self._sock], [], [], min(left, 0.5))
            if ready:
                try:
                    data = self._sock.recv(65536)
                except BlockingIOError:
                    continue
                if data:
                    return data
                self._check_alive("a command")
                raise VMError("control port closed by the VM", self.log_dir)
            self._check_alive("a command")

    def _read_line(self, deadline: float, during: str) -> str:
        while b"\n" not in self._buf:
            try:
                self._buf += self._recv(deadline)
            except VMTimeout:
                self._kill()
                raise VMError(f"VM did not finish {during} in time", self.log_dir) from None
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode("utf-8", "replace").strip()

    def _check_alive(self, during: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(f"qemu exited ({self._proc.returncode}) during {during}: "
                          f"{self._tail()}", self.log_dir)

    def _tail(self) -> str:
        parts = []
        for name in ("qemu.log", "console.log"):
            with contextlib.suppress(OSError):
                lines = (self.log_dir / name).read_text(errors="replace").splitlines()  # type: ignore[operator]
                if lines:
                    parts.append(f"\n--- {name} (tail) ---\n" + "\n".join(lines[-15:]))
        return "".join(parts)


def _job_script(argv: Sequence[str], cwd: str | Path, env: Mapping[str, str] | None) -> str:
    lines = []
    for key, value in {**BASE_ENV, **(env or {})}.items():
        if not key.isidentifier():
            raise ValueError(f"bad environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def run_in_vm(argv: Sequence[str], *, cwd: str | Path = CHECKOUT, timeout: float = 300,
              env: Mapping[str, str] | None = None, memory_mb: int = 1024,
              echo: bool | IO[str] = False, log_dir: str | Path | None = None) -> VMResult:
    """Boot a VM, run argv as root in it (see VM.run), power off, return the result."""
    with VM(memory_mb=memory_mb, echo=echo, log_dir=log_dir) as vm:
        return vm.run(argv, cwd=cwd, timeout=timeout, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.vm.quick [--memory MB] [--timeout S] [--cwd DIR] [--quiet] -- CMD`:
    the exit code of CMD."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lab.vm.quick",
        description="Boot a quick VM (the host's root, Debian kernel, kernel WireGuard) "
                    "and run CMD in it as root.")
    parser.add_argument("--memory", type=int, default=1024, metavar="MB")
    parser.add_argument("--timeout", type=float, default=300, metavar="SECONDS")
    parser.add_argument("--cwd", default=os.getcwd())
    parser.add_argument("--quiet", action="store_true", help="do not stream the output")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    with VM(memory_mb=args.memory, echo=not args.quiet) as vm:
        print(f"[vm] booted {vm.kernel_version} in {vm.boot_seconds:.1f}s; logs {vm.log_dir}",
              file=sys.stderr)
        try:
            result = vm.run(cmd, cwd=args.cwd, timeout=args.timeout)
        except VMTimeout as e:
            print(f"[vm] {e}", file=sys.stderr)
            return 124
    print(f"[vm] exit {result.returncode} after {result.seconds:.1f}s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
