"""The probe's messages in the codec: golden packets (tests/data/probe*.hex) and what decoding refuses."""

from __future__ import annotations

import pytest
from helpers import KEY, SESSION_ID, TXID, load_hex

from rawpunch.proto import codec
from rawpunch.proto.codec import Attr, Endpoint, Message, MessageType, ProbeKind
from rawpunch.proto.errors import MalformedMessage

GOLDEN = {
    "probe": Message(
        MessageType.PROBE,
        TXID,
        SESSION_ID,
        (
            (Attr.COOKIE, bytes(range(0xA0, 0xB8))),
            (Attr.PROBE_KIND, int(ProbeKind.FILTER)),
            (Attr.LOCAL_PORT, 40012),
        ),
    ),
    "probe_ack": Message(
        MessageType.PROBE_ACK,
        TXID,
        SESSION_ID,
        (
            (Attr.PROBE_KIND, int(ProbeKind.FILTER)),
            (Attr.PROBE_BUDGET, 14),
            (Attr.PROBE_FROM, Endpoint("203.0.113.10", 3478)),
            (Attr.PROBE_FROM, Endpoint("198.51.100.194", 3479)),
        ),
    ),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_bytes_both_ways(name: str) -> None:
    assert codec.encode(GOLDEN[name], KEY) == load_hex(name)
    assert codec.decode(load_hex(name), KEY) == GOLDEN[name]


def test_probe_from_is_xored_like_every_endpoint() -> None:
    data = load_hex("probe_ack")
    # 36-byte header, two 8-byte attributes, then PROBE_FROM: family 4, 0, port ^ 0x5250, address ^ pad.
    first = data[36 + 16 : 36 + 16 + 12]
    assert first[:4] == bytes.fromhex("00140008")
    assert first[4:8] == bytes([4, 0]) + (3478 ^ 0x5250).to_bytes(2, "big")
    assert first[8:] == bytes(
        a ^ b for a, b in zip(bytes([203, 0, 113, 10]), b"\x52\x50" + TXID[:2], strict=True)
    )


def test_a_probe_without_cookie_is_malformed() -> None:
    msg = Message(MessageType.PROBE, TXID, SESSION_ID, ((Attr.PROBE_KIND, 0),))
    with pytest.raises(MalformedMessage, match="COOKIE"):
        codec.decode(codec.encode(msg, KEY), KEY)


def test_a_probe_may_not_carry_server_attributes() -> None:
    attrs = ((Attr.COOKIE, bytes(24)), (Attr.PROBE_KIND, 0), (Attr.PROBE_FROM, Endpoint("192.0.2.1", 1)))
    with pytest.raises(MalformedMessage, match="PROBE_FROM is not allowed in PROBE"):
        codec.decode(codec.encode(Message(MessageType.PROBE, TXID, SESSION_ID, attrs), KEY), KEY)
