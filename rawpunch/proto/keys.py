"""Keys derived from the session secret, and the end-to-end seal for peer-to-peer information.

Two peers share a secret S out of band. From it each derives, with scrypt (S may be a typed
password, so guessing it must be slow) and then HKDF-SHA256 (RFC 5869):

``session_id`` (16 bytes)
    The public handle the rendezvous pairs peers by: a hash of S. The server sees it.
``control_key`` (32 bytes)
    HMAC-SHA256 key for every control message (RFC 2104), derived from ``session_id`` so the
    server can verify and sign. It protects against off-path forgery and cross-session mixing;
    it cannot protect against someone who has seen ``session_id`` on the path: such an observer
    can forge control messages (re-register, overwrite a TCP mapping with DISCOVER). That is
    denial of service only: it can neither read nor forge the sealed peer info, and the punched
    connection's own challenge (``auth_key``) keeps it from being handed a connection. It can
    also guess the secret offline from ``session_id``; scrypt makes each guess cost ~50 ms, so
    use a random secret (``rawpunch peer`` prints advice when the secret is short).
``peer_key`` (32 bytes)
    ChaCha20-Poly1305 (RFC 8439) key for the sealed peer-to-peer information (ISN, TTL, TCP
    options, private endpoints). Derived from S, never from ``session_id``: the server never
    learns it, so neither the server nor an on-path observer can read or forge what one peer
    tells the other.
``auth_key`` (32 bytes)
    For the challenge on the punched connection itself (proof that the other end knows S).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_ID_LEN = 16
SEAL_NONCE_LEN = 12
SEAL_OVERHEAD = SEAL_NONCE_LEN + 16  # nonce + Poly1305 tag

_SALT = b"rawpunch/1"
# scrypt cost: ~16 MiB and ~50 ms once per run, enough to make guessing a weak secret costly.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class SealError(Exception):
    """Sealed peer information failed authentication (different secret, or tampered with)."""


def _hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(ikm)


def control_key(session_id: bytes) -> bytes:
    """The control-channel HMAC key of a session; the server computes it from the id."""
    return _hkdf(session_id, b"control mac")


@dataclass(frozen=True, slots=True)
class SessionKeys:
    session_id: bytes
    control_key: bytes
    peer_key: bytes
    auth_key: bytes

    @classmethod
    def derive(cls, secret: str | bytes) -> SessionKeys:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("the session secret must not be empty")
        master = hashlib.scrypt(raw, salt=_SALT, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
        session_id = _hkdf(master, b"session id", SESSION_ID_LEN)
        return cls(
            session_id=session_id,
            control_key=control_key(session_id),
            peer_key=_hkdf(master, b"peer to peer"),
            auth_key=_hkdf(master, b"punch auth"),
        )

    def seal(self, plaintext: bytes, sender_slot: int) -> bytes:
        """Encrypt and authenticate peer information; bound to this session and the sender's slot."""
        nonce = os.urandom(SEAL_NONCE_LEN)
        return nonce + ChaCha20Poly1305(self.peer_key).encrypt(nonce, plaintext, self._aad(sender_slot))

    def open(self, sealed: bytes, sender_slot: int) -> bytes:
        if len(sealed) < SEAL_OVERHEAD:
            raise SealError(
                f"sealed peer info is {len(sealed)} bytes, shorter than its {SEAL_OVERHEAD}-byte frame"
            )
        nonce, body = sealed[:SEAL_NONCE_LEN], sealed[SEAL_NONCE_LEN:]
        try:
            return ChaCha20Poly1305(self.peer_key).decrypt(nonce, body, self._aad(sender_slot))
        except InvalidTag:
            raise SealError(
                "peer info failed authentication: the peer used a different session secret, "
                "or the data was tampered with on the way"
            ) from None

    def _aad(self, sender_slot: int) -> bytes:
        return self.session_id + bytes([sender_slot])

    def prove(self, challenge: bytes, role: bytes) -> bytes:
        """HMAC proof of knowing the secret, for the punched connection's handshake."""
        return hmac.digest(self.auth_key, role + challenge, "sha256")
