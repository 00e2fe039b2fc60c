"""Cookies under load: whitepaper section 5.4.7 ("Under Load: Cookie Reply Message").

An initiation passes mac1 for anyone who knows the responder's public key, and
its source address may be forged. Under load the responder therefore answers
an initiation whose mac2 is not valid with a cookie reply instead of doing the
Diffie-Hellman work, and processes only initiations carrying a valid mac2. The
cookie is a MAC of the source address under a secret that only the responder
knows, so a valid mac2 proves that the sender can receive at that address: a
spoofed flood costs the gateway one mac1 check and one 64-byte reply each.

The responder's side, in the whitepaper's terms:

    R_m       a random secret, changed every two minutes
    tau       = MAC(R_m, A_m), A_m the initiation's source IP address || UDP port
    msg.type = 3, msg.reserved = 0^3, msg.receiver = I_i (the initiation's sender index)
    msg.nonce = 24 random bytes
    msg.cookie = XAEAD(HASH(LABEL_COOKIE || S_pub_m), msg.nonce, tau, M)
              with M the mac1 of the initiation being answered
    mac2 (in the initiator's next message) = MAC(tau, msg[0:132])

The whitepaper leaves the encoding of A_m to the responder (the initiator never
sees it): here the address in network order followed by the port in network
order, as they appear in the packet's headers.

Message layout (64 bytes):

    type(1)=3 | reserved(3)=0 | receiver(4, LE) | nonce(24) | cookie(16+16)

XAEAD is XChaCha20Poly1305; `cryptography` has no 24-byte-nonce variant, so it
comes from libsodium through PyNaCl.

msg.nonce is 16 random bytes and an 8-byte tag, MAC(a per-responder key, those 16
bytes): still unpredictable and never repeated, and it lets the daemon tell its
own replies from the data plane's when it sees both leave the host
(cookie_learn.py) without keeping a list of what it sent.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct
import time
from collections.abc import Callable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from appliance.gateway.handshake import (
    HASH,
    LABEL_COOKIE,
    MAC,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    OFFSET_MAC1,
    OFFSET_MAC2,
    OFFSET_SENDER,
)

COOKIE_REFRESH_TIME = 120.0  # seconds between changes of R_m (whitepaper 5.4.7)
# A client spends its cookie on its next try, REKEY_TIMEOUT (5 s) plus up to 1/3 s
# of jitter after the reply; one whose reply came just before R_m changed would
# find its mac2 refused and pay a second 5 s round. So the previous R_m still
# proves a source for this long after the change: two tries' worth. (wireguard-go
# checks the current secret only; its cookie rounds are rarer than ours.)
PREVIOUS_SECRET_GRACE = 10.0
COOKIE_SIZE = MAC_SIZE  # tau is a 16-byte MAC
XNONCE_SIZE = 24
AEAD_TAG_SIZE = 16
SECRET_SIZE = 32
NONCE_RANDOM_SIZE = 16  # of msg.nonce; the rest is the tag that marks our own replies
NONCE_TAG_SIZE = XNONCE_SIZE - NONCE_RANDOM_SIZE

# Cookie reply offsets.
OFFSET_RECEIVER = 4
OFFSET_NONCE = 8
OFFSET_COOKIE = OFFSET_NONCE + XNONCE_SIZE  # 32
MESSAGE_COOKIE_REPLY_SIZE = OFFSET_COOKIE + COOKIE_SIZE + AEAD_TAG_SIZE  # 64


def XAEAD(key: bytes, nonce: bytes, plaintext: bytes, auth: bytes) -> bytes:  # noqa: N802
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, auth, nonce, key)


def XAEAD_DECRYPT(key: bytes, nonce: bytes, ciphertext: bytes, auth: bytes) -> bytes:  # noqa: N802
    """Raises nacl.exceptions.CryptoError when the message does not open."""
    return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, auth, nonce, key)


def source_bytes(ip: str, port: int) -> bytes:
    """A_m: the source address (4 or 16 bytes) then the port, both in network order."""
    # inet_pton: 0.4 us against 2 us for ipaddress, on every mac2 check and lesson
    # (cookie_learn.py). Raises OSError for what is not an address.
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(family, ip) + port.to_bytes(2, "big")


def cookie_key(responder_public: bytes) -> bytes:
    """HASH(LABEL_COOKIE || S_pub_m): the key both ends use for msg.cookie."""
    return HASH(LABEL_COOKIE + responder_public)


class CookieResponder:
    """The responder's cookie state for one WireGuard interface: R_m and its age.

    Thread-safe enough for the gateway's use: R_m is replaced by assignment,
    and a reader that sees the old secret merely answers with an old cookie.
    """

    def __init__(self, responder_public: bytes, *,
                 clock: Callable[[], float] = time.monotonic,
                 random: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self._key = cookie_key(responder_public)
        self._clock = clock
        self._random = random
        self._secret = random(SECRET_SIZE)
        self._secret_set_at = clock()
        self._previous: bytes | None = None  # R_m before the last change
        self._mark = random(SECRET_SIZE)  # keys the tag in msg.nonce (is_own)

    def _current_secret(self) -> bytes:
        now = self._clock()
        age = now - self._secret_set_at
        if age >= COOKIE_REFRESH_TIME:
            # Changed lazily, on the first use after it is due: an R_m that stayed
            # longer (no cookie asked for) must not be honoured after it either.
            # The grace runs from when the change was due.
            due = age < COOKIE_REFRESH_TIME + PREVIOUS_SECRET_GRACE
            self._previous = self._secret if due else None
            self._secret = self._random(SECRET_SIZE)
            self._secret_set_at = self._secret_set_at + COOKIE_REFRESH_TIME if due else now
        return self._secret

    def cookie(self, ip: str, port: int) -> bytes:
        """tau = MAC(R_m, A_m)."""
        return MAC(self._current_secret(), source_bytes(ip, port))

    def mac2_valid(self, initiation: bytes, ip: str, port: int) -> bool:
        """Does the initiation's mac2 prove it came from ip:port (with a current cookie,
        or one made with the previous R_m up to PREVIOUS_SECRET_GRACE after it changed)?

        Assumes a 148-byte initiation whose mac1 was checked.
        """
        mac2 = initiation[OFFSET_MAC2:OFFSET_MAC2 + MAC_SIZE]
        if not any(mac2):
            return False
        signed = initiation[:OFFSET_MAC2]
        if hmac.compare_digest(MAC(self.cookie(ip, port), signed), mac2):
            return True
        previous = self._previous
        if previous is None or self._clock() - self._secret_set_at >= PREVIOUS_SECRET_GRACE:
            return False
        tau = MAC(previous, source_bytes(ip, port))
        return hmac.compare_digest(MAC(tau, signed), mac2)

    def reply(self, initiation: bytes, ip: str, port: int) -> bytes:
        """The 64-byte cookie reply to an initiation that came from ip:port."""
        receiver = initiation[OFFSET_SENDER:OFFSET_SENDER + 4]
        mac1 = initiation[OFFSET_MAC1:OFFSET_MAC2]
        nonce = self._nonce(self._random(NONCE_RANDOM_SIZE))
        encrypted_cookie = XAEAD(self._key, nonce, self.cookie(ip, port), mac1)
        return (struct.pack("<B3x", MESSAGE_COOKIE_REPLY_TYPE) + receiver + nonce
                + encrypted_cookie)


    def _nonce(self, random_part: bytes) -> bytes:
        return random_part + MAC(self._mark, random_part)[:NONCE_TAG_SIZE]

    def is_own(self, reply: bytes) -> bool:
        """Did this responder make `reply` (a 64-byte cookie reply)? One MAC."""
        nonce = reply[OFFSET_NONCE:OFFSET_COOKIE]
        return hmac.compare_digest(self._nonce(nonce[:NONCE_RANDOM_SIZE]), nonce)


# --- The initiator's side: what a client does with the reply (tests and benches) ---

def consume_cookie_reply(reply: bytes, responder_public: bytes, sent_mac1: bytes) -> bytes:
    """tau from a cookie reply, as an initiator opens it (AD = the mac1 it sent)."""
    if len(reply) != MESSAGE_COOKIE_REPLY_SIZE or reply[0] != MESSAGE_COOKIE_REPLY_TYPE:
        raise ValueError("not a cookie reply")
    nonce = reply[OFFSET_NONCE:OFFSET_COOKIE]
    return XAEAD_DECRYPT(cookie_key(responder_public), nonce, reply[OFFSET_COOKIE:], sent_mac1)


def with_mac2(initiation: bytes, cookie: bytes) -> bytes:
    """`initiation` with mac2 = MAC(tau, msg[0:132]), as an initiator holding a cookie sends it."""
    return initiation[:OFFSET_MAC2] + MAC(cookie, initiation[:OFFSET_MAC2])
