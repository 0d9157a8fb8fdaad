"""The wire format (``rawpunch.proto.codec``): round trips, golden packets, and every defect rejected with
the right error and a clear message."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from helpers import ATTRIBUTE_VALUES, KEY, SESSION_ID, TXID, load_hex, messages, raw_message, sign, tlv
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rawpunch.proto import codec
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    ErrorInfo,
    Message,
    MessageType,
    ResultCode,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import (
    AuthenticationError,
    MalformedMessage,
    RemoteProtocolError,
    UnsupportedVersion,
)

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_strategy_knows_every_attribute_and_message_type() -> None:
    assert set(ATTRIBUTE_VALUES) == set(codec.ATTRIBUTES) == set(Attr)
    assert set(codec.MESSAGES) == set(MessageType)


# --- round trips -----------------------------------------------------------------------------------


@FUZZ
@given(msg=messages())
def test_decode_inverts_encode_for_every_valid_message(msg: Message) -> None:
    data = codec.encode(msg, KEY)
    assert codec.decode(data, KEY) == msg


@FUZZ
@given(msg=messages())
def test_encoding_is_word_aligned_and_the_header_describes_it(msg: Message) -> None:
    data = codec.encode(msg, KEY)
    head = codec.peek_header(data)
    assert len(data) % 4 == 0
    assert codec.MIN_MESSAGE_LEN <= len(data) <= codec.MAX_MESSAGE_LEN
    assert (head.type, head.transaction_id, head.session_id) == (msg.type, msg.transaction_id, msg.session_id)
    assert head.attr_len == len(data) - codec.HEADER_LEN - codec.MAC_LEN


def test_repeatable_attributes_keep_every_value_in_order() -> None:
    mappings = [
        TcpMapping(1, Endpoint("192.0.2.1", 10)),
        TcpMapping(2, Endpoint("2001:db8::2", 20)),
        TcpMapping(1, Endpoint("192.0.2.3", 30)),
    ]
    attrs = (
        (Attr.PEER_TCP, mappings[0]),
        (Attr.SLOT, 1),
        (Attr.PEER_TCP, mappings[1]),
        (Attr.PEER_UDP, Endpoint("192.0.2.9", 9)),
        (Attr.PEER_TCP, mappings[2]),
        (Attr.SEALED, bytes(28)),
    )
    decoded = codec.decode(codec.encode(Message(MessageType.PEER, TXID, SESSION_ID, attrs), KEY), KEY)
    assert decoded.get_all(Attr.PEER_TCP) == mappings
    assert decoded.get(Attr.PEER_TCP) == mappings[0]
    assert decoded.attributes == attrs


def test_long_error_text_is_cut_at_256_bytes_between_characters() -> None:
    msg = Message(
        MessageType.ERROR, TXID, SESSION_ID, ((Attr.ERROR, ErrorInfo(ErrorCode.BAD_REQUEST, "é" * 200)),)
    )
    reason = codec.decode(codec.encode(msg, KEY), KEY).get(Attr.ERROR).reason
    assert reason == "é" * 128  # 256 bytes of UTF-8; the 129th character would cut at 257


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0:0:0:0:0:1", "2001:db8::1"),
        ("::ffff:192.0.2.1", "::ffff:c000:201"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_endpoint_host_text_is_canonical_so_it_survives_a_round_trip(host: str, canonical: str) -> None:
    assert Endpoint(host, 1) == Endpoint(canonical, 1)
    msg = Message(
        MessageType.PEER,
        TXID,
        SESSION_ID,
        ((Attr.SLOT, 1), (Attr.PEER_UDP, Endpoint(host, 1)), (Attr.SEALED, bytes(28))),
    )
    assert codec.decode(codec.encode(msg, KEY), KEY) == msg


def test_an_endpoint_is_either_refused_or_survives_a_round_trip() -> None:
    try:
        endpoint = Endpoint("fe80::1%eth0", 1)
    except ValueError:
        return
    msg = Message(
        MessageType.PEER,
        TXID,
        SESSION_ID,
        ((Attr.SLOT, 1), (Attr.PEER_UDP, endpoint), (Attr.SEALED, bytes(28))),
    )
    assert codec.decode(codec.encode(msg, KEY), KEY) == msg


# --- golden packets (tests/data/*.hex, written once from the encoder and checked by hand) --------------

GOLDEN: dict[str, Message] = {
    "register": Message(MessageType.REGISTER, TXID, SESSION_ID, ((Attr.PADDING, bytes(56)),)),
    "cookie": Message(MessageType.COOKIE, TXID, SESSION_ID, ((Attr.COOKIE, bytes(range(0xA0, 0xB8))),)),
    "registered_ipv4": Message(
        MessageType.REGISTERED,
        TXID,
        SESSION_ID,
        (
            (Attr.SLOT, 1),
            (Attr.MAPPED_UDP, Endpoint("192.0.2.1", 32853)),
            (Attr.TCP_PORT, 3478),
            (Attr.TOKEN, bytes(range(16))),
            (Attr.RTT_MS, 42),
        ),
    ),
    "discover": Message(
        MessageType.DISCOVER, TXID, SESSION_ID, ((Attr.TOKEN, bytes(range(16))), (Attr.LOCAL_PORT, 40000))
    ),
    "peer_ipv6": Message(
        MessageType.PEER,
        TXID,
        SESSION_ID,
        (
            (Attr.SLOT, 0),
            (Attr.PEER_UDP, Endpoint("2001:db8::1", 50000)),
            (Attr.PEER_TCP, TcpMapping(40000, Endpoint("198.51.100.7", 41000))),
            (Attr.PEER_TCP, TcpMapping(40001, Endpoint("2001:db8::1", 41001))),
            (Attr.SEALED, bytes(range(31))),
        ),
    ),
    "go": Message(MessageType.GO, TXID, SESSION_ID, ((Attr.DELAY_MS, 250),)),
    "result": Message(
        MessageType.RESULT,
        TXID,
        SESSION_ID,
        (
            (Attr.COOKIE, bytes(range(0xA0, 0xB8))),
            (Attr.RESULT, ResultInfo(ResultCode.TIMEOUT, 1234, "no SYN-ACK")),
        ),
    ),
    "error": Message(
        MessageType.ERROR,
        TXID,
        SESSION_ID,
        ((Attr.ERROR, ErrorInfo(ErrorCode.SESSION_FULL, "two peers are already in this session")),),
    ),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_encode_gives_exactly_the_golden_bytes(name: str) -> None:
    assert codec.encode(GOLDEN[name], KEY).hex() == load_hex(name).hex()


@pytest.mark.parametrize("name", GOLDEN)
def test_decode_of_the_golden_bytes_gives_back_the_message(name: str) -> None:
    assert codec.decode(load_hex(name), KEY) == GOLDEN[name]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_header_and_mac_match_the_documented_layout(name: str) -> None:
    data = load_hex(name)
    assert data[0:2] == b"RP"
    assert data[2] == 1
    assert data[3] == GOLDEN[name].type
    assert struct.unpack("!H", data[4:6])[0] == len(data) - 36 - 32
    assert data[6:8] == b"\x00\x00"
    assert data[8:20] == TXID
    assert data[20:36] == SESSION_ID
    assert data[-32:] == hmac.new(KEY, data[:-32], hashlib.sha256).digest()


def test_golden_ipv4_endpoint_is_xored_with_the_magic_and_the_transaction_id() -> None:
    # 192.0.2.1:32853 = c0000201 port 0x8055; pad = magic 5250 || txid 0102...; worked out by hand.
    data = load_hex("registered_ipv4")
    mapped = data[36 + 8 : 36 + 8 + 12]  # after SLOT (4 + 1 + 3 padding)
    assert mapped == bytes.fromhex("0002 0008 04 00 d205 92500303")


def test_golden_ipv6_endpoint_is_xored_with_magic_txid_magic() -> None:
    # 2001:db8::1 port 50000 (0xc350) ^ pad 5250 0102030405060708090a0b0c 5250, worked out by hand.
    data = load_hex("peer_ipv6")
    peer_udp = data[36 + 8 : 36 + 8 + 24]
    assert peer_udp == bytes.fromhex("0004 0014 06 00 9100 72510cba030405060708090a0b0c5251")


def test_golden_error_reason_is_padded_to_a_word() -> None:
    data = load_hex("error")
    reason = b"two peers are already in this session"
    assert data[36:42] == bytes.fromhex("000b") + struct.pack("!HH", 2 + len(reason), 409)
    assert data[42 : 42 + len(reason)] == reason
    assert data[42 + len(reason) : -32] == b"\x00"  # 39 bytes of value, one of padding


# --- defects ------------------------------------------------------------------------------------------

GO = 0x0A
DELAY = tlv(0x0009, struct.pack("!I", 250))
V4 = bytes([4, 0]) + struct.pack("!H", 1 ^ 0x5250) + bytes(4)
REGISTERED_BODY = {
    "slot": tlv(0x000E, b"\x01"),
    "udp": tlv(0x0002, V4),
    "port": tlv(0x0008, b"\x0d\x96"),
    "token": tlv(0x0007, bytes(16)),
}


def registered(**replace: bytes) -> bytes:
    return raw_message(0x03, b"".join({**REGISTERED_BODY, **replace}.values()))


def error(value: bytes) -> bytes:
    return raw_message(0x0D, tlv(0x000B, value))


def padded_go(total: int) -> bytes:
    return raw_message(GO, DELAY + tlv(0x000D, bytes(total - 36 - len(DELAY) - 4 - 32)))


DEFECTS: dict[str, tuple[bytes, type[Exception], str]] = {
    "empty": (b"", MalformedMessage, "0 bytes is shorter than the 68-byte minimum"),
    "too long": (padded_go(1204), MalformedMessage, "1204 bytes exceeds the 1200-byte maximum"),
    "bad magic": (raw_message(GO, DELAY, magic=0x5251), MalformedMessage, "bad magic 0x5251"),
    "a STUN message": (
        raw_message(GO, DELAY, magic=0x0001),
        MalformedMessage,
        "bad magic 0x0001: not a rawpunch message",
    ),
    "version 2": (
        raw_message(GO, DELAY, version=2),
        UnsupportedVersion,
        "protocol version 2; this rawpunch speaks version 1",
    ),
    "version 0": (raw_message(GO, DELAY, version=0), UnsupportedVersion, "protocol version 0"),
    "type 0": (raw_message(0x00, DELAY), MalformedMessage, "unknown message type 0x00"),
    "type 0x7e": (raw_message(0x7E, DELAY), MalformedMessage, "unknown message type 0x7e"),
    "type 0xff": (raw_message(0xFF, DELAY), MalformedMessage, "unknown message type 0xff"),
    "reserved bits": (
        raw_message(GO, DELAY, reserved=0x8000),
        MalformedMessage,
        "reserved header bits are set",
    ),
    "length field short": (
        raw_message(GO, DELAY, attr_len=4),
        MalformedMessage,
        "length field says 4 attribute bytes, datagram has 8",
    ),
    "length field long": (raw_message(GO, DELAY, attr_len=12), MalformedMessage, "length field says 12"),
    "unknown required attribute": (
        raw_message(GO, DELAY + tlv(0x0042, b"ab")),
        MalformedMessage,
        "unknown comprehension-required attribute 0x0042",
    ),
    "attribute type 0": (
        raw_message(GO, tlv(0x0000, b"") + DELAY),
        MalformedMessage,
        "unknown comprehension-required attribute 0x0000",
    ),
    "attribute type 0x7fff": (
        raw_message(GO, DELAY + tlv(0x7FFF, b"")),
        MalformedMessage,
        "unknown comprehension-required attribute 0x7fff",
    ),
    "attribute not allowed": (
        raw_message(GO, DELAY + tlv(0x0007, bytes(16))),
        MalformedMessage,
        "attribute TOKEN is not allowed in GO",
    ),
    "client attribute in a server message": (
        raw_message(GO, DELAY + tlv(0x000F, b"\x00\x50")),
        MalformedMessage,
        "LOCAL_PORT is not allowed in GO",
    ),
    "repeated attribute": (raw_message(GO, DELAY + DELAY), MalformedMessage, "attribute DELAY_MS repeated"),
    "repeated padding": (
        raw_message(GO, tlv(0x000D, b"") + DELAY + tlv(0x000D, b"")),
        MalformedMessage,
        "attribute PADDING repeated",
    ),
    "missing required attribute": (
        raw_message(GO),
        MalformedMessage,
        "GO lacks required attribute(s) DELAY_MS",
    ),
    "missing two required attributes": (
        registered(slot=b"", token=b""),
        MalformedMessage,
        "REGISTERED lacks required attribute(s) SLOT, TOKEN",
    ),
    "endpoint family 5": (
        registered(udp=tlv(0x0002, bytes([5, 0, 0, 0]) + bytes(4))),
        MalformedMessage,
        "endpoint address family 5 is neither 4 nor 6",
    ),
    "endpoint family 1 (STUN's IPv4)": (
        registered(udp=tlv(0x0002, bytes([1, 0, 0, 0]) + bytes(4))),
        MalformedMessage,
        "endpoint address family 1",
    ),
    "IPv4 endpoint with an IPv6 address": (
        registered(udp=tlv(0x0002, bytes([4, 0, 0, 0]) + bytes(16))),
        MalformedMessage,
        "IPv4 endpoint: expected 8 bytes, got 20",
    ),
    "IPv6 endpoint with an IPv4 address": (
        registered(udp=tlv(0x0002, bytes([6, 0, 0, 0]) + bytes(4))),
        MalformedMessage,
        "IPv6 endpoint: expected 20 bytes, got 8",
    ),
    "endpoint of 3 bytes": (
        registered(udp=tlv(0x0002, bytes(3))),
        MalformedMessage,
        "endpoint shorter than 4 bytes",
    ),
    "integer of the wrong width": (
        registered(port=tlv(0x0008, b"\x0d\x96\x00")),
        MalformedMessage,
        "2-byte integer: expected 2 bytes, got 3",
    ),
    "token of 15 bytes": (
        registered(token=tlv(0x0007, bytes(15))),
        MalformedMessage,
        "byte string of 15 bytes, allowed 16..16",
    ),
    "bad UTF-8 in an error reason": (
        error(struct.pack("!H", 409) + b"caf\xc3"),
        MalformedMessage,
        "reason text is not UTF-8",
    ),
    "unknown error code": (error(struct.pack("!H", 499) + b"x"), MalformedMessage, "unknown error code 499"),
    "error attribute of 1 byte": (error(b"\x01"), MalformedMessage, "error attribute shorter than 2 bytes"),
    "unknown result code": (
        raw_message(0x0B, tlv(0x0001, bytes(24)) + tlv(0x000C, struct.pack("!HI", 9, 0))),
        MalformedMessage,
        "unknown result code 9",
    ),
    "result attribute of 5 bytes": (
        raw_message(0x0B, tlv(0x0001, bytes(24)) + tlv(0x000C, bytes(5))),
        MalformedMessage,
        "result attribute shorter than 6 bytes",
    ),
    "TCP mapping of 1 byte": (
        raw_message(0x05, tlv(0x0003, b"\x01")),
        MalformedMessage,
        "TCP mapping shorter than 2 bytes",
    ),
    "attribute running past the end": (
        raw_message(GO, DELAY + tlv(0x000D, bytes(4), length=100)),
        MalformedMessage,
        "attribute 0x000d of 100 bytes runs past the end",
    ),
    "attribute header cut short": (
        raw_message(GO, DELAY + b"\x00\x0d"),
        MalformedMessage,
        "attribute header truncated at offset 8",
    ),
    "attribute padding missing": (
        raw_message(GO, DELAY + tlv(0x000D, b"\x00", pad=False)),
        MalformedMessage,
        "attribute padding runs past the end",
    ),
    "wrong key": (raw_message(GO, DELAY, key=bytes(32)), AuthenticationError, "HMAC-SHA256"),
    "no MAC checked before a defective attribute": (
        raw_message(GO, tlv(0x0042, b""), key=bytes(32)),
        AuthenticationError,
        "forged, corrupted, or from a different session",
    ),
}


def test_the_defect_cases_differ_from_a_valid_message_only_in_their_defect() -> None:
    assert codec.decode(raw_message(GO, DELAY), KEY).get(Attr.DELAY_MS) == 250
    assert codec.decode(registered(), KEY).get(Attr.SLOT) == 1
    assert codec.decode(error(struct.pack("!H", 409) + b"caf\xc3\xa9"), KEY).get(Attr.ERROR).reason == "café"
    assert len(padded_go(1200)) == 1200
    assert codec.decode(padded_go(1200), KEY).type is MessageType.GO


@pytest.mark.parametrize("case", DEFECTS)
def test_defect_is_rejected_with_the_right_error_and_message(case: str) -> None:
    data, error_type, text = DEFECTS[case]
    with pytest.raises(RemoteProtocolError) as excinfo:
        codec.decode(data, KEY)
    assert type(excinfo.value) is error_type
    assert text in str(excinfo.value)


def test_unknown_optional_attributes_are_skipped() -> None:
    body = tlv(0x8000, b"") + DELAY + tlv(0x8001, b"from the future") + tlv(0xFFFF, bytes(7))
    assert codec.decode(raw_message(GO, body), KEY) == Message(
        MessageType.GO, TXID, SESSION_ID, ((Attr.DELAY_MS, 250),)
    )


def test_padding_content_is_not_interpreted() -> None:
    # As in STUN, the padding after a value is skipped whatever it holds (the MAC covers it all the same).
    body = DELAY + struct.pack("!HH", 0x000D, 1) + b"\x00\xaa\xbb\xcc"
    assert codec.decode(raw_message(GO, body), KEY).get(Attr.PADDING) == b"\x00"


@pytest.mark.parametrize("name", ["register", "registered_ipv4", "peer_ipv6", "error"])
def test_truncation_at_every_length_is_malformed(name: str) -> None:
    data = load_hex(name)
    for n in range(len(data)):
        with pytest.raises(MalformedMessage) as excinfo:
            codec.decode(data[:n], KEY)
        assert type(excinfo.value) is MalformedMessage
        expected = "shorter than the 68-byte minimum" if n < 68 else "length field says"
        assert expected in str(excinfo.value), (n, str(excinfo.value))


TYPE_CODES = {int(t) for t in MessageType}


def _expected_for_flip(offset: int, flipped: int) -> type[Exception]:
    if offset in (0, 1, 4, 5, 6, 7):  # magic, length, reserved
        return MalformedMessage
    if offset == 2:
        return UnsupportedVersion
    if offset == 3:
        return AuthenticationError if flipped in TYPE_CODES else MalformedMessage
    return AuthenticationError


@pytest.mark.parametrize("name", ["registered_ipv4", "peer_ipv6", "result"])
def test_a_flipped_bit_anywhere_is_caught(name: str) -> None:
    data = load_hex(name)
    for offset in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[offset] ^= 1 << bit
            with pytest.raises(RemoteProtocolError) as excinfo:
                codec.decode(bytes(mutated), KEY)
            assert type(excinfo.value) is _expected_for_flip(offset, mutated[offset]), (offset, bit)


def test_the_wrong_key_is_an_authentication_error() -> None:
    with pytest.raises(AuthenticationError, match="from a different session"):
        codec.decode(load_hex("go"), bytes(32))


# --- encoder misuse -----------------------------------------------------------------------------------


def test_encode_refuses_a_message_over_the_maximum() -> None:
    msg = Message(MessageType.GO, TXID, SESSION_ID, ((Attr.DELAY_MS, 1), (Attr.PADDING, bytes(1121))))
    with pytest.raises(ValueError, match="exceeds 1200"):
        codec.encode(msg, KEY)
    ok = Message(MessageType.GO, TXID, SESSION_ID, ((Attr.DELAY_MS, 1), (Attr.PADDING, bytes(1120))))
    assert len(codec.encode(ok, KEY)) == 1200


@pytest.mark.parametrize(("txid", "sid"), [(bytes(11), SESSION_ID), (TXID, bytes(17))])
def test_encode_refuses_ids_of_the_wrong_length(txid: bytes, sid: bytes) -> None:
    with pytest.raises(ValueError, match="transaction id must be 12 bytes"):
        codec.encode(Message(MessageType.PENDING, txid, sid), KEY)


@pytest.mark.parametrize(
    ("host", "port"), [("example.com", 1), ("1.2.3", 1), ("1.2.3.4", -1), ("::1", 65536)]
)
def test_endpoint_rejects_junk(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        Endpoint(host, port)


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [(Endpoint("192.0.2.1", 80), "192.0.2.1:80"), (Endpoint("2001:db8::1", 80), "[2001:db8::1]:80")],
)
def test_endpoint_prints_as_host_port(endpoint: Endpoint, text: str) -> None:
    assert str(endpoint) == text


# --- nothing but RemoteProtocolError, whatever comes in ----------------------------------------------


def _decode_or_protocol_error(data: bytes) -> Message | None:
    try:
        return codec.decode(data, KEY)
    except RemoteProtocolError:
        return None


@FUZZ
@given(data=st.binary(max_size=1300))
@example(data=b"RP\x01\x0a" + bytes(64))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    assert _decode_or_protocol_error(data) is None  # a random 32-byte MAC never verifies


@FUZZ
@given(
    tail=st.binary(min_size=32, max_size=1164),
    mtype=st.integers(0, 255),
    reserved=st.sampled_from([0, 0, 1]),
    fix_length=st.booleans(),
)
def test_random_bodies_behind_a_valid_header_raise_only_protocol_errors(
    tail: bytes, mtype: int, reserved: int, fix_length: bool
) -> None:
    length = len(tail) - 32 if fix_length else len(tail) % 0x10000
    head = struct.pack("!HBBHH12s16s", 0x5250, 1, mtype, length, reserved, TXID, SESSION_ID)
    # Re-signed, so that whatever survives the header checks reaches the attribute parser.
    _decode_or_protocol_error(sign(head + tail[:-32], KEY))


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(original, mutated, re-signed): a valid message with bytes flipped, cut out or inserted."""
    original = codec.encode(draw(messages()), KEY)
    signed = bytearray(original[:-32])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(signed) - 1, 0)))
        if op == "flip" and signed:
            signed[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del signed[pos : pos + draw(st.integers(1, 8))]
        else:
            signed[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    if len(signed) >= 6 and draw(st.booleans()):  # keep the length field true, to get past it
        struct.pack_into("!H", signed, 4, max(len(signed) - 36, 0) % 0x10000)
    resign = draw(st.booleans())
    mutated = sign(bytes(signed), KEY) if resign else bytes(signed) + original[-32:]
    return original, mutated, resign


@FUZZ
@given(case=mutations())
def test_mutated_messages_raise_only_protocol_errors(case: tuple[bytes, bytes, bool]) -> None:
    original, mutated, resigned = case
    decoded = _decode_or_protocol_error(mutated)
    if not resigned and mutated != original:
        assert decoded is None, "a changed message kept its MAC and was accepted"
