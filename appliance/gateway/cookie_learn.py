"""Learn the cookies the data plane hands out, so that a client holds one that both accept.

Why: under a flood the gateway's data plane (wireguard-go, or the kernel) is under
load as well as the daemon: it sees the same initiations and answers those
without a valid mac2 with cookie replies of its own (whitepaper 5.4.7). A client
keeps one cookie, the last that opened (wireguard-go's initiator side), so when
both answered its try, its next try carries a mac2 that at most one of the two
accepts: the daemon needs a valid mac2 to verify and install, the data plane
needs one to answer the re-injected copy. That cost two or more 5 s rounds at
20,000/s from forged sources (README, "Two cookie issuers").

The data plane's cookie is as good a proof of the source address as ours: tau
is a MAC of the address under a secret only the gateway's data plane knows, and
it travels encrypted to that address alone, so only a sender who can receive
there can put it in mac2. Its reply is keyed by what the daemon also knows,
HASH(LABEL_COOKIE || S_pub_m) and the mac1 of the initiation it answers, so the
daemon sees it leave (capture.py, cookie_replies) and opens it:

    msg.cookie = XAEAD(HASH(LABEL_COOKIE || S_pub_m), msg.nonce, tau, M)
    M = the answered initiation's mac1, found by msg.receiver (= its sender index)

and from then on a mac2 that is valid under tau for that address proves the
source to the daemon too (gate.py). The rule that follows: while the data
plane is issuing cookies the daemon issues none. The data plane under load
answers every initiation lacking its mac2 before any other check (in
wireguard-go before its rate limiter and its peer lookup), so the client gets
a cookie anyway, and the data plane's is the only one that both accept: the
re-injected copy carries the client's mac2 unchanged. One issuer means one
cookie round. Once the data plane stops (ISSUING_FOR after its last reply)
the daemon answers again with its own, which the data plane, not under load,
does not check.

The race: the daemon judges a client's initiation when it reads it, the data
plane's reply to it comes later. At the moment the data plane starts issuing
(the first of its replies not yet seen), the daemon may still send its own;
its reply leaves first (the capture reads the copy before wireguard-go has
dequeued the original), the client keeps the last to arrive, the data
plane's, and the daemon accepts that one too. While the data plane is
issuing, the daemon withholds its reply but remembers the initiation: if no
reply of the data plane's to it has left after OWED_AFTER (its queue was
full and it dropped the initiation, or it just left load), the daemon sends
its own after all (owed()), so no try goes unanswered. Late is safe: should
the data plane's reply still come, it arrives last and the client keeps it.

Lazily: a reply is only stored (nonce, ciphertext, the mac1 it answers) until
an initiation from its destination arrives with a mac2 the daemon's own cookie
does not explain; then it is opened once and tau kept. Under a forged flood
the data plane answers every forged source, and none of them comes back.
Costs per call (Python, one core at load ~1): saw_initiation 3 us; saw_reply
1 us for one of our own, 6 us for the data plane's; mac2_valid 9 us the first
time (the open), 4 us after. Against 30-40 us for a cookie reply of our own
(gate.py), which the data plane's replies now spare.

Bounded: PENDING_MAX initiations by sender index (and as many replies waiting
for theirs, and withheld initiations), LEARNED_MAX sources (the latest reply
each: a data plane's tau for one address stays the same until its secret
changes): ~250-300 bytes an entry, about 20 MB with every table full
(tracemalloc). A flood from more forged sources than LEARNED_MAX within a
client's 5 s retry pushes the client's entry out, and it pays a second round.

Re-injection uses the learned cookie too (provision.py): under load the data
plane refuses the re-injected copy of an initiation whose mac2 is not its own
(the client's first try carries none), sends the client a cookie and leaves
the handshake to a 5 s retry or the daemon's fall-back to role inversion; the
copy with its mac2 made under the data plane's tau for the client's address is
answered at once. In a 10,000-client herd wireguard-go went under load and
answered 3% of the re-injected copies; the rest fell back.

Bytes, addresses and time in; no I/O. The capture thread is the only caller but
for cookie(), which the lookup workers call as they re-inject: a lock guards
the learned table.
"""

