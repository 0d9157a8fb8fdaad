"""The rendezvous client core (``rawpunch.proto.client``): the transition table cell by cell,
retransmission and long-poll timers, replay and authentication checks, TCP discovery, and misuse."""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any

import pytest
from helpers import (
    A_PUBLIC,
    B_PUBLIC,
    COOKIE,
    KEYS,
    MY_INFO,
    OTHER_KEYS,
    PEER_INFO,
    SERVER,
    TCP_PORT,
    TOKEN,
    Driven,
    client_config,
    client_in,
    decode_sent,
    messages,
    reply_attrs,
    reply_to,
    server_message,
    txid_of,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawpunch.proto import codec
from rawpunch.proto.client import (
    REGISTER_SIZE,
    TRANSITIONS,
    ClientCore,
    ClientState,
    Event,
    Failed,
    Go,
    PeerFound,
    ProbeAnswer,
    Registered,
    ResultAcknowledged,
    ready_poll,
)
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    ErrorInfo,
    Message,
    MessageType,
    ProbeKind,
    ResultCode,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import (
    AuthenticationError,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    ReplayError,
    UnexpectedMessage,
)
from rawpunch.proto.peerinfo import encode_peer_info
from rawpunch.proto.server import ServerConfig, ServerCore

S, M = ClientState, MessageType
SERVER_TYPES = [t for t, spec in codec.MESSAGES.items() if not spec.from_client]
CLIENT_TYPES = [t for t, spec in codec.MESSAGES.items() if spec.from_client]
WITH_REQUEST = {S.REGISTERING, S.EXCHANGING, S.READYING, S.REPORTING, S.PROBING}
ANSWER_DELAY = 0.125  # exact in binary, so times and RTTs compare exactly


def drain(client: ClientCore) -> list[Event]:
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events


def observe(client: ClientCore) -> tuple[Any, ...]:
    """What a caller can see of a client, to check that a rejected datagram changed nothing."""
    return client.state, client.get_timer(), client.rtt, client.slot


# --- the transition table, cell by cell ------------------------------------------------------------

# What each cell of client.TRANSITIONS does: (state after, event, request type re-sent at once).
EXPECTED: dict[tuple[ClientState, MessageType], tuple[ClientState, Event | None, MessageType | None]] = {
    (S.REGISTERING, M.COOKIE): (S.REGISTERING, None, M.REGISTER),
    (S.REGISTERING, M.REGISTERED): (S.REGISTERED, Registered(0, A_PUBLIC, TCP_PORT, ANSWER_DELAY), None),
    (S.REGISTERING, M.ERROR): (
        S.FAILED,
        Failed(f"{SERVER} refused REGISTER: ...", ErrorCode.SESSION_FULL),
        None,
    ),
    (S.EXCHANGING, M.COOKIE): (S.EXCHANGING, None, M.INFO),
    (S.EXCHANGING, M.PENDING): (S.EXCHANGING, None, None),
    (S.EXCHANGING, M.PEER): (
        S.PAIRED,
        PeerFound(1, B_PUBLIC, (TcpMapping(40001, Endpoint("2001:db8::b", 51000)),), PEER_INFO),
        None,
    ),
    (S.EXCHANGING, M.ERROR): (S.FAILED, Failed(f"{SERVER} refused INFO: ...", ErrorCode.SESSION_FULL), None),
    (S.READYING, M.COOKIE): (S.READYING, None, M.READY),
    (S.READYING, M.PENDING): (S.READYING, None, None),
    (S.READYING, M.GO): (S.GO, Go(0.12), None),
    (S.READYING, M.ERROR): (S.FAILED, Failed(f"{SERVER} refused READY: ...", ErrorCode.SESSION_FULL), None),
    (S.REPORTING, M.COOKIE): (S.REPORTING, None, M.RESULT),
    (S.REPORTING, M.RESULT_ACK): (S.DONE, ResultAcknowledged(), None),
    (S.REPORTING, M.ERROR): (S.FAILED, Failed(f"{SERVER} refused RESULT: ...", ErrorCode.SESSION_FULL), None),
    (S.PROBING, M.COOKIE): (S.PROBING, None, M.PROBE),
    (S.PROBING, M.PROBE_ACK): (
        S.REGISTERED,
        ProbeAnswer(ProbeKind.HELLO, 16, Endpoint("198.51.100.194", TCP_PORT), TCP_PORT + 1),
        None,
    ),
    # A refused probe leaves the registration intact: the probe reports what it could measure.
    (S.PROBING, M.ERROR): (
        S.REGISTERED,
        Failed(f"{SERVER} refused PROBE: ...", ErrorCode.SESSION_FULL),
        None,
    ),
}


def test_the_expected_outcomes_cover_exactly_the_transition_table() -> None:
    assert set(EXPECTED) == set(TRANSITIONS)
    assert {mtype for _, mtype in TRANSITIONS} <= set(SERVER_TYPES)


def assert_event(got: list[Event], expected: Event | None) -> None:
    if expected is None:
        assert got == []
    elif isinstance(expected, Failed):
        assert len(got) == 1
        assert isinstance(got[0], Failed)
        assert got[0].code is expected.code
        prefix = expected.reason.removesuffix("...")
        assert got[0].reason == f"{prefix}two peers already (error 409 SESSION_FULL)"
    else:
        assert got == [expected]


@pytest.mark.parametrize(
    ("state", "mtype"),
    list(product(ClientState, SERVER_TYPES)),
    ids=[f"{s.name}-{m.name}" for s, m in product(ClientState, SERVER_TYPES)],
)
def test_transition_cell(state: ClientState, mtype: MessageType) -> None:
    driven = client_in(state)
    client = driven.client
    # Answer the latest request: outstanding in the states that have one, already answered otherwise.
    txid = txid_of(driven.request) if driven.request else bytes(12)
    used = {txid_of(driven.request)} if driven.request else set()
    now = driven.now + ANSWER_DELAY
    before = observe(client)
    reply = server_message(mtype, txid)

    if (state, mtype) not in TRANSITIONS:
        with pytest.raises(UnexpectedMessage if state in WITH_REQUEST else ReplayError):
            client.receive_datagram(reply, now)
        assert observe(client) == before
        assert drain(client) == []
        assert client.datagrams_to_send(now) == []
        return

    after, event, resent = EXPECTED[(state, mtype)]
    client.receive_datagram(reply, now)
    assert client.state is after
    assert_event(drain(client), event)
    sent = client.datagrams_to_send(now)
    if resent is None:
        assert sent == []
    else:
        (data,) = sent
        msg = decode_sent(data)
        assert msg.type is resent
        assert msg.get(Attr.COOKIE) == COOKIE
        assert msg.transaction_id not in used
    if after in WITH_REQUEST and mtype is M.PENDING:
        c = client.config
        interval = (
            ready_poll(client.rtt, c.ready_poll_floor, c.poll_interval)
            if after is S.READYING
            else c.poll_interval
        )
        assert client.get_timer() == now + interval
    elif after not in WITH_REQUEST:
        assert client.get_timer() is None


# --- registration: padding, cookie, retransmission -----------------------------------------------------


def test_register_sends_a_padded_register_and_arms_the_timer() -> None:
    client = ClientCore(client_config())
    client.register(100.0)
    (data,) = client.datagrams_to_send(100.0)
    msg = decode_sent(data)
    assert len(data) == REGISTER_SIZE == 128
    assert msg.type is M.REGISTER
    assert msg.get(Attr.COOKIE) is None
    assert msg.get(Attr.PADDING) == bytes(REGISTER_SIZE - 68 - 4)
    assert client.state is S.REGISTERING
    assert client.get_timer() == 100.25


def test_register_is_never_smaller_than_the_servers_answer_to_an_unvalidated_source() -> None:
    server = ServerCore(ServerConfig(tcp_port=TCP_PORT), 0.0)
    client = ClientCore(client_config())
    client.register(1.0)
    (first,) = client.datagrams_to_send(1.0)
    (cookie, _) = server.receive_datagram(first, ("198.51.100.1", 4000), 1.0)[0]
    assert decode_sent(cookie).type is M.COOKIE
    assert len(first) >= len(cookie)
    client.receive_datagram(cookie, 1.125)
    (second,) = client.datagrams_to_send(1.125)
    assert len(second) == REGISTER_SIZE >= len(cookie)
    (registered, _) = server.receive_datagram(second, ("198.51.100.1", 4000), 1.125)[0]
    client.receive_datagram(registered, 1.25)
    assert drain(client) == [Registered(0, Endpoint("198.51.100.1", 4000), TCP_PORT, 0.125)]


def retransmit_until_failed(client: ClientCore) -> tuple[list[float], list[bytes], Failed]:
    """Fire the client's timer, answering nothing, until it gives up (within 100 timers)."""
    times: list[float] = []
    datagrams: list[bytes] = []
    for _ in range(100):
        now = client.get_timer()
        assert now is not None
        client.handle_timer(now)
        events = drain(client)
        if events:
            (failed,) = events
            assert isinstance(failed, Failed)
            return times, datagrams, failed
        (data,) = client.datagrams_to_send(now)
        times.append(now)
        datagrams.append(data)
    raise AssertionError(f"still {client.state.value} after 100 timers")


@pytest.mark.parametrize(
    ("initial_rto", "max_rto", "request_timeout", "gaps"),
    [
        (0.25, 2.0, 10.0, [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
        (0.5, 1.0, 4.0, [0.5, 1.0, 1.0, 1.0, 1.0]),
        (1.0, 8.0, 20.0, [1.0, 2.0, 4.0, 8.0, 8.0]),
    ],
)
def test_retransmission_doubles_the_timeout_up_to_max_rto_under_fresh_txids(
    initial_rto: float, max_rto: float, request_timeout: float, gaps: list[float]
) -> None:
    client = ClientCore(
        client_config(initial_rto=initial_rto, max_rto=max_rto, request_timeout=request_timeout)
    )
    client.register(0.0)
    first = client.datagrams_to_send(0.0)
    times, datagrams, failed = retransmit_until_failed(client)
    sent_at = [0.0, *times]
    # The last gap is the timer at which the client gives up instead of sending again.
    assert [b - a for a, b in zip(sent_at, [*sent_at[1:], sent_at[-1] + gaps[-1]], strict=True)] == gaps
    assert sent_at[-1] < request_timeout <= sent_at[-1] + gaps[-1]
    messages_sent = [decode_sent(d) for d in first + datagrams]
    assert {m.type for m in messages_sent} == {M.REGISTER}
    assert len({m.transaction_id for m in messages_sent}) == len(messages_sent)
    assert client.state is S.FAILED
    assert failed.code is None


def test_timer_does_nothing_before_it_is_due() -> None:
    driven = client_in(S.REGISTERING)
    timer = driven.client.get_timer()
    assert timer is not None
    driven.client.handle_timer(timer - 0.001)
    assert driven.client.datagrams_to_send(timer) == []
    assert driven.client.get_timer() == timer


@pytest.mark.parametrize("state", [S.IDLE, S.REGISTERED, S.PAIRED, S.GO, S.DONE, S.FAILED])
def test_no_timer_without_a_request(state: ClientState) -> None:
    client = client_in(state).client
    assert client.get_timer() is None
    client.handle_timer(1e9)
    assert client.datagrams_to_send(1e9) == []
    assert client.state is state


def test_request_timeout_fails_naming_the_server() -> None:
    client = ClientCore(client_config(request_timeout=10.0))
    client.register(0.0)
    client.datagrams_to_send(0.0)
    _, _, failed = retransmit_until_failed(client)
    assert failed.reason == (f"no answer from {SERVER} for 10 s: is it running, and is UDP to it allowed?")


def test_request_timeout_counts_from_the_last_answer_so_a_long_poll_lives_on() -> None:
    driven = client_in(S.EXCHANGING, request_timeout=10.0, peer_timeout=60.0, poll_interval=1.0)
    last_answer = driven.now
    while driven.now < 130.0:  # 30 s of PENDING answers: three times the request timeout
        now = driven.client.get_timer()
        assert now is not None
        driven.client.handle_timer(now)
        (poll,) = driven.client.datagrams_to_send(now)
        driven.now = last_answer = now + ANSWER_DELAY
        driven.client.receive_datagram(reply_to(poll, M.PENDING), last_answer)
    assert driven.client.state is S.EXCHANGING
    times, _, failed = retransmit_until_failed(driven.client)  # now the server falls silent
    assert failed.reason.startswith(f"no answer from {SERVER} for 10 s")
    assert times[-1] < last_answer + 10.0 <= times[-1] + 1.0


def test_an_answer_to_an_earlier_transmission_is_accepted_and_timed_from_it() -> None:
    driven = client_in(S.REGISTERING)
    first = driven.request
    assert first is not None
    driven.client.handle_timer(100.25)
    (second,) = driven.client.datagrams_to_send(100.25)
    driven.client.receive_datagram(reply_to(first, M.REGISTERED), 100.375)
    assert driven.client.rtt == 0.375  # from the first transmission: no Karn ambiguity
    assert drain(driven.client) == [Registered(0, A_PUBLIC, TCP_PORT, 0.375)]
    with pytest.raises(ReplayError):
        driven.client.receive_datagram(reply_to(second, M.REGISTERED), 100.4)


def test_rtt_is_the_smallest_sample_and_ready_reports_it() -> None:
    driven = client_in(S.REGISTERING)
    driven.answer(M.COOKIE, delay=0.25)
    driven.answer(M.REGISTERED, delay=0.125)
    driven.client.exchange(MY_INFO, driven.now)
    driven.send()
    driven.answer(M.PENDING, delay=0.5)
    driven.answer(M.PEER, delay=3.0)  # pushed, not a direct answer: no sample
    assert driven.client.rtt == 0.125
    driven.client.ready(driven.now)
    assert decode_sent(driven.send()).get(Attr.RTT_MS) == 125


# --- replay and authentication -------------------------------------------------------------------------


def test_a_reply_to_an_unknown_txid_is_a_replay_error() -> None:
    driven = client_in(S.REGISTERING)
    before = observe(driven.client)
    with pytest.raises(ReplayError, match="answers no outstanding request"):
        driven.client.receive_datagram(server_message(M.REGISTERED, b"\xff" * 12), 100.125)
    assert observe(driven.client) == before


def test_a_reply_to_a_finished_request_is_a_replay_error() -> None:
    driven = client_in(S.REGISTERING)
    assert driven.request is not None
    registered = reply_to(driven.request, M.REGISTERED)
    driven.client.receive_datagram(registered, 100.125)
    with pytest.raises(ReplayError):
        driven.client.receive_datagram(registered, 100.25)
    driven.client.exchange(MY_INFO, 100.25)
    with pytest.raises(ReplayError):  # the REGISTER's txid is not the INFO's
        driven.client.receive_datagram(reply_to(driven.request, M.PENDING), 100.375)
    assert driven.client.state is S.EXCHANGING


@pytest.mark.parametrize(
    ("state", "mtype"), [(S.REGISTERING, M.COOKIE), (S.EXCHANGING, M.PENDING)], ids=["COOKIE", "PENDING"]
)
def test_a_second_reply_to_the_same_txid_is_a_replay_error(state: ClientState, mtype: MessageType) -> None:
    driven = client_in(state)
    assert driven.request is not None
    reply = reply_to(driven.request, mtype)
    driven.client.receive_datagram(reply, 100.125)
    driven.client.datagrams_to_send(100.125)
    with pytest.raises(ReplayError):
        driven.client.receive_datagram(reply, 100.25)
    assert driven.client.datagrams_to_send(100.25) == []


def test_the_peer_is_pushed_to_a_txid_that_was_answered_pending() -> None:
    driven = client_in(S.EXCHANGING)
    assert driven.request is not None
    poll = driven.request
    driven.answer(M.PENDING)
    driven.client.receive_datagram(reply_to(poll, M.PEER), 105.0)
    assert driven.client.state is S.PAIRED


def test_a_reply_from_another_session_is_an_authentication_error() -> None:
    driven = client_in(S.REGISTERING)
    assert driven.request is not None
    other = server_message(M.REGISTERED, txid_of(driven.request), keys=OTHER_KEYS)
    with pytest.raises(AuthenticationError, match="another session"):
        driven.client.receive_datagram(other, 100.125)
    assert driven.client.state is S.REGISTERING


def test_a_forged_reply_is_an_authentication_error() -> None:
    driven = client_in(S.REGISTERING)
    assert driven.request is not None
    msg = Message(M.REGISTERED, txid_of(driven.request), KEYS.session_id, reply_attrs(M.REGISTERED))
    forged = codec.encode(msg, OTHER_KEYS.control_key)  # our session id, someone else's key
    with pytest.raises(AuthenticationError, match="HMAC"):
        driven.client.receive_datagram(forged, 100.125)
    assert driven.client.state is S.REGISTERING


@pytest.mark.parametrize("mtype", CLIENT_TYPES)
def test_client_messages_are_refused(mtype: MessageType) -> None:
    driven = client_in(S.EXCHANGING)
    assert driven.request is not None
    typical: dict[Attr, Any] = {
        Attr.COOKIE: COOKIE,
        Attr.SEALED: bytes(28),
        Attr.RESULT: ResultInfo(ResultCode.FAILED, 0, ""),
        Attr.TOKEN: TOKEN,
        Attr.LOCAL_PORT: 1,
    }
    attrs = tuple((a, v) for a, v in typical.items() if a in codec.MESSAGES[mtype].required)
    with pytest.raises(UnexpectedMessage, match="is a client message"):
        driven.client.receive_datagram(server_message(mtype, txid_of(driven.request), attrs), 100.125)


def test_garbage_is_malformed() -> None:
    driven = client_in(S.REGISTERING)
    with pytest.raises(MalformedMessage):
        driven.client.receive_datagram(b"\x00" * 100, 100.125)


# --- long polls -------------------------------------------------------------------------------------


def test_pending_switches_from_the_rto_to_the_poll_interval() -> None:
    driven = client_in(S.EXCHANGING, poll_interval=1.0)
    assert driven.client.get_timer() == driven.now + 0.25
    driven.answer(M.PENDING)
    pending_at = driven.now
    assert driven.client.get_timer() == pending_at + 1.0
    polls = []
    for _ in range(4):
        now = driven.client.get_timer()
        assert now is not None
        driven.client.handle_timer(now)
        (poll,) = driven.client.datagrams_to_send(now)
        polls.append(now)
        assert decode_sent(poll).type is M.INFO
        driven.client.receive_datagram(reply_to(poll, M.PENDING), now + ANSWER_DELAY)
    assert [b - a for a, b in zip([pending_at, *polls], polls, strict=False)] == [1.0] * 4


@pytest.mark.parametrize(("rtt", "expected"), [(None, 1.0), (0.01, 0.05), (0.06, 0.12), (0.8, 1.0)])
def test_ready_polls_every_two_round_trips_within_bounds(rtt: float | None, expected: float) -> None:
    assert ready_poll(rtt, 0.05, 1.0) == expected


def test_a_ready_poll_comes_two_round_trips_after_pending_and_a_duplicate_go_is_dropped() -> None:
    driven = client_in(S.READYING, poll_interval=1.0)
    rtt = driven.client.rtt
    assert rtt is not None and 0.025 < rtt < 0.5  # the helper's round trips, so 2 * rtt is the interval
    driven.answer(M.PENDING)
    now = driven.client.get_timer()
    assert now == pytest.approx(driven.now + 2 * rtt)
    driven.client.handle_timer(now)
    (poll,) = driven.client.datagrams_to_send(now)
    assert decode_sent(poll).type is M.READY
    go = reply_to(poll, M.GO, ((Attr.DELAY_MS, 0),))
    driven.client.receive_datagram(go, now + ANSWER_DELAY)
    assert driven.client.state is S.GO
    with pytest.raises(ReplayError):
        driven.client.receive_datagram(go, now + 2 * ANSWER_DELAY)
    assert driven.client.state is S.GO


@pytest.mark.parametrize("state", [S.EXCHANGING, S.READYING])
def test_peer_timeout_during_the_long_poll_fails(state: ClientState) -> None:
    driven = client_in(state, poll_interval=1.0, peer_timeout=5.0, request_timeout=10.0)
    started = driven.now
    driven.answer(M.PENDING)
    for _ in range(20):
        if driven.client.state is not state:
            break
        now = driven.client.get_timer()
        assert now is not None
        driven.client.handle_timer(now)
        for poll in driven.client.datagrams_to_send(now):
            driven.client.receive_datagram(reply_to(poll, M.PENDING), now + ANSWER_DELAY)
    (failed,) = drain(driven.client)
    assert isinstance(failed, Failed)
    assert failed.reason.startswith("the peer never came: no peer joined this session within 5 s")
    assert "--session" in failed.reason
    assert started + 5.0 <= now < started + 6.0
    assert driven.client.state is S.FAILED


def test_a_cookie_is_kept_for_every_later_request_and_replaced_by_a_new_one() -> None:
    driven = client_in(S.REGISTERING)
    driven.answer(M.COOKIE)
    assert driven.request is not None
    assert decode_sent(driven.request).attributes[0] == (Attr.COOKIE, COOKIE)
    driven.answer(M.REGISTERED)
    driven.client.exchange(MY_INFO, driven.now)
    assert decode_sent(driven.send()).get(Attr.COOKIE) == COOKIE
    fresh = bytes(range(50, 74))
    driven.client.receive_datagram(reply_to(driven.request, M.COOKIE, ((Attr.COOKIE, fresh),)), driven.now)
    (resent,) = driven.client.datagrams_to_send(driven.now)
    assert decode_sent(resent).get(Attr.COOKIE) == fresh
    assert decode_sent(resent).get(Attr.SEALED) == decode_sent(driven.request).get(Attr.SEALED)


def test_an_error_fails_with_the_code_and_the_servers_reason() -> None:
    driven = client_in(S.EXCHANGING)
    assert driven.request is not None
    error = ((Attr.ERROR, ErrorInfo(ErrorCode.UNKNOWN_PEER, "not registered (or expired): register again")),)
    driven.client.receive_datagram(reply_to(driven.request, M.ERROR, error), 100.5)
    assert drain(driven.client) == [
        Failed(
            f"{SERVER} refused INFO: not registered (or expired): register again (error 404 UNKNOWN_PEER)",
            ErrorCode.UNKNOWN_PEER,
        )
    ]
    assert driven.client.state is S.FAILED
    assert driven.client.get_timer() is None


# --- the peer's information --------------------------------------------------------------------------


def peer_reply(driven: Driven, slot: int, sealed: bytes) -> bytes:
    assert driven.request is not None
    attrs = ((Attr.SLOT, slot), (Attr.PEER_UDP, B_PUBLIC), (Attr.SEALED, sealed))
    return reply_to(driven.request, M.PEER, attrs)


@pytest.mark.parametrize("slot", [0, 2, 255])
def test_a_peer_that_is_not_in_the_other_slot_is_unexpected(slot: int) -> None:
    driven = client_in(S.EXCHANGING)
    before = observe(driven.client)
    with pytest.raises(UnexpectedMessage, match=f"PEER names slot {slot}"):
        driven.client.receive_datagram(
            peer_reply(driven, slot, KEYS.seal(encode_peer_info(PEER_INFO), slot)), 101.0
        )
    assert observe(driven.client) == before
    assert drain(driven.client) == []


@pytest.mark.parametrize(
    "sealed",
    [
        OTHER_KEYS.seal(encode_peer_info(PEER_INFO), 1),  # the peer used another secret
        KEYS.seal(encode_peer_info(PEER_INFO), 0),  # sealed for the other direction
        KEYS.seal(b"not a peer info", 1),  # sealed, but nonsense inside
    ],
    ids=["other secret", "wrong slot", "garbage inside"],
)
def test_unreadable_peer_info_fails_the_client(sealed: bytes) -> None:
    driven = client_in(S.EXCHANGING)
    driven.client.receive_datagram(peer_reply(driven, 1, sealed), 101.0)
    (failed,) = drain(driven.client)
    assert isinstance(failed, Failed)
    assert failed.reason.startswith("could not read the peer's info: ")
    assert driven.client.state is S.FAILED


# --- TCP discovery -----------------------------------------------------------------------------------


def discovered(request: bytes, local_port: int) -> bytes:
    mapping = TcpMapping(local_port, Endpoint("203.0.113.7", 41000))
    return reply_to(request, M.DISCOVERED, ((Attr.MAPPED_TCP, mapping),))


def test_discovery_request_carries_the_token_and_the_local_port() -> None:
    driven = client_in(S.REGISTERED)
    assert driven.request is not None
    request = driven.client.discovery_request(40000)
    msg = decode_sent(request)
    assert msg.type is M.DISCOVER
    assert msg.get(Attr.TOKEN) == TOKEN
    assert msg.get(Attr.LOCAL_PORT) == 40000
    assert msg.transaction_id != txid_of(driven.request)
    assert driven.client.discovery_response(discovered(request, 40000)) == TcpMapping(
        40000, Endpoint("203.0.113.7", 41000)
    )
    assert driven.client.state is S.REGISTERED
    assert driven.client.datagrams_to_send(driven.now) == []


def test_discovery_response_for_another_port_is_unexpected() -> None:
    client = client_in(S.REGISTERED).client
    request = client.discovery_request(40000)
    with pytest.raises(UnexpectedMessage, match="answered for local port 40001, asked 40000"):
        client.discovery_response(discovered(request, 40001))


def test_discovery_response_to_an_unknown_or_answered_txid_is_a_replay_error() -> None:
    client = client_in(S.REGISTERED).client
    request = client.discovery_request(40000)
    reply = discovered(request, 40000)
    with pytest.raises(ReplayError):
        client.discovery_response(server_message(M.DISCOVERED, b"\x07" * 12))
    client.discovery_response(reply)
    with pytest.raises(ReplayError):
        client.discovery_response(reply)


@pytest.mark.parametrize(
    ("mtype", "attrs", "text"),
    [
        (
            M.ERROR,
            ((Attr.ERROR, ErrorInfo(ErrorCode.BAD_REQUEST, "no such token")),),
            "server refused discovery: no such token",
        ),
        (M.PENDING, (), "PENDING on the TCP discovery port"),
    ],
)
def test_discovery_refusals_are_unexpected(mtype: MessageType, attrs: Any, text: str) -> None:
    client = client_in(S.REGISTERED).client
    request = client.discovery_request(40000)
    with pytest.raises(UnexpectedMessage, match=text):
        client.discovery_response(reply_to(request, mtype, attrs))


def test_discovery_response_from_another_session_is_an_authentication_error() -> None:
    client = client_in(S.REGISTERED).client
    request = client.discovery_request(40000)
    with pytest.raises(AuthenticationError):
        client.discovery_response(reply_to(request, M.DISCOVERED, keys=OTHER_KEYS))


# --- misuse by the local caller --------------------------------------------------------------------

ACTIONS: dict[str, Callable[[ClientCore, float], Any]] = {
    "register": lambda c, now: c.register(now),
    "exchange": lambda c, now: c.exchange(MY_INFO, now),
    "ready": lambda c, now: c.ready(now),
    "report": lambda c, now: c.report(ResultInfo(ResultCode.CONNECTED, 1, ""), now),
    "discovery_request": lambda c, now: c.discovery_request(40000),
}
# (state, action) -> state after; every pair not listed raises LocalProtocolError.
ALLOWED: dict[tuple[ClientState, str], ClientState] = {
    (S.IDLE, "register"): S.REGISTERING,
    (S.REGISTERED, "exchange"): S.EXCHANGING,
    (S.PAIRED, "exchange"): S.EXCHANGING,
    (S.PAIRED, "ready"): S.READYING,
    (S.GO, "ready"): S.READYING,  # the next attempt of a strategy cascade
    (S.PAIRED, "report"): S.REPORTING,
    (S.GO, "report"): S.REPORTING,
}
DISCOVERY_STATES = set(ClientState) - {S.IDLE, S.REGISTERING, S.FAILED}


@pytest.mark.parametrize(
    ("state", "action"),
    list(product(ClientState, ACTIONS)),
    ids=[f"{s.name}-{a}" for s, a in product(ClientState, ACTIONS)],
)
def test_user_action(state: ClientState, action: str) -> None:
    driven = client_in(state)
    client = driven.client
    now = driven.now + 1.0
    if action == "discovery_request":
        if state in DISCOVERY_STATES:  # once the token is known, discovery works in any state
            assert decode_sent(ACTIONS[action](client, now)).type is M.DISCOVER
        else:
            with pytest.raises(LocalProtocolError, match="needs a registered client"):
                ACTIONS[action](client, now)
        assert client.state is state
        return
    if (state, action) in ALLOWED:
        ACTIONS[action](client, now)
        assert client.state is ALLOWED[(state, action)]
        assert len(client.datagrams_to_send(now)) == 1
        assert client.get_timer() == now + client.config.initial_rto
        return
    before = observe(client)
    with pytest.raises(LocalProtocolError, match=f"state is {state.value}"):
        ACTIONS[action](client, now)
    assert observe(client) == before
    assert client.datagrams_to_send(now) == []


# --- whatever the server sends ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.sampled_from(sorted(WITH_REQUEST, key=lambda s: s.value)),
    msg=messages(st.sampled_from(SERVER_TYPES)),
)
def test_any_authentic_server_message_is_a_table_transition_or_a_protocol_error(
    state: ClientState, msg: Message
) -> None:
    driven = client_in(state)
    assert driven.request is not None
    forged = Message(msg.type, txid_of(driven.request), KEYS.session_id, msg.attributes)
    before = observe(driven.client)
    try:
        driven.client.receive_datagram(codec.encode(forged, KEYS.control_key), driven.now + 0.125)
    except RemoteProtocolError:
        assert observe(driven.client) == before
        return
    assert (state, msg.type) in TRANSITIONS
    assert driven.client.state in (EXPECTED[(state, msg.type)][0], S.FAILED)


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=300))
def test_random_datagrams_raise_only_protocol_errors(data: bytes) -> None:
    driven = client_in(S.EXCHANGING)
    with pytest.raises(RemoteProtocolError):
        driven.client.receive_datagram(data, 101.0)
