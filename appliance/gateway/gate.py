"""What the daemon does with a captured initiation before any Diffie-Hellman work.

The cheap checks, in the order that keeps a flood cheap. Costs per packet on
the CI machine kind with other work running (load average ~6): mac1 2-4 us,
the per-source limit 2-3 us, an absent mac2 under 1 us, building a cookie
reply 30-40 us, a verification (two X25519, two AEAD opens) 380-450 us
(92-105 us on an idle core, bench/handshake.py), or half of it for a key the
fresh known-key filter refuses after the first X25519 (50-54 us idle: intake.py,
unknown_key):

1. header and mac1 (handshake.py): junk and messages for another key;
2. an installed peer's own endpoint (served.py): the data plane's business;
3. a valid mac2 (cookie.py), made with our cookie or with one the data plane
   gave that source (cookie_learn.py), proves the source address: such
   initiations meet the per-source limit of proven sources and are verified;
4. without one, the per-source limit of unproven sources (sourcelimit.py).
   A source over its limit gets a cookie reply rather than silence: the
   limit is keyed on an address anyone can forge, so a forger sending 20/s
   "from" a real client's address would otherwise lock it out. With the
   cookie the client proves its address and moves to the proven buckets,
   which forged packets cannot reach.
5. under load (load.py), an unproven initiation gets a cookie reply and no
   verification (whitepaper 5.4.7).
In 4 and 5 the daemon withholds its cookie reply while the data plane is
issuing its own (cookie_learn.py: a client holding the data plane's cookie
gets through both, one holding ours only through the daemon).

Initiations reaching 4 and 5 within the limit are the verification backlog
the load signal watches, whether they were verified or answered with a
cookie, so the state holds for as long as a flood from many sources lasts;
one source over its limit is shed at step 4 and does not count. Nor does a
verified initiation the daemon then finds fresh and from a key it expects
(`verified_known`): only the key's holder can make one, so it is a client's
work, not a flood's. Counted, a herd of 1,000 known clients in one second sent
each of them to the cookie path, a 5 s retry apiece: all installed after
11.9 s instead of 1.7 s (bench/herd.py).

Bytes, addresses and time in, a verdict out: no I/O. Not thread-safe: the
capture thread is its only caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from appliance.gateway.cookie import CookieResponder
from appliance.gateway.cookie_learn import CookieLearner
from appliance.gateway.handshake import InitiationError, Responder
from appliance.gateway.load import LoadSignal
from appliance.gateway.sourcelimit import SourceLimiter

VERIFY, COOKIE, DROP = "verify", "cookie", "drop"
WITHHELD = "withheld"  # would have been COOKIE, but the data plane is answering it


class Verdict(NamedTuple):
    action: str  # VERIFY, COOKIE (reply with a cookie, then drop), WITHHELD or DROP
    reason: str = ""  # the drop reason for COOKIE and DROP


class InitiationGate:
    def __init__(self, responder: Responder, cookies: CookieResponder, load: LoadSignal,
                 limiters: tuple[SourceLimiter, SourceLimiter] | None,
                 served: Callable[[str], bool], learner: CookieLearner | None = None) -> None:
        """limiters: (unproven, proven) per-source limits, or None for no limit.
        served(endpoint): is an installed peer served at this host:port?
        learner: the data plane's cookies (None: not watched)."""
        self.responder = responder
        self.cookies = cookies
        self.learner = learner
        self.load = load
        self.limiters = limiters
        self.served = served
        self.backlog = 0  # initiations needing verification or a cookie, this read
        self._known = False  # verified_known() was called for the current verification

    def judge(self, packet: bytes, ip: str, port: int, endpoint: str) -> Verdict:
        try:
            self.responder.check_header(packet)
        except InitiationError as e:
            return Verdict(DROP, e.reason)
        if not self.responder.mac1_valid(packet):
            return Verdict(DROP, "mac1")
        if self.served(endpoint):
            return Verdict(DROP, "served_endpoint")
        learner = self.learner
        if learner is not None:
            learner.saw_initiation(packet, ip, port)
        if self.cookies.mac2_valid(packet, ip, port) or (
                learner is not None and learner.mac2_valid(packet, ip, port)):
            if self.limiters is not None and not self.limiters[1].allow(ip):
                return Verdict(DROP, "ratelimited")
            self.backlog += 1
            return Verdict(VERIFY)
        cookies_on = self.load.mode != "off"
        if self.limiters is not None and not self.limiters[0].allow(ip):
            return self._cookie("ratelimited") if cookies_on else Verdict(DROP, "ratelimited")
        self.backlog += 1
        if self.load.under_load:
            return self._cookie("mac2")
        return Verdict(VERIFY)

    def _cookie(self, reason: str) -> Verdict:
        """COOKIE, or WITHHELD while the data plane issues cookies (cookie_learn.py)."""
        if self.learner is not None and self.learner.issuing:
            return Verdict(WITHHELD, reason)
        return Verdict(COOKIE, reason)

    def verified_known(self) -> None:
        """The initiation just verified is fresh and from an expected key: not load."""
        self.backlog = max(0, self.backlog - 1)
        self._known = True

    def verified(self, seconds: float) -> None:
        """A verification (and its admission) took `seconds` of wall time."""
        self.load.verified(seconds, known=self._known)
        self._known = False

    def end_of_read(self, queue_fill: float, busy: float = 0.0, lag: float = 0.0) -> None:
        """A read of the capture is done, its datagrams handled in `busy` seconds, its
        newest frame `lag` seconds old: report that and its backlog to the load signal."""
        self.load.observe(self.backlog, queue_fill, busy, lag)
        self.backlog = 0