from __future__ import annotations

import hmac
import struct
import threading
import time
from collections.abc import Callable

from nacl.exceptions import CryptoError

from appliance.gateway.cookie import (
    COOKIE_REFRESH_TIME,
    MESSAGE_COOKIE_REPLY_SIZE,
    OFFSET_COOKIE,
    OFFSET_NONCE,
    OFFSET_RECEIVER,
    XAEAD_DECRYPT,
    cookie_key,
    source_bytes,
)
from appliance.gateway.handshake import (
    MAC,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    OFFSET_MAC1,
    OFFSET_MAC2,
    OFFSET_SENDER,
)

# An initiation waits this long for the data plane's reply to it (and a reply, read
# before its initiation on the other socket, for the initiation). wireguard-go
# answers from its handshake queue (1,024 places) within milliseconds to a few
# hundred when the daemon's capture lags behind its reply socket.
PENDING_FOR = 2.0
PENDING_MAX = 16384  # ~0.8 s of a 20,000/s flood
LEARNED_MAX = 32768  # sources
# The data plane counts as issuing cookies this long after its last reply was seen:
# wireguard-go stays under load for UnderLoadAfterTime (1 s) after its handshake
# queue was last 1/8 full, and answers every initiation without its mac2 meanwhile.
ISSUING_FOR = 1.0
# A withheld initiation the data plane has not answered within this long gets the
# daemon's cookie after all. Measured in the lab (tests/lab/test_dataplane_cookies.py,
# wireguard-go under load from bursts of 4,000/s, 2-core machine shared with other
# work): wireguard-go's reply was seen leaving 3-5 ms (p50) and 10-26 ms (p99) after
# the daemon read the initiation, never more than 26 ms in ~16,000 replies. Four
# times that: an answer the data plane gives is not doubled, and one it does not
# give costs the client 0.1 s, not a 5 s round.
OWED_AFTER = 0.1


