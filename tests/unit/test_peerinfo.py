"""The sealed peer-to-peer information (``rawpunch.proto.peerinfo``)."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from helpers import endpoints, tlv
from hypothesis import given, settings
from hypothesis import strategies as st

from rawpunch.proto.codec import Endpoint
from rawpunch.proto.errors import MalformedMessage
from rawpunch.proto.peerinfo import (
    BEHAVIOUR_WORDS,
    FIELDS,
    NONCE_LEN,
    Capability,
    PeerInfo,
    decode_peer_info,
    encode_peer_info,
)

NONCE = b"12345678"
NONCE_TLV = tlv(0x01, NONCE)


def optional(strategy: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.none() | strategy


peer_infos = st.builds(
    PeerInfo,
    nonce=st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN),
    capabilities=st.integers(0, 0xFFFFFFFF),
    isn=optional(st.integers(0, 0xFFFFFFFF)),
    ttl=optional(st.integers(0, 0xFF)),
    mss=optional(st.integers(0, 0xFFFF)),
    wscale=optional(st.integers(0, 0xFF)),
    sack=st.booleans(),
    timestamps=st.booleans(),
    tcp_port=optional(st.integers(0, 0xFFFF)),
    local=st.lists(endpoints, max_size=4).map(tuple),
    punch_ports=st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple),
    nat_mapping=st.sampled_from(BEHAVIOUR_WORDS["mapping"]),
    nat_filtering=st.sampled_from(BEHAVIOUR_WORDS["filtering"]),
    nat_allocation=st.sampled_from(BEHAVIOUR_WORDS["allocation"]),
    nat_delta=optional(st.integers(-0x8000, 0x7FFF)),
    strategy=st.text(max_size=40),
)


def test_every_field_has_a_wire_code() -> None:
    assert set(FIELDS) == {f.name for f in dataclasses.fields(PeerInfo)}
    codes = [code for code, _, _ in FIELDS.values()]
    assert len(set(codes)) == len(codes)
    # The strategy fields came later: 0x8000 and up, which an older peer skips instead of refusing.
    late = {"punch_ports", "nat_mapping", "nat_filtering", "nat_allocation", "nat_delta", "strategy"}
    assert all((code >= 0x8000) == (name in late) for name, (code, _, _) in FIELDS.items())


@settings(max_examples=200, deadline=None, database=None)
@given(info=peer_infos)
def test_decode_inverts_encode(info: PeerInfo) -> None:
    assert decode_peer_info(encode_peer_info(info)) == info


def test_defaults_are_left_out_and_the_nonce_is_always_there() -> None:
    assert encode_peer_info(PeerInfo(nonce=NONCE)) == NONCE_TLV
    assert encode_peer_info(PeerInfo(nonce=NONCE, capabilities=0, sack=False)) == NONCE_TLV


def test_encoding_by_hand() -> None:
    info = PeerInfo(
        nonce=NONCE,
        capabilities=Capability.CRAFTED_HANDSHAKE | Capability.BIRTHDAY,
        ttl=3,
        sack=True,
        local=(Endpoint("10.0.0.2", 40000),),
    )
    expected = bytes.fromhex(
        "0001 0008 3132333435363738"  # nonce
        "0002 0004 00000011"  # capabilities: bits 0 and 4
        "0004 0001 03 000000"  # ttl 3, padded
        "0007 0001 01 000000"  # sack
        "000a 0008 04 00 ce10 0a000002"  # local 10.0.0.2:40000; the port XOR-ed with the magic, address not
    )
    assert encode_peer_info(info) == expected
    assert decode_peer_info(expected) == info


def test_fresh_infos_get_fresh_nonces() -> None:
    assert PeerInfo().nonce != PeerInfo().nonce
    assert len(PeerInfo().nonce) == NONCE_LEN


def test_unknown_optional_fields_are_skipped() -> None:
    data = tlv(0x8000, b"future") + NONCE_TLV + tlv(0xFFFF, b"")
    assert decode_peer_info(data) == PeerInfo(nonce=NONCE)


REJECTED: dict[str, tuple[bytes, str]] = {
    "unknown required field": (NONCE_TLV + tlv(0x0042, b"x"), "unknown peer info field 0x0042"),
    "no nonce": (tlv(0x04, b"\x03"), "peer info lacks its nonce"),
    "empty": (b"", "peer info lacks its nonce"),
    "short nonce": (tlv(0x01, NONCE[:7]), "peer info nonce of 7 bytes, expected 8"),
    "repeated field": (NONCE_TLV + tlv(0x04, b"\x03") + tlv(0x04, b"\x04"), "peer info field ttl repeated"),
    "repeated nonce": (NONCE_TLV + NONCE_TLV, "peer info field nonce repeated"),
    "flag of 2": (NONCE_TLV + tlv(0x07, b"\x02"), "peer info flag is neither 0 nor 1"),
    "integer of the wrong width": (
        NONCE_TLV + tlv(0x05, b"\x05\xb4\x00"),
        "peer info field of 3 bytes, expected 2",
    ),
    "local endpoint of family 7": (NONCE_TLV + tlv(0x0A, bytes([7, 0, 0, 0, 1, 2, 3, 4])), "family 7"),
    "field running past the end": (NONCE_TLV + struct.pack("!HH", 0x04, 9) + b"\x03", "runs past the end"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_defects_are_rejected(case: str) -> None:
    data, text = REJECTED[case]
    with pytest.raises(MalformedMessage) as excinfo:
        decode_peer_info(data)
    assert text in str(excinfo.value)


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_peer_info(data)


@settings(max_examples=100, deadline=None, database=None)
@given(info=peer_infos, cut=st.integers(1, 40))
def test_a_truncated_encoding_never_decodes_to_the_same_info(info: PeerInfo, cut: int) -> None:
    data = encode_peer_info(info)
    try:
        decoded = decode_peer_info(data[: max(len(data) - cut, 0)])
    except MalformedMessage:
        return
    assert decoded != info  # a whole field was dropped: never silently the same
