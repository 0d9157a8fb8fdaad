"""READY/GO per attempt of a strategy cascade (the ``ATTEMPT`` attribute), server and client cores."""

from __future__ import annotations

import pytest
from helpers import client_in, decode_sent, reply_to
from test_server_core import A_ADDR, B_ADDR, T0, M, make_server, once, only, paired

from rawpunch.proto.client import ClientState, Go
from rawpunch.proto.codec import Attr
from rawpunch.proto.errors import UnexpectedMessage


def ready(peer: object, now: float, attempt: int, rtt_ms: int = 100) -> list[tuple[object, object]]:
    attrs = ((Attr.RTT_MS, rtt_ms), (Attr.ATTEMPT, attempt)) if attempt else ((Attr.RTT_MS, rtt_ms),)
    return peer.ask(M.READY, now, attrs)  # type: ignore[attr-defined, no-any-return]


def test_each_attempt_gets_its_own_go_once_both_are_ready_for_it() -> None:
    server = make_server(cookie_lifetime=60.0)
    a, b = paired(server, 0.1, 0.1)
    assert only(ready(a, T0 + 2, 0))[0].type is M.PENDING
    assert [(m.type, dst) for m, dst in once(ready(b, T0 + 2, 0))] == [(M.GO, B_ADDR), (M.GO, A_ADDR)]
    # Attempt 0 failed; b is ready for attempt 1 first, a later: GO only then, for both, naming attempt 1.
    reply, _ = only(ready(b, T0 + 5, 1, rtt_ms=200))
    assert reply.type is M.PENDING
    out = once(ready(a, T0 + 6, 1, rtt_ms=100))
    assert [(m.type, dst, m.get(Attr.ATTEMPT)) for m, dst in out] == [(M.GO, A_ADDR, 1), (M.GO, B_ADDR, 1)]
    # Fresh delays from the fresh RTTs: b is farther (100 ms one way), a waits the 50 ms difference.
    assert [m.get(Attr.DELAY_MS) for m, _ in out] == [50, 0]


def test_a_repeated_ready_whose_go_was_lost_gets_its_go_even_after_the_other_moved_on() -> None:
    server = make_server(cookie_lifetime=60.0)
    a, b = paired(server, 0.1, 0.1)
    ready(a, T0 + 2, 1)
    ready(b, T0 + 2, 1)  # GO for attempt 1; a's copy is lost
    assert only(ready(b, T0 + 4, 2))[0].type is M.PENDING  # b failed attempt 1 and waits for attempt 2
    reply, dst = only(ready(a, T0 + 4.5, 1))
    assert (reply.type, dst, reply.get(Attr.ATTEMPT), reply.get(Attr.DELAY_MS)) == (M.GO, A_ADDR, 1, 0)
    out = once(ready(a, T0 + 7, 2))
    assert [(m.type, dst, m.get(Attr.ATTEMPT)) for m, dst in out] == [(M.GO, A_ADDR, 2), (M.GO, B_ADDR, 2)]


def test_ready_for_different_attempts_never_goes() -> None:
    server = make_server(cookie_lifetime=60.0)
    a, b = paired(server, 0.1, 0.1)
    assert only(ready(a, T0 + 2, 3))[0].type is M.PENDING
    assert only(ready(b, T0 + 2, 2))[0].type is M.PENDING


def test_the_client_asks_for_the_next_attempt_after_a_go_and_checks_the_go_names_it() -> None:
    driven = client_in(ClientState.GO)
    client = driven.client
    client.ready(driven.now + 1, attempt=1)
    (sent,) = client.datagrams_to_send(driven.now + 1)
    msg = decode_sent(sent)
    assert (msg.type, msg.get(Attr.ATTEMPT)) == (M.READY, 1)
    with pytest.raises(UnexpectedMessage, match="GO for attempt 0, ready for attempt 1"):
        client.receive_datagram(reply_to(sent, M.GO, ((Attr.DELAY_MS, 5),)), driven.now + 1.1)
    assert client.state is ClientState.READYING
    client.receive_datagram(reply_to(sent, M.GO, ((Attr.DELAY_MS, 5), (Attr.ATTEMPT, 1))), driven.now + 1.2)
    assert client.next_event() == Go(0.005, 1)
    assert client.state is ClientState.GO


def test_attempt_zero_keeps_the_old_wire_format() -> None:
    driven = client_in(ClientState.PAIRED)
    driven.client.ready(driven.now + 1)
    (sent,) = driven.client.datagrams_to_send(driven.now + 1)
    assert decode_sent(sent).get(Attr.ATTEMPT) is None