class CookieLearner:
    """What the data plane's cookie replies taught the daemon, per source address."""

    def __init__(self, responder_public: bytes, is_own: Callable[[bytes], bool], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """is_own(reply): the daemon made this reply itself (CookieResponder.is_own)."""
        self._key = cookie_key(responder_public)
        self._is_own = is_own
        self._clock = clock
        # sender index -> (A_m, mac1, seen at): initiations the data plane may answer
        self._initiations: dict[int, tuple[bytes, bytes, float]] = {}
        # receiver index -> (A_m, reply, seen at): replies read before their initiation
        self._orphans: dict[int, tuple[bytes, bytes, float]] = {}
        # A_m -> (tau, or the reply and the mac1 it answers, to open when needed; at)
        self._learned: dict[bytes, tuple[bytes, bytes, float]] = {}
        self._learned_lock = threading.Lock()
        # sender index -> (token, source, withheld at): initiations not answered yet
        self._owed: dict[int, tuple[object, bytes, float]] = {}
        self._last_reply = float("-inf")
        self.learned = 0  # replies from the data plane matched to their initiation
        self.used = 0  # initiations proven by a learned cookie

    @property
    def issuing(self) -> bool:
        """Has the data plane sent a cookie reply within the last ISSUING_FOR seconds?"""
        return self._clock() - self._last_reply < ISSUING_FOR

    def saw_initiation(self, packet: bytes, ip: str, port: int) -> None:
        """An initiation (mac1 checked) came from ip:port: remember its mac1."""
        (index,) = struct.unpack_from("<I", packet, OFFSET_SENDER)
        source = source_bytes(ip, port)
        mac1 = packet[OFFSET_MAC1:OFFSET_MAC2]
        now = self._clock()
        orphan = self._orphans.pop(index, None)
        if orphan is not None and orphan[0] == source and now - orphan[2] < PENDING_FOR:
            self._learn(source, orphan[1], mac1, orphan[2])
            return
        _put(self._initiations, index, (source, mac1, now), PENDING_MAX)

    def saw_reply(self, reply: bytes, ip: str, port: int) -> None:
        """A cookie reply left this host for ip:port (capture.py, outgoing)."""
        if len(reply) != MESSAGE_COOKIE_REPLY_SIZE or reply[0] != MESSAGE_COOKIE_REPLY_TYPE \
                or self._is_own(reply):
            return
        now = self._clock()
        self._last_reply = now
        (index,) = struct.unpack_from("<I", reply, OFFSET_RECEIVER)
        source = source_bytes(ip, port)
        pending = self._initiations.get(index)
        owed = self._owed.get(index)
        if owed is not None and owed[1] == source:
            del self._owed[index]
        if pending is None or pending[0] != source or now - pending[2] >= PENDING_FOR:
            _put(self._orphans, index, (source, reply, now), PENDING_MAX)
            return
        # Kept: the same initiation re-injected is answered with the same mac1.
        self._learn(source, reply, pending[1], now)

    def withhold(self, packet: bytes, ip: str, port: int, token: object) -> None:
        """The daemon did not answer this initiation (saw_initiation'd just before),
        counting on the data plane; `token` comes back from owed() if it does not."""
        (index,) = struct.unpack_from("<I", packet, OFFSET_SENDER)
        source = source_bytes(ip, port)
        pending = self._initiations.get(index)
        if pending is None or pending[0] != source:  # its reply was read already
            return
        self._owed.pop(index, None)
        _put(self._owed, index, (token, source, self._clock()), PENDING_MAX)

    def owed(self) -> list[object]:
        """Tokens of withheld initiations the data plane has left unanswered for
        OWED_AFTER seconds: the daemon answers them itself."""
        due = self._clock() - OWED_AFTER
        out = []
        while self._owed:
            index = next(iter(self._owed))
            token, _, at = self._owed[index]
            if at > due:
                break
            del self._owed[index]
            out.append(token)
        return out

    def _learn(self, source: bytes, reply: bytes, mac1: bytes, at: float) -> None:
        self.learned += 1
        with self._learned_lock:
            self._learned.pop(source, None)  # to the end: the newest are kept longest
            _put(self._learned, source, (b"", reply + mac1, at), LEARNED_MAX)

    def cookie(self, ip: str, port: int) -> bytes | None:
        """The data plane's current tau for ip:port, if it sent that source one."""
        source = source_bytes(ip, port)
        with self._learned_lock:
            entry = self._learned.get(source)
            if entry is None:
                return None
            tau, sealed, at = entry
            if self._clock() - at >= COOKIE_REFRESH_TIME:  # its secret has changed since
                del self._learned[source]
                return None
            if not tau:
                reply = sealed[:MESSAGE_COOKIE_REPLY_SIZE]
                mac1 = sealed[MESSAGE_COOKIE_REPLY_SIZE:]
                try:
                    tau = XAEAD_DECRYPT(self._key, reply[OFFSET_NONCE:OFFSET_COOKIE],
                                        reply[OFFSET_COOKIE:], mac1)
                except CryptoError:  # not made with our public key and that mac1
                    del self._learned[source]
                    return None
                self._learned[source] = (tau, b"", at)
            return tau

    def mac2_valid(self, initiation: bytes, ip: str, port: int) -> bool:
        """Is the initiation's mac2 valid under the data plane's cookie for ip:port?"""
        mac2 = initiation[OFFSET_MAC2:OFFSET_MAC2 + MAC_SIZE]
        if not any(mac2):
            return False
        tau = self.cookie(ip, port)
        if tau is None or not hmac.compare_digest(MAC(tau, initiation[:OFFSET_MAC2]), mac2):
            return False
        self.used += 1
        return True

    def __len__(self) -> int:
        return len(self._learned)


def _put(table: dict, key: object, value: object, limit: int) -> None:
    """Insert, dropping the oldest entry (insertion order) past `limit`."""
    table[key] = value
    if len(table) > limit:
        del table[next(iter(table))]
