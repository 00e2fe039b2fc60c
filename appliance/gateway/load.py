"""When is the gateway under load, so that only initiations with a valid mac2 count?

Under load is a statement about time: verification (two X25519 and two AEAD
opens an initiation) can no longer keep up with the initiations that need it,
so a real client's would wait behind the queue longer than a cookie round. The
signal therefore judges the verification work that arrived against the time
the capture thread had for it, rather than counting packets:

- demand: over each WINDOW, the initiations that needed verification
  (passed mac1, the served-endpoint check and the per-source limit, whether
  verified or answered with a cookie) times the measured wall time of one
  verification, divided by the window's length. 1.0 means the capture thread
  would do nothing but verify. The cost is an EWMA of the window averages of
  real verifications, in wall time on purpose: on a shared machine the
  process gets a share of a core, and capacity is what it verifies per second
  of the clock, not per second of CPU (~110 us a verification on an idle
  core, bench/handshake.py; 380-450 us on the CI machine kind at load ~6).
  Demand ENTER_DEMAND or more starts the state; once in it, it holds while
  demand stays at STAY_DEMAND or more (cookie replies are what keeps the
  flood from being verified, so without holding the state lapsed a second
  into a flood and the next window found it again).
  This replaced "one read held 128 initiations needing DH". At 1,000/s from
  1,000 forged sources on a loaded 2-core machine (load ~5-8), a scheduling
  pause of the capture thread of 130 ms alone left 128 queued, although
  verification used well under half the thread's time on average: the
  gateway went under load a second at a time, and real clients arriving then
  took the cookie path, a 5 s REKEY_TIMEOUT retry (p99 5.2 s, bench/flood.py).
  Over a 0.5 s window such a pause moves a quarter of the window's arrivals
  at most, not the average;
- lookups: the lane of keys the gateway does not know (admission.py) is
  QUEUE_FILL full. Not the known lane: a herd of real clients after an outage
  (bench/herd.py, 200 at once) fills it legitimately, and sending them cookies
  would cost each a 5 s retry; the known lane protects itself by its budget
  and by taking turns. Once under load the state holds while the unknown lane
  is at least QUEUE_LEAVE full: under load it drains at the registry's pace,
  and leaving as soon as it dropped below QUEUE_FILL let a flood from many
  sources (bench/flood.py, 2,000/s from 1,000 spoofed endpoints, no key
  filter) refill it within a tenth of a second, each cycle spending the
  registry's whole token budget on random keys.
Either one sets the gateway under load for UNDER_LOAD_AFTER seconds (1 s, as
wireguard-go), so the state does not flap with every read.

Modes: "auto" (the signals decide), "always" (every initiation needs mac2: the
lab test of the cookie path, or an operator expecting an attack), "off" (never
send cookies: the old behaviour, for benchmarks side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MODES = ("auto", "always", "off")
WINDOW = 0.5  # seconds over which demand is measured
ENTER_DEMAND = 0.8  # of the capture thread's time: above it, any jitter grows the queue
STAY_DEMAND = 0.5
VERIFY_COST_START = 400e-6  # s, a verification on a loaded CI machine, until measured
COST_PRIOR = 50  # verifications the start value is worth: it gives way to measurement
COST_WEIGHT = 0.25  # of a window's average in the EWMA, once COST_PRIOR were measured in it
QUEUE_FILL = 0.5  # of the unknown lane's places: enter
QUEUE_LEAVE = 0.125  # ...and stay until below this
UNDER_LOAD_AFTER = 1.0


class LoadSignal:
    def __init__(self, mode: str = "auto", *, clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"cookie mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self._clock = clock
        self._until = float("-inf")
        self.verify_cost = VERIFY_COST_START  # s of wall time per verification (EWMA)
        self.demand = 0.0  # of the last full window
        self._window_start = clock()
        self._arrived = 0  # initiations needing verification since _window_start
        self._verified = 0  # ...of which verified,
        self._verify_time = 0.0  # ...taking this many seconds
        self._samples = 0  # verifications measured in all

    def verified(self, seconds: float) -> None:
        """Report one verification (Diffie-Hellman work) and its wall time."""
        self._verified += 1
        self._verify_time += seconds

    def observe(self, backlog: int, queue_fill: float) -> None:
        """Report a read that held `backlog` initiations needing verification, and the
        unknown lane's fill (0..1)."""
        now = self._clock()
        self._arrived += backlog
        elapsed = now - self._window_start
        if elapsed >= WINDOW:
            self._end_window(now, elapsed)
        if queue_fill >= QUEUE_FILL or (now < self._until and queue_fill >= QUEUE_LEAVE):
            self._until = now + UNDER_LOAD_AFTER

    def _end_window(self, now: float, elapsed: float) -> None:
        if self._verified:
            # A running mean at first (the start value counting as COST_PRIOR), then an
            # EWMA in which a window of a few verifications (under load: only those
            # with mac2) weighs little, so one preempted sample cannot set the cost.
            self._samples += self._verified
            weight = max(self._verified / (self._samples + COST_PRIOR),
                         COST_WEIGHT * min(1.0, self._verified / COST_PRIOR))
            self.verify_cost += weight * (self._verify_time / self._verified - self.verify_cost)
        self.demand = self._arrived * self.verify_cost / elapsed
        if self.demand >= ENTER_DEMAND or (now < self._until and self.demand >= STAY_DEMAND):
            self._until = now + UNDER_LOAD_AFTER
        self._window_start, self._arrived, self._verified, self._verify_time = now, 0, 0, 0.0

    @property
    def under_load(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self._clock() < self._until
