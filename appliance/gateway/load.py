"""When is the gateway under load, so that only initiations with a valid mac2 count?

Under load is a statement about time: verification (two X25519 and two AEAD
opens an initiation, or one of each when the known-key filter refuses the key
after the first: intake.py) no longer keeps up with the initiations that need it, so
a queue grows without bound and a real client's initiation waits behind it, or
is lost when the capture's socket overflows. Below that, a cookie round (a
5 s REKEY_TIMEOUT retry for the client) costs far more than the queue: at 90%
of the capture thread's time a queue of fixed-cost work waits ~4.5
verifications on average. So the signal judges time, not packet counts:

- busy: over each WINDOW (0.25 s), the share of the clock the capture thread spent
  handling what it read (recv returning to the read's end), less the
  verifications of keys it expects (gate.py). A thread that
  keeps up waits in recv between reads; one that does not never waits, and
  its share tends to 1. BUSY_ENTER or more starts the state. Wall time on
  purpose: on a shared machine the process gets a share of a core, and
  capacity is what it gets done per second of the clock;
- demand, to hold it: once under load, cookie replies (30-40 us) replace the
  verifications, the thread idles again, and the busy share says nothing. So
  the state holds while the initiations that need verification (passed mac1,
  the served-endpoint check and the per-source limit, verified or answered
  with a cookie), times the measured wall time of one verification, would
  still take STAY_DEMAND of the window. The cost is an EWMA of real
  verifications, each as far as it went (daemon.py times _verify whole): in a
  flood of random keys most stop at the filter after one X25519, so the cost
  and the demand it gives fall by about half, as the capacity rose (a full
  verification 92-105 us on an idle core, the first half 50-54 us,
  bench/handshake.py; 400-600 us per initiation on the CI machine kind at
  load 6-8, bench/flood.py).
  Without holding, the state lapsed a second into a flood and the next
  window found the thread saturated again;
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
- lag: every read of a window found frames that had waited LAG_ENTER or more in
  the capture's buffer (capture.py: the kernel's receive stamp of the newest
  frame read). The busy share cannot see all of it: time spent reading and
  parsing frames, and waiting for the GIL, is not "handling", so a thread that
  had fallen behind read 0.8-0.9 busy. In a bench flood (5,000/s of random
  keys from forged sources, bench/flood.py) the gateway never went under load
  while its backlog grew by 0.75 s a second: the tenth client, 2.7 s after
  the first, waited 2.2 s behind it, and the 8 MB buffer (about 2 s of
  such a flood) would next have dropped clients' initiations, costing them
  retries with no cookie to carry. The minimum over the window, so a pause
  of the thread (130 ms at load 6-8) that it then catches up on does not
  count; half a second, because until the backlog grows past several
  seconds waiting in it is cheaper for a client than a cookie's 5 s round.
Busy and lag enter the state only while verification is at least ENTER_DEMAND
of the window (demand, above): what the state sheds is verification, and a
thread kept busy by something else gains nothing from it while real clients
lose a 5 s round each. In a bench replay flood (5,000/s of one capture from
one address, bench/flood.py) the thread went 0.95 busy answering the source
over its limit with cookies (which it gets under load too) at a demand of
0.025, and a client that came then waited 5.6 s instead of 20 ms.
The queue fill, busy-with-demand or lag sets the gateway under load for
UNDER_LOAD_AFTER seconds (1 s, as wireguard-go), so the state does not flap
with every read.

This replaced "one read held 128 initiations needing DH". At 1,000/s from
1,000 forged sources on a loaded 2-core machine (load 5-8) a 130 ms pause of
the capture thread alone leaves 128 queued, though the thread keeps up on
average (without cookies the clients' p99 was 48 ms in one run): the gateway
went under load a second at a time and real clients arriving then took the
cookie path (p99 5.2 s, bench/flood.py). With this signal no cookie was sent
in that flood. Choices that measurements drove (bench/flood.py, 10-20
clients a row, load 4-9):
- entering on demand >= 0.8 instead of the busy share: the wall time of a
  verification on that machine (400-600 us, GIL and scheduler included) made
  1,000/s forged read as 0.5-0.6 and hold the state once in it; all 20
  clients of the run got a cookie;
- a 0.5 s window: at 5,000/s forged the state came ~1.6 s into the flood
  (3,595 verified first); clients whose first initiation came meanwhile lost
  it to capture drops, got no cookie and needed two retries (p99 11 s, as
  against 5.6 s with 0.25 s). A 130 ms pause inside a 0.25 s window at a
  busy share of 0.5-0.6 gives ~0.7, short of BUSY_ENTER;
- holding at demand 0.75: a flood still needing more than the thread's time
  keeps the state (5,000/s: 1.3-2.6); 1,000/s forged (0.4-0.6) lets it go.

Modes: "auto" (the signals decide), "always" (every initiation needs mac2: the
lab test of the cookie path, or an operator expecting an attack), "off" (never
send cookies: the old behaviour, for benchmarks side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MODES = ("auto", "always", "off")
WINDOW = 0.25  # seconds over which the busy share and demand are measured
BUSY_ENTER = 0.95  # of the window the capture thread spent handling reads: it no longer waits
STAY_DEMAND = 0.75  # of the window verification would take: hold the state
ENTER_DEMAND = 0.5  # ...and at least this for busy or lag to enter it
VERIFY_COST_START = 400e-6  # s, a verification on a loaded CI machine, until measured
COST_PRIOR = 50  # verifications the start value is worth: it gives way to measurement
COST_WEIGHT = 0.25  # of a window's average in the EWMA, once COST_PRIOR were measured in it
QUEUE_FILL = 0.5  # of the unknown lane's places: enter
QUEUE_LEAVE = 0.125  # ...and stay until below this
LAG_ENTER = 0.5  # s every read of a window found frames waiting: the reader fell behind
UNDER_LOAD_AFTER = 1.0


class LoadSignal:
    def __init__(self, mode: str = "auto", *, clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in MODES:
            raise ValueError(f"cookie mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self._clock = clock
        self._until = float("-inf")
        self.verify_cost = VERIFY_COST_START  # s of wall time per verification (EWMA)
        self.busy = 0.0  # share of the last full window spent handling reads
        self.demand = 0.0  # share of it verifying all that needed it would have taken
        self.lag = 0.0  # least capture lag of the reads in the last full window, s
        self._lag_min = float("inf")  # ...of this window's reads
        self._window_start = clock()
        self._busy_time = 0.0  # handling reads, since _window_start
        self._arrived = 0  # initiations needing verification since _window_start
        self._verified = 0  # ...of which verified,
        self._verify_time = 0.0  # ...taking this many seconds
        self._samples = 0  # verifications measured in all

    def verified(self, seconds: float, known: bool = False) -> None:
        """Report one verification (Diffie-Hellman work) and its wall time; `known`: it
        was fresh and from a key the gateway expects, a client's work and not load
        (gate.py), so its time does not count as busy."""
        self._verified += 1
        self._verify_time += seconds
        if known:
            self._busy_time -= seconds

    def observe(self, backlog: int, queue_fill: float, busy: float = 0.0,
                lag: float = 0.0) -> None:
        """Report a read that held `backlog` initiations needing verification and took
        `busy` seconds to handle, the age of its newest frame (`lag`, s, 0 for an
        empty read), and the unknown lane's fill (0..1)."""
        now = self._clock()
        self._arrived += backlog
        self._busy_time += busy
        self._lag_min = min(self._lag_min, lag)
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
        self.busy = self._busy_time / elapsed
        self.demand = self._arrived * self.verify_cost / elapsed
        self.lag = self._lag_min
        behind = self.busy >= BUSY_ENTER or self.lag >= LAG_ENTER
        if (behind and self.demand >= ENTER_DEMAND) or \
                (now < self._until and self.demand >= STAY_DEMAND):
            self._until = now + UNDER_LOAD_AFTER
        self._window_start, self._busy_time, self._lag_min = now, 0.0, float("inf")
        self._arrived, self._verified, self._verify_time = 0, 0, 0.0

    @property
    def under_load(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self._clock() < self._until
