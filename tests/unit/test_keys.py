"""Session keys and the end-to-end seal (``rawpunch.proto.keys``)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from helpers import KEYS, OTHER_KEYS, SECRET

from rawpunch.proto.keys import SEAL_OVERHEAD, SealError, SessionKeys, control_key

SALT = b"rawpunch/1"


def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 written out with the stdlib, independent of the code under test."""
    prk = hmac.new(SALT, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


# --- derivation -----------------------------------------------------------------------------------


def test_derivation_is_scrypt_then_hkdf_as_documented() -> None:
    master = hashlib.scrypt(SECRET.encode(), salt=SALT, n=2**14, r=8, p=1, dklen=32)
    session_id = hkdf(master, b"session id", 16)
    assert KEYS.session_id == session_id
    assert KEYS.control_key == hkdf(session_id, b"control mac")
    assert KEYS.peer_key == hkdf(master, b"peer to peer")
    assert KEYS.auth_key == hkdf(master, b"punch auth")


def test_derivation_known_answer() -> None:
    # Pinned, so that a change of salt, cost or labels (which would split old and new peers) is seen.
    assert KEYS.session_id.hex() == "fb16a9f2e8131cd22ec4041228da6687"
    assert KEYS.control_key.hex() == "9594d9c78486e622ccbbc05646e2d9287ed170a19eb451c93d7b616de8429f65"
    assert KEYS.peer_key.hex() == "7cb2f61e6db6edc4e7f0cd6708baafef33542d4e8f8845fabf6dd9012b3b941d"
    assert KEYS.auth_key.hex() == "851c932745fc88d4be1938a9ffd90cccd1f5fdd05336ca320c379666ffd2d67c"


def test_derive_is_deterministic_and_text_equals_its_utf8_bytes() -> None:
    assert SessionKeys.derive(SECRET.encode()) == KEYS


def test_different_secrets_give_different_ids_and_keys() -> None:
    for name in ("session_id", "control_key", "peer_key", "auth_key"):
        assert getattr(KEYS, name) != getattr(OTHER_KEYS, name), name


def test_the_four_values_are_distinct() -> None:
    values = [KEYS.session_id, KEYS.control_key, KEYS.peer_key, KEYS.auth_key]
    assert len(set(values)) == 4


def test_the_server_can_compute_the_control_key_from_the_session_id() -> None:
    assert control_key(KEYS.session_id) == KEYS.control_key
    assert control_key(OTHER_KEYS.session_id) == OTHER_KEYS.control_key


def test_peer_and_auth_keys_are_not_the_obvious_functions_of_the_session_id() -> None:
    sid = KEYS.session_id
    labels = [b"peer to peer", b"punch auth", b"control mac", b"session id", b""]
    candidates = {hkdf(sid, label) for label in labels}
    candidates |= {hkdf(sid + sid, label) for label in labels}
    candidates |= {hashlib.sha256(sid).digest(), hashlib.sha256(sid + b"peer to peer").digest(), sid + sid}
    candidates |= {hmac.new(sid, label, hashlib.sha256).digest() for label in labels}
    candidates |= {hmac.new(KEYS.control_key, label, hashlib.sha256).digest() for label in labels}
    candidates |= {KEYS.control_key, control_key(sid)}
    assert KEYS.peer_key not in candidates
    assert KEYS.auth_key not in candidates


def test_an_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        SessionKeys.derive("")


# --- the seal --------------------------------------------------------------------------------------

PLAINTEXT = b"isn=123456 ttl=3 local=10.0.0.2:40000"


@pytest.mark.parametrize("slot", [0, 1])
def test_seal_then_open_gives_the_plaintext(slot: int) -> None:
    sealed = KEYS.seal(PLAINTEXT, slot)
    assert len(sealed) == len(PLAINTEXT) + SEAL_OVERHEAD
    assert KEYS.open(sealed, slot) == PLAINTEXT


def test_the_same_plaintext_never_seals_the_same_way_twice() -> None:
    first, second = KEYS.seal(PLAINTEXT, 0), KEYS.seal(PLAINTEXT, 0)
    assert first[:12] != second[:12]
    assert first != second


def test_sealing_hides_the_plaintext() -> None:
    assert PLAINTEXT not in KEYS.seal(PLAINTEXT, 0)


def test_open_with_another_secret_fails() -> None:
    with pytest.raises(SealError, match="different session secret"):
        OTHER_KEYS.open(KEYS.seal(PLAINTEXT, 0), 0)


def test_open_as_the_other_slot_fails() -> None:
    # A blob reflected back to its sender (or swapped between slots) is refused.
    with pytest.raises(SealError):
        KEYS.open(KEYS.seal(PLAINTEXT, 0), 1)


def test_the_keys_the_server_knows_cannot_open_the_seal() -> None:
    sealed = KEYS.seal(PLAINTEXT, 0)
    aad = KEYS.session_id + b"\x00"
    for key in (KEYS.control_key, hkdf(KEYS.session_id, b"peer to peer")):
        with pytest.raises(InvalidTag):
            ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], aad)


def test_every_truncation_fails() -> None:
    sealed = KEYS.seal(PLAINTEXT, 1)
    for n in range(len(sealed)):
        with pytest.raises(SealError) as excinfo:
            KEYS.open(sealed[:n], 1)
        if n < SEAL_OVERHEAD:
            assert f"{n} bytes, shorter than its 28-byte frame" in str(excinfo.value)


def test_every_tampered_byte_fails() -> None:
    sealed = KEYS.seal(PLAINTEXT, 1)
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(SealError, match="tampered"):
            KEYS.open(bytes(tampered), 1)


def test_an_appended_byte_fails() -> None:
    with pytest.raises(SealError):
        KEYS.open(KEYS.seal(PLAINTEXT, 0) + b"\x00", 0)


# --- the proof on the punched connection -------------------------------------------------------------


def test_proof_is_an_hmac_with_the_auth_key_of_role_and_challenge() -> None:
    challenge = bytes(range(32))
    proof = KEYS.prove(challenge, b"A")
    assert proof == hmac.new(KEYS.auth_key, b"A" + challenge, hashlib.sha256).digest()
    assert proof != KEYS.prove(challenge, b"B")
    assert proof != KEYS.prove(bytes(32), b"A")
    assert proof != OTHER_KEYS.prove(challenge, b"A")
