"""When is the gateway under load, so that only initiations with a valid mac2 count?

Two signals (WireGuard watches one, its handshake queue, at an eighth full):
- verification: one read of the capture (it takes whatever is queued, up to
  256 frames per interface) holds VERIFY_BACKLOG initiations that need the
  Diffie-Hellman work, i.e. that passed mac1, the served-endpoint check and
  the per-source limit: ~14 ms of X25519 at ~110 us each, queued while the
  previous read was being verified, so arrivals are outpacing verification.
  Counting frames instead would let one source's flood, which the per-source
  limit already sheds for ~10 us a packet, switch every real client to the
  cookie path (one retry, 5 s);
- lookups: the lane of keys the gateway does not know (admission.py) is
  QUEUE_FILL full. Not the known lane: a herd of real clients after an outage
  (bench/herd.py, 200 at once) fills it legitimately, and sending them cookies
  would cost each a 5 s retry; the known lane protects itself by its budget
  and by taking turns.
Either one sets the gateway under load for UNDER_LOAD_AFTER seconds (1 s, as
wireguard-go), so the state does not flap with every read. Once under load,
the state also holds
- while initiations needing verification or a cookie keep arriving at
  STAY_RATE a second or more (about half what one core verifies: 9,154-9,796/s
  idle, bench/handshake.py). Cookie replies are what keeps them from being
  verified, so without this the state lapsed a second into a flood and the
  next reads found the backlog again;
- while the unknown lane is at least QUEUE_LEAVE full: under load it drains at
  the registry's pace, and leaving as soon as it dropped below QUEUE_FILL let
  a flood from many sources (bench/flood.py, 2,000/s from 1,000 spoofed
  endpoints, no key filter) refill it within a tenth of a second, each cycle
  spending the registry's whole token budget on random keys.
A flood well below what the gateway verifies (1,000/s from 250 forged
addresses) does not start the state: real clients are then served at once,
with no cookie round (bench/flood.py).

Modes: "auto" (the signals decide), "always" (every initiation needs mac2: the
lab test of the cookie path, or an operator expecting an attack), "off" (never
send cookies: the old behaviour, for benchmarks side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MODES = ("auto", "always", "off")
VERIFY_BACKLOG = 128  # initiations needing DH found queued at one read (half a full read)
QUEUE_FILL = 0.5  # of the unknown lane's places: enter
QUEUE_LEAVE = 0.125  # ...and stay until below this
UNDER_LOAD_AFTER = 1.0
STAY_RATE = 4000.0
WINDOW = 0.5  # seconds over which that rate is measured


class LoadSignal:
    def __init__(self, mode: str = "auto", *, clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"cookie mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self._clock = clock
        self._until = float("-inf")
        self._window_start = clock()
        self._window = 0  # initiations counted since _window_start

    def observe(self, backlog: int, queue_fill: float) -> None:
        """Report a read that held `backlog` initiations needing DH, and the unknown
        lane's fill (0..1)."""
        now = self._clock()
        self._window += backlog
        elapsed = now - self._window_start
        if elapsed >= WINDOW:
            if now < self._until and self._window >= STAY_RATE * elapsed:
                self._until = now + UNDER_LOAD_AFTER
            self._window, self._window_start = 0, now
        if backlog >= VERIFY_BACKLOG or queue_fill >= QUEUE_FILL or (
                now < self._until and queue_fill >= QUEUE_LEAVE):
            self._until = now + UNDER_LOAD_AFTER

    @property
    def under_load(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self._clock() < self._until
