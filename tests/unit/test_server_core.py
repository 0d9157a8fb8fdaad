"""The rendezvous server core (``rawpunch.proto.server``): address validation and amplification,
registration and pairing, long-poll pushes, synchronised GO, no reflection, caps, rate limiting, expiry,
anti-replay, TCP discovery, bounded state; and two ClientCores pumped through it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from helpers import KEYS, OTHER_KEYS, TCP_PORT, Rendezvous, messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawpunch.proto import codec
from rawpunch.proto.client import Failed, Go, PeerFound, Registered, ResultAcknowledged
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    Message,
    MessageType,
    ResultCode,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import (
    AuthenticationError,
    RemoteProtocolError,
    ReplayError,
    UnexpectedMessage,
)
from rawpunch.proto.keys import SessionKeys, control_key
from rawpunch.proto.replay import TxidSource
from rawpunch.proto.server import GO_COPIES, ServerConfig, ServerCore

M = MessageType
Addr = tuple[str, int]
A_ADDR: Addr = ("203.0.113.10", 40000)
B_ADDR: Addr = ("2001:db8::20", 50000)
X_ADDR: Addr = ("198.51.100.66", 6666)  # an attacker, or just a stranger
T0 = 1000.0
RTT = 0.125
CLIENT_TYPES = [t for t, spec in codec.MESSAGES.items() if spec.from_client]


def make_server(**overrides: Any) -> ServerCore:
    return ServerCore(ServerConfig(tcp_port=TCP_PORT, cookie_key=bytes(32), **overrides), T0)


Out = list[tuple[Message, Addr]]


class Peer:
    """One client run at one UDP address, with hand-built requests (full control of txids, cookies and
    padding, which ClientCore would not give)."""

    def __init__(
        self, server: ServerCore, addr: Addr, keys: SessionKeys = KEYS, instance: bytes = b"run1"
    ) -> None:
        self.server, self.addr, self.keys = server, addr, keys
        self.txids = TxidSource(instance)
        self.cookie: bytes | None = None
        self.slot: int | None = None
        self.token: bytes | None = None
        self.sealed: bytes | None = None
        self.last: bytes = b""

    def request(
        self, mtype: MessageType, attrs: tuple[tuple[Attr, Any], ...] = (), *, pad_to: int = 0
    ) -> bytes:
        if (
            self.cookie is not None
            and Attr.COOKIE in codec.MESSAGES[mtype].optional | codec.MESSAGES[mtype].required
        ):
            attrs = ((Attr.COOKIE, self.cookie), *attrs)
        txid = self.txids.next()
        size = len(codec.encode(Message(mtype, txid, self.keys.session_id, attrs), self.keys.control_key))
        if pad_to > size:
            attrs = (*attrs, (Attr.PADDING, bytes(max(pad_to - size - 4, 0))))
        self.last = codec.encode(Message(mtype, txid, self.keys.session_id, attrs), self.keys.control_key)
        return self.last

    def send(self, data: bytes, now: float) -> Out:
        """Hand ``data`` to the server from this address; its answers, decoded, with their destinations."""
        out = self.server.receive_datagram(data, self.addr, now)
        return [(codec.decode(reply, self.keys.control_key), dst) for reply, dst in out]

    def ask(self, mtype: MessageType, now: float, attrs: tuple[tuple[Attr, Any], ...] = (), **kw: Any) -> Out:
        return self.send(self.request(mtype, attrs, **kw), now)

    def get_cookie(self, now: float) -> bytes:
        self.cookie = None
        ((cookie, dst),) = self.ask(M.REGISTER, now, pad_to=128)
        assert cookie.type is M.COOKIE and dst == self.addr
        self.cookie = cookie.get(Attr.COOKIE)
        return self.cookie

    def register(self, now: float, rtt: float = RTT) -> Message:
        self.get_cookie(now)
        ((reply, dst),) = self.ask(M.REGISTER, now + rtt, pad_to=128)
        assert reply.type is M.REGISTERED, reply
        assert dst == self.addr
        self.slot, self.token = reply.get(Attr.SLOT), reply.get(Attr.TOKEN)
        return reply

    def info(self, now: float) -> Out:
        self.sealed = self.keys.seal(b"info of " + self.addr[0].encode(), self.slot or 0)
        return self.ask(M.INFO, now, ((Attr.SEALED, self.sealed),))

    def discover(self, local_port: int, tcp_addr: Addr, now: float, token: bytes | None = None) -> Message:
        attrs = ((Attr.TOKEN, token or self.token), (Attr.LOCAL_PORT, local_port))
        data = codec.encode(
            Message(M.DISCOVER, self.txids.next(), self.keys.session_id, attrs), self.keys.control_key
        )
        self.last = data
        return codec.decode(self.server.receive_discovery(data, tcp_addr, now), self.keys.control_key)


def only(out: Out) -> tuple[Message, Addr]:
    out = once(out)
    assert len(out) == 1, out
    return out[0]


def once(out: Out) -> Out:
    """What the server sent, each GO counted once after checking it went ``GO_COPIES`` times back to back."""
    distinct: Out = []
    i = 0
    while i < len(out):
        copies = GO_COPIES if out[i][0].type is M.GO else 1
        assert out[i : i + copies] == [out[i]] * copies, out
        distinct.append(out[i])
        i += copies
    return distinct


def registered_pair(server: ServerCore, now: float = T0) -> tuple[Peer, Peer]:
    a, b = Peer(server, A_ADDR), Peer(server, B_ADDR)
    a.register(now)
    b.register(now)
    return a, b


def session_of(server: ServerCore, keys: SessionKeys = KEYS) -> Any:
    return server.sessions[keys.session_id]


# --- address validation: cookies and amplification ------------------------------------------------------


def test_the_first_register_gets_a_cookie_no_larger_than_the_request_and_no_state() -> None:
    server = make_server()
    peer = Peer(server, A_ADDR)
    request = peer.request(M.REGISTER, pad_to=128)
    out = server.receive_datagram(request, A_ADDR, T0)
    assert [dst for _, dst in out] == [A_ADDR]
    assert len(out[0][0]) <= len(request)
    cookie = codec.decode(out[0][0], KEYS.control_key)
    assert cookie.type is M.COOKIE
    assert cookie.transaction_id == codec.peek_header(request).transaction_id
    assert len(cookie.get(Attr.COOKIE)) == codec.COOKIE_LEN
    assert server.sessions == {}
    assert server._tokens == {}
    assert not server.peers_per_source


@pytest.mark.parametrize(("size", "answered"), [(68, False), (92, False), (96, True), (128, True)])
def test_a_request_smaller_than_the_cookie_gets_nothing(size: int, answered: bool) -> None:
    server = make_server()
    request = Peer(server, A_ADDR).request(M.REGISTER, pad_to=size)
    assert len(request) == size
    out = server.receive_datagram(request, A_ADDR, T0)
    assert bool(out) is answered
    assert sum(len(data) for data, _ in out) <= size


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages(st.sampled_from(CLIENT_TYPES)), port=st.integers(1, 0xFFFF))
def test_an_unvalidated_source_never_gets_more_bytes_than_it_sent(msg: Message, port: int) -> None:
    server = make_server()
    source = ("192.0.2.99", port)
    data = codec.encode(msg, control_key(msg.session_id))  # authentic, but any cookie in it is made up
    out = server.receive_datagram(data, source, T0)
    assert sum(len(reply) for reply, _ in out) <= len(data)
    assert all(dst == source for _, dst in out)
    assert server.sessions == {}


@pytest.mark.parametrize(
    "elsewhere", [("203.0.113.10", 40001), ("203.0.113.11", 40000)], ids=["port", "host"]
)
def test_a_cookie_from_another_address_gets_a_fresh_cookie(elsewhere: Addr) -> None:
    server = make_server()
    a = Peer(server, A_ADDR)
    cookie = a.get_cookie(T0)
    thief = Peer(server, elsewhere)
    thief.cookie = cookie
    reply, dst = only(thief.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert (reply.type, dst) == (M.COOKIE, elsewhere)
    assert reply.get(Attr.COOKIE) != cookie
    assert server.sessions == {}


@pytest.mark.parametrize(
    ("age", "accepted"),
    [(-1.5, False), (-1.0, True), (0.0, True), (30.0, True), (30.001, False), (3600.0, False)],
)
def test_cookie_lifetime(age: float, accepted: bool) -> None:
    server = make_server(cookie_lifetime=30.0)
    peer = Peer(server, A_ADDR)
    peer.get_cookie(T0)
    reply, _ = only(peer.ask(M.REGISTER, T0 + age, pad_to=128))
    assert reply.type is (M.REGISTERED if accepted else M.COOKIE)


def test_a_cookie_for_another_session_gets_a_fresh_cookie() -> None:
    server = make_server()
    other = Peer(server, A_ADDR, keys=OTHER_KEYS)
    mine = Peer(server, A_ADDR)
    mine.cookie = other.get_cookie(T0)
    reply, _ = only(mine.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert reply.type is M.COOKIE


def test_a_tampered_cookie_gets_a_fresh_cookie() -> None:
    server = make_server()
    peer = Peer(server, A_ADDR)
    cookie = peer.get_cookie(T0)
    peer.cookie = cookie[:-1] + bytes([cookie[-1] ^ 1])
    reply, _ = only(peer.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert reply.type is M.COOKIE


def test_another_server_key_does_not_accept_the_cookie() -> None:
    server = make_server()
    peer = Peer(server, A_ADDR)
    peer.get_cookie(T0)
    peer.server = ServerCore(ServerConfig(tcp_port=TCP_PORT, cookie_key=b"\x01" * 32), T0)
    reply, _ = only(peer.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert reply.type is M.COOKIE


# --- registration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("addr", [A_ADDR, B_ADDR], ids=["IPv4", "IPv6"])
def test_registration_answers_slot_observed_endpoint_port_token_and_rtt(addr: Addr) -> None:
    server = make_server()
    reply = Peer(server, addr).register(T0, rtt=0.25)
    assert reply.attributes[:4] == (
        (Attr.SLOT, 0),
        (Attr.MAPPED_UDP, Endpoint(*addr)),
        (Attr.TCP_PORT, TCP_PORT),
        (Attr.TOKEN, reply.get(Attr.TOKEN)),
    )
    assert reply.get(Attr.RTT_MS) == 250  # the cookie's age
    assert len(reply.get(Attr.TOKEN)) == 16
    assert server.peers_per_source[addr[0]] == 1
    assert reply.get(Attr.TOKEN) in server._tokens


def test_the_second_peer_gets_the_other_slot_and_its_own_token() -> None:
    server = make_server()
    a, b = registered_pair(server)
    assert (a.slot, b.slot) == (0, 1)
    assert a.token != b.token
    assert len(server.sessions) == 1


def test_registering_again_from_the_same_run_is_idempotent() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    reply, _ = only(a.ask(M.REGISTER, T0 + 1, pad_to=128))  # as if the REGISTERED was lost
    assert (reply.type, reply.get(Attr.SLOT), reply.get(Attr.TOKEN)) == (M.REGISTERED, a.slot, a.token)
    assert server.peers_per_source[A_ADDR[0]] == 1
    assert len(server._tokens) == 2


def test_a_third_peer_gets_session_full_and_changes_nothing() -> None:
    server = make_server()
    registered_pair(server)
    third = Peer(server, X_ADDR)
    third.get_cookie(T0)
    reply, dst = only(third.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert dst == X_ADDR
    assert reply.type is M.ERROR
    assert reply.get(Attr.ERROR).code is ErrorCode.SESSION_FULL
    session = session_of(server)
    assert [p.addr for p in session.peers] == [A_ADDR, B_ADDR]
    assert X_ADDR[0] not in server.peers_per_source


def test_a_restarted_client_takes_its_slot_back() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    old_token = a.token
    restarted = Peer(server, A_ADDR, instance=b"run2")
    reply = restarted.register(T0 + 5)
    assert reply.get(Attr.SLOT) == a.slot
    assert restarted.token != old_token
    assert old_token not in server._tokens
    assert restarted.token in server._tokens
    assert server.peers_per_source[A_ADDR[0]] == 1
    # The old run is gone: its requests are replays from another run now.
    assert a.ask(M.INFO, T0 + 6, ((Attr.SEALED, bytes(28)),)) == []
    assert server.stats["dropped_ReplayError"] == 1
    with pytest.raises(UnexpectedMessage):
        a.discover(5000, A_ADDR, T0 + 6)


# --- pairing: the long poll for INFO -----------------------------------------------------------------------


def test_first_info_waits_and_the_peer_is_pushed_to_its_latest_poll() -> None:
    server = make_server()
    a, b = registered_pair(server)
    a.discover(5000, ("203.0.113.10", 45000), T0 + 1)
    b.discover(6000, ("2001:db8::20", 56000), T0 + 1)
    reply, dst = only(a.info(T0 + 2))
    assert (reply.type, dst) == (M.PENDING, A_ADDR)
    reply, _ = only(a.info(T0 + 3))  # the poll
    assert reply.type is M.PENDING
    latest_poll = codec.peek_header(a.last).transaction_id

    out = b.info(T0 + 3.5)
    assert [(m.type, dst) for m, dst in out] == [(M.PEER, B_ADDR), (M.PEER, A_ADDR)]
    to_b, to_a = out[0][0], out[1][0]
    assert to_b.transaction_id == codec.peek_header(b.last).transaction_id
    assert to_a.transaction_id == latest_poll
    assert to_b.attributes == (
        (Attr.SLOT, 0),
        (Attr.PEER_UDP, Endpoint(*A_ADDR)),
        (Attr.PEER_TCP, TcpMapping(5000, Endpoint("203.0.113.10", 45000))),
        (Attr.SEALED, a.sealed),
        (Attr.PAIRED_US, round((3.5 - RTT) * 1e6)),  # b's REGISTER arrived at T0 + RTT: both registered
    )
    assert to_a.attributes == (
        (Attr.SLOT, 1),
        (Attr.PEER_UDP, Endpoint(*B_ADDR)),
        (Attr.PEER_TCP, TcpMapping(6000, Endpoint("2001:db8::20", 56000))),
        (Attr.SEALED, b.sealed),
        (Attr.PAIRED_US, round((3.5 - RTT) * 1e6)),  # b's REGISTER arrived at T0 + RTT: both registered
    )


def test_a_poll_after_a_lost_push_is_answered_directly_and_pushes_nothing() -> None:
    server = make_server()
    a, b = registered_pair(server)
    a.info(T0 + 1)
    assert len(b.info(T0 + 2)) == 2  # the push to A is lost on the way
    reply, dst = only(a.info(T0 + 3))
    assert (reply.type, dst, reply.get(Attr.SEALED)) == (M.PEER, A_ADDR, b.sealed)
    reply, dst = only(b.info(T0 + 4))  # B's PEER was lost too
    assert (reply.type, dst, reply.get(Attr.SEALED)) == (M.PEER, B_ADDR, a.sealed)


def test_info_before_the_peer_registered_waits() -> None:
    server = make_server()
    a = Peer(server, A_ADDR)
    a.register(T0)
    assert only(a.info(T0 + 1))[0].type is M.PENDING
    b = Peer(server, B_ADDR)
    b.register(T0 + 2)
    assert [(m.type, dst) for m, dst in b.info(T0 + 3)] == [(M.PEER, B_ADDR), (M.PEER, A_ADDR)]


# --- GO: both fire at the same moment ---------------------------------------------------------------------


def paired(server: ServerCore, rtt_a: float, rtt_b: float) -> tuple[Peer, Peer]:
    a, b = Peer(server, A_ADDR), Peer(server, B_ADDR)
    a.register(T0, rtt=rtt_a)
    b.register(T0, rtt=rtt_b)
    a.info(T0 + 1)
    b.info(T0 + 1)
    return a, b


def ready(peer: Peer, now: float, rtt_ms: int | None) -> Out:
    return peer.ask(M.READY, now, () if rtt_ms is None else ((Attr.RTT_MS, rtt_ms),))


# RTTs from the cookie's age at registration, or RTT_MS in READY when given; delays are max(owd) - owd.
GO_CASES = {
    "B farther": (0.25, 0.5, None, None, 125, 0),
    "A farther": (0.5, 0.25, None, None, 0, 125),
    "equal": (0.125, 0.125, None, None, 0, 0),
    "READY's RTT_MS overrides the cookie's age": (0.25, 0.5, 60, 200, 70, 0),
    "one RTT_MS, one cookie age": (0.25, 0.5, 300, None, 100, 0),
    "the farther peer readies first": (0.5, 0.25, 400, 100, 0, 150),
}


@pytest.mark.parametrize("case", GO_CASES)
def test_go_delays_make_both_punches_leave_together(case: str) -> None:
    rtt_a, rtt_b, ready_a, ready_b, delay_a, delay_b = GO_CASES[case]
    server = make_server(cookie_lifetime=60.0)
    a, b = paired(server, rtt_a, rtt_b)
    reply, _ = only(ready(a, T0 + 2, ready_a))
    assert reply.type is M.PENDING
    poll = codec.peek_header(a.last).transaction_id
    out = once(ready(b, T0 + 2, ready_b))
    assert [(m.type, dst) for m, dst in out] == [(M.GO, B_ADDR), (M.GO, A_ADDR)]
    assert out[1][0].transaction_id == poll
    assert out[0][0].get(Attr.DELAY_MS) == delay_b
    assert out[1][0].get(Attr.DELAY_MS) == delay_a


def test_a_late_ready_gets_what_remains_of_the_delay_and_never_less_than_zero() -> None:
    server = make_server(cookie_lifetime=60.0)
    a, b = paired(server, 0.25, 0.5)  # fire at T + 0.25; A's one-way delay is 0.125
    ready(a, T0 + 2, None)
    ready(b, T0 + 2, None)  # A's GO is lost on the way
    reply, _ = only(ready(a, T0 + 2.03125, None))
    assert (reply.type, reply.get(Attr.DELAY_MS)) == (M.GO, 94)  # 250 - 31.25 - 125 ms
    reply, _ = only(ready(a, T0 + 3, None))
    assert (reply.type, reply.get(Attr.DELAY_MS)) == (M.GO, 0)
    assert only(ready(b, T0 + 3, None))[0].get(Attr.DELAY_MS) == 0


def test_ready_alone_waits() -> None:
    server = make_server()
    a, _ = paired(server, RTT, RTT)
    reply, dst = only(ready(a, T0 + 2, None))
    assert (reply.type, dst) == (M.PENDING, A_ADDR)


def test_a_push_answers_only_a_poll_of_the_same_kind() -> None:
    server = make_server()
    a, b = registered_pair(server)
    a.info(T0 + 1)
    b.info(T0 + 1)
    assert only(ready(a, T0 + 2, None))[0].type is M.PENDING  # A waits in the READY long poll
    restarted = Peer(server, B_ADDR, instance=b"run2")
    restarted.register(T0 + 3)
    assert [(m.type, dst) for m, dst in restarted.info(T0 + 4)] == [(M.PEER, B_ADDR)]
    assert [(m.type, dst) for m, dst in once(ready(restarted, T0 + 5, None))] == [
        (M.GO, B_ADDR),
        (M.GO, A_ADDR),
    ]


def test_result_is_acknowledged_and_kept() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    result = ResultInfo(ResultCode.CONNECTED, 321, "direct")
    reply, dst = only(a.ask(M.RESULT, T0 + 1, ((Attr.RESULT, result),)))
    assert (reply.type, dst) == (M.RESULT_ACK, A_ADDR)
    assert session_of(server).peers[0].result == result


# --- no reflection ----------------------------------------------------------------------------------------


def test_info_from_an_unregistered_address_gets_unknown_peer_to_the_source_only() -> None:
    server = make_server()
    a, b = registered_pair(server)
    a.info(T0 + 1)  # A waits for a push
    stranger = Peer(server, X_ADDR)
    stranger.get_cookie(T0 + 2)  # a perfectly valid cookie, for its own address
    reply, dst = only(stranger.info(T0 + 2))
    assert (reply.type, dst) == (M.ERROR, X_ADDR)
    assert reply.get(Attr.ERROR).code is ErrorCode.UNKNOWN_PEER
    assert server.stats["error_UNKNOWN_PEER"] == 1
    # A is still waiting, untouched: B's INFO is what gets pushed to it.
    assert [(m.type, dst) for m, dst in b.info(T0 + 3)] == [(M.PEER, B_ADDR), (M.PEER, A_ADDR)]


@pytest.mark.parametrize("mtype", [M.INFO, M.READY, M.RESULT, M.REGISTER])
def test_a_request_with_a_peers_cookie_from_elsewhere_is_never_answered_at_the_peer(
    mtype: MessageType,
) -> None:
    server = make_server()
    a, _ = registered_pair(server)
    spoofer = Peer(server, X_ADDR)
    spoofer.cookie = a.cookie
    attrs = {
        M.INFO: ((Attr.SEALED, bytes(100)),),
        M.READY: (),
        M.RESULT: ((Attr.RESULT, ResultInfo(ResultCode.FAILED, 0, "")),),
        M.REGISTER: (),
    }[mtype]
    out = spoofer.ask(mtype, T0 + 1, attrs, pad_to=300)
    assert [(m.type, dst) for m, dst in out] == [(M.COOKIE, X_ADDR)]


@pytest.mark.parametrize("attr", [Attr.PEER_UDP, Attr.MAPPED_UDP, Attr.PEER_TCP])
def test_a_client_cannot_claim_endpoints(attr: Attr) -> None:
    server = make_server()
    a, b = registered_pair(server)
    value: Any = Endpoint("192.0.2.200", 1)
    if attr is Attr.PEER_TCP:
        value = TcpMapping(1, value)
    out = a.ask(M.INFO, T0 + 1, ((Attr.SEALED, bytes(28)), (attr, value)))
    assert out == []
    assert server.stats["dropped_MalformedMessage"] == 1
    reply, _ = only(b.info(T0 + 2))  # nothing of the claim reached the session
    assert reply.type is M.PENDING


def test_a_udp_discover_never_records_a_tcp_mapping() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    attrs = ((Attr.TOKEN, a.token), (Attr.LOCAL_PORT, 5000))
    out = a.ask(M.DISCOVER, T0 + 1, attrs, pad_to=128)
    # DISCOVER belongs on the TCP port (the TCP handshake is its address check): over UDP it is dropped.
    assert out == []
    assert server.stats["dropped_UnexpectedMessage"] == 1
    assert session_of(server).peers[0].tcp == {}


# --- caps --------------------------------------------------------------------------------------------------


def keys_of_new_session() -> SessionKeys:
    """Keys of a fresh session, without scrypt: the server only ever uses the id and the control key."""
    sid = os.urandom(16)
    return SessionKeys(sid, control_key(sid), b"", b"")


def test_max_sessions() -> None:
    server = make_server(max_sessions=2)
    for i in range(2):
        Peer(server, (f"192.0.2.{i}", 1000), keys=keys_of_new_session()).register(T0)
    third = Peer(server, ("192.0.2.3", 1000), keys=keys_of_new_session())
    third.get_cookie(T0)
    reply, _ = only(third.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert reply.get(Attr.ERROR).code is ErrorCode.SERVER_FULL
    assert "session limit" in reply.get(Attr.ERROR).reason
    assert len(server.sessions) == 2


def test_max_peers_per_source() -> None:
    server = make_server(max_peers_per_source=2)
    for port in (1001, 1002):
        Peer(server, ("192.0.2.7", port), keys=keys_of_new_session()).register(T0)
    third = Peer(server, ("192.0.2.7", 1003), keys=keys_of_new_session())
    third.get_cookie(T0)
    reply, _ = only(third.ask(M.REGISTER, T0 + RTT, pad_to=128))
    assert reply.get(Attr.ERROR).code is ErrorCode.SERVER_FULL
    assert reply.get(Attr.ERROR).reason == "too many sessions from your address"
    assert server.peers_per_source["192.0.2.7"] == 2
    Peer(server, ("192.0.2.8", 1003), keys=keys_of_new_session()).register(T0)  # another source is fine


def test_max_tcp_mappings() -> None:
    server = make_server(max_tcp_mappings=2)
    a, _ = registered_pair(server)
    a.discover(5000, ("203.0.113.10", 45000), T0 + 1)
    a.discover(5001, ("203.0.113.10", 45001), T0 + 1)
    with pytest.raises(UnexpectedMessage, match="already has 2 TCP mappings"):
        a.discover(5002, ("203.0.113.10", 45002), T0 + 1)
    a.discover(5000, ("203.0.113.10", 45100), T0 + 1)  # a known port may be re-discovered
    assert session_of(server).peers[0].tcp == {
        5000: Endpoint("203.0.113.10", 45100),
        5001: Endpoint("203.0.113.10", 45001),
    }


# --- rate limiting -----------------------------------------------------------------------------------------


def probe(server: ServerCore, addr: Addr, now: float) -> bool:
    """Whether a cookie-less REGISTER from ``addr`` got past the rate limit (it is answered COOKIE)."""
    return bool(Peer(server, addr, keys=KEYS).ask(M.REGISTER, now, pad_to=128))


def test_token_bucket_per_source_ip() -> None:
    server = make_server(burst_per_source=3.0, rate_per_source=1.0)
    assert [probe(server, A_ADDR, T0) for _ in range(5)] == [True, True, True, False, False]
    assert server.stats["rate_limited"] == 2
    assert not probe(server, (A_ADDR[0], 1), T0)  # the bucket is per IP, not per port
    assert probe(server, X_ADDR, T0)  # other sources are not affected
    assert [probe(server, A_ADDR, T0 + 1.0) for _ in range(2)] == [True, False]  # one token a second
    assert [probe(server, A_ADDR, T0 + 100.0) for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]  # up to the burst


def test_rate_limited_datagrams_are_not_even_parsed() -> None:
    server = make_server(burst_per_source=1.0, rate_per_source=1.0)
    probe(server, A_ADDR, T0)
    assert server.receive_datagram(b"junk", A_ADDR, T0) == []
    assert server.stats["rate_limited"] == 1
    assert server.stats["dropped_MalformedMessage"] == 0


# --- expiry -------------------------------------------------------------------------------------------------


def test_a_vanished_peer_is_expired_and_its_slot_freed() -> None:
    server = make_server(peer_idle_timeout=30.0, cookie_lifetime=120.0)
    a, b = registered_pair(server)
    a.info(T0 + 20)
    server.expire(T0 + 30)
    assert all(session_of(server).peers)  # 30 s of silence is not yet more than 30
    server.expire(T0 + 31)
    assert session_of(server).peers[1] is None
    assert b.token not in server._tokens
    assert B_ADDR[0] not in server.peers_per_source
    reply, _ = only(b.info(T0 + 32))
    assert reply.get(Attr.ERROR).code is ErrorCode.UNKNOWN_PEER
    newcomer = Peer(server, X_ADDR)
    assert newcomer.register(T0 + 33).get(Attr.SLOT) == 1


def test_a_silent_session_is_removed() -> None:
    server = make_server(peer_idle_timeout=30.0)
    registered_pair(server)
    server.expire(T0 + 31)
    assert server.sessions == {}
    assert server._tokens == {}
    assert not server.peers_per_source
    assert server.stats["sessions_expired"] == 1


def test_an_old_session_is_removed_even_if_busy() -> None:
    server = make_server(session_lifetime=600.0, peer_idle_timeout=30.0, cookie_lifetime=1000.0)
    a, b = registered_pair(server)
    for t in range(20, 601, 20):
        a.ask(M.READY, T0 + t)
        b.ask(M.READY, T0 + t)
    server.expire(T0 + 600)
    assert KEYS.session_id in server.sessions
    server.expire(T0 + 601)
    assert server.sessions == {}
    assert server._tokens == {}
    assert not server.peers_per_source


def test_the_timer_sweeps_every_interval() -> None:
    server = make_server(sweep_interval=1.0, peer_idle_timeout=30.0)
    registered_pair(server)
    assert server.get_timer() == T0 + 1.0
    server.handle_timer(T0 + 0.5)
    assert server.get_timer() == T0 + 1.0
    server.handle_timer(T0 + 31.5)
    assert server.sessions == {}
    assert server.get_timer() == T0 + 32.5


# --- anti-replay and authentication ---------------------------------------------------------------------


def test_a_replayed_datagram_is_dropped() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    a.info(T0 + 1)
    info = a.last
    assert server.receive_datagram(info, A_ADDR, T0 + 1.5) == []
    assert server.stats["dropped_ReplayError"] == 1
    a.ask(M.REGISTER, T0 + 2, pad_to=128)
    assert server.receive_datagram(a.last, A_ADDR, T0 + 2.5) == []
    assert server.stats["dropped_ReplayError"] == 2


def test_a_txid_too_old_for_the_window_is_dropped() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    old = a.request(M.READY)
    for _ in range(64):
        a.ask(M.READY, T0 + 1)
    assert server.receive_datagram(old, A_ADDR, T0 + 2) == []
    assert server.stats["dropped_ReplayError"] == 1


def test_datagrams_with_the_wrong_key_are_dropped_silently_and_counted() -> None:
    server = make_server()
    msg = Message(M.REGISTER, os.urandom(12), KEYS.session_id, ((Attr.PADDING, bytes(100)),))
    assert server.receive_datagram(codec.encode(msg, OTHER_KEYS.control_key), A_ADDR, T0) == []
    assert server.stats["dropped_AuthenticationError"] == 1
    assert server.sessions == {}


def test_a_registered_peer_cannot_be_impersonated_without_the_key() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    forged = Message(
        M.INFO, os.urandom(12), KEYS.session_id, ((Attr.COOKIE, a.cookie), (Attr.SEALED, bytes(28)))
    )
    assert server.receive_datagram(codec.encode(forged, bytes(32)), A_ADDR, T0 + 1) == []
    assert server.stats["dropped_AuthenticationError"] == 1
    assert session_of(server).peers[0].sealed is None


_TYPICAL: dict[Attr, Any] = {
    Attr.COOKIE: bytes(24),
    Attr.SLOT: 0,
    Attr.MAPPED_UDP: Endpoint(*A_ADDR),
    Attr.MAPPED_TCP: TcpMapping(1, Endpoint(*A_ADDR)),
    Attr.TCP_PORT: 1,
    Attr.TOKEN: bytes(16),
    Attr.PEER_UDP: Endpoint(*A_ADDR),
    Attr.SEALED: bytes(28),
    Attr.DELAY_MS: 0,
    Attr.ERROR: codec.ErrorInfo(ErrorCode.BAD_REQUEST, ""),
}


@pytest.mark.parametrize("mtype", [t for t, spec in codec.MESSAGES.items() if not spec.from_client])
def test_server_messages_sent_to_the_server_are_dropped(mtype: MessageType) -> None:
    server = make_server()
    spec = codec.MESSAGES[mtype]
    attrs = tuple((a, v) for a, v in _TYPICAL.items() if a in spec.required)
    msg = Message(mtype, os.urandom(12), KEYS.session_id, attrs)
    assert server.receive_datagram(codec.encode(msg, KEYS.control_key), A_ADDR, T0) == []
    assert server.stats["dropped_UnexpectedMessage"] == 1


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_random_datagrams_are_dropped_without_raising(data: bytes) -> None:
    server = make_server()
    assert server.receive_datagram(data, A_ADDR, T0) == []


# --- TCP discovery ------------------------------------------------------------------------------------------


def test_discovery_answers_the_observed_tcp_endpoint() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    reply = a.discover(5000, ("203.0.113.10", 45000), T0 + 1)
    assert reply.type is M.DISCOVERED
    assert reply.transaction_id == codec.peek_header(a.last).transaction_id
    assert reply.get(Attr.MAPPED_TCP) == TcpMapping(5000, Endpoint("203.0.113.10", 45000))


def test_discovery_with_an_unknown_token_is_refused() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    with pytest.raises(UnexpectedMessage, match="discovery token names no registered peer"):
        a.discover(5000, A_ADDR, T0 + 1, token=bytes(16))


def test_discovery_with_a_token_of_another_session_is_refused() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    other = Peer(server, X_ADDR, keys=OTHER_KEYS)
    other.register(T0)
    with pytest.raises(UnexpectedMessage, match="of this session"):
        a.discover(5000, A_ADDR, T0 + 1, token=other.token)
    assert session_of(server, OTHER_KEYS).peers[0].tcp == {}


def test_discovery_without_a_session_is_refused() -> None:
    server = make_server()
    with pytest.raises(UnexpectedMessage):
        Peer(server, A_ADDR).discover(5000, A_ADDR, T0, token=bytes(16))


def test_a_replayed_discovery_is_refused() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    a.discover(5000, ("203.0.113.10", 45000), T0 + 1)
    with pytest.raises(ReplayError):
        server.receive_discovery(a.last, ("198.51.100.9", 9999), T0 + 2)
    assert session_of(server).peers[0].tcp == {5000: Endpoint("203.0.113.10", 45000)}


def test_discovery_with_the_wrong_key_is_an_authentication_error() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    msg = Message(M.DISCOVER, a.txids.next(), KEYS.session_id, ((Attr.TOKEN, a.token), (Attr.LOCAL_PORT, 1)))
    with pytest.raises(AuthenticationError):
        server.receive_discovery(codec.encode(msg, bytes(32)), A_ADDR, T0 + 1)


def test_only_discover_is_accepted_on_the_tcp_port() -> None:
    server = make_server()
    a, _ = registered_pair(server)
    with pytest.raises(UnexpectedMessage, match="INFO on the TCP discovery port"):
        server.receive_discovery(a.request(M.INFO, ((Attr.SEALED, bytes(28)),)), A_ADDR, T0 + 1)
    pending = codec.encode(Message(M.PENDING, a.txids.next(), KEYS.session_id), KEYS.control_key)
    with pytest.raises(UnexpectedMessage, match="is a server message"):
        server.receive_discovery(pending, A_ADDR, T0 + 1)


# --- bounded state ------------------------------------------------------------------------------------------


def test_state_is_empty_again_after_10k_registrations_and_expiry() -> None:
    server = make_server()
    for i in range(10_000):  # 5000 sessions of two peers, each peer from its own address
        sid = (i // 2).to_bytes(16, "big")
        key = control_key(sid)
        addr = (f"10.{i >> 16}.{(i >> 8) & 0xFF}.{i & 0xFF}", 1024 + i % 7)
        now = T0 + i * 0.001
        first = Message(M.REGISTER, b"bulk" + bytes(7) + b"\x01", sid, ((Attr.PADDING, bytes(56)),))
        ((cookie, _),) = server.receive_datagram(codec.encode(first, key), addr, now)
        attrs = ((Attr.COOKIE, codec.decode(cookie, key).get(Attr.COOKIE)), (Attr.PADDING, bytes(28)))
        second = Message(M.REGISTER, b"bulk" + bytes(7) + b"\x02", sid, attrs)
        ((registered, _),) = server.receive_datagram(codec.encode(second, key), addr, now + RTT)
        assert codec.peek_header(registered).type is M.REGISTERED
    assert len(server.sessions) == 5000
    assert len(server._tokens) == 10_000
    assert len(server.peers_per_source) == 10_000
    assert len(server.buckets) == 10_000
    server.expire(T0 + 10 + server.config.peer_idle_timeout + 1)
    assert server.sessions == {}
    assert server.buckets == {}
    assert server._tokens == {}
    assert not server.peers_per_source


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([A_ADDR, B_ADDR, X_ADDR, ("203.0.113.10", 40001)]),
            st.sampled_from(CLIENT_TYPES),
            st.booleans(),
            st.floats(0, 40),
        ),
        max_size=30,
    )
)
def test_any_sequence_of_requests_keeps_the_books_consistent(
    steps: list[tuple[Addr, MessageType, bool, float]],
) -> None:
    server = make_server(peer_idle_timeout=30.0)
    peers = {addr: Peer(server, addr) for addr in (A_ADDR, B_ADDR, X_ADDR, ("203.0.113.10", 40001))}
    now = T0
    for addr, mtype, fresh_cookie, dt in steps:
        now += dt
        peer = peers[addr]
        if fresh_cookie:
            peer.get_cookie(now)
        attrs: dict[MessageType, tuple[tuple[Attr, Any], ...]] = {
            M.INFO: ((Attr.SEALED, bytes(28)),),
            M.RESULT: ((Attr.RESULT, ResultInfo(ResultCode.FAILED, 0, "")),),
            M.DISCOVER: ((Attr.TOKEN, bytes(16)), (Attr.LOCAL_PORT, 1)),
        }
        peer.ask(mtype, now, attrs.get(mtype, ()), pad_to=128)
        server.handle_timer(now)
        all_peers = [p for s in server.sessions.values() for p in s.peers if p is not None]
        assert sum(server.peers_per_source.values()) == len(all_peers)
        assert {p.token for p in all_peers} == set(server._tokens)
        for sid, session in server.sessions.items():
            assert session.sid == sid
            assert any(session.peers)
            assert all(p.slot == i for i, p in enumerate(session.peers) if p is not None)


# --- two ClientCores and a ServerCore, pumped into each other ---------------------------------------------


def assert_no_reflection(run: Rendezvous) -> None:
    """Every datagram went back to the source of what the server handled, or was a push of PEER or GO
    to the other peer's registered (server-observed) address."""
    addrs = {app.addr for app in run.apps}
    for source, dst, mtype in run.server_sent:
        assert dst == source or (mtype in (M.PEER, M.GO) and dst in addrs - {source}), (source, dst, mtype)


def test_two_clients_pair_through_the_server() -> None:
    run = Rendezvous()
    run.run()
    a, b = run.apps
    for app, other in ((a, b), (b, a)):
        events = [event for _, event in app.events]
        assert [type(e) for e in events] == [Registered, PeerFound, Go, ResultAcknowledged]
        registered, found = events[0], events[1]
        assert isinstance(registered, Registered) and isinstance(found, PeerFound)
        assert registered.udp == Endpoint(*app.addr)
        assert app.mapping == TcpMapping(app.local_port, Endpoint(*app.tcp_public))
        assert found.udp == Endpoint(*other.addr)
        assert found.tcp == (TcpMapping(other.local_port, Endpoint(*other.tcp_public)),)
        assert found.info == other.info
        # Only GOs beyond the first (the second copy, and the answers to READY polls still in flight),
        # dropped as duplicates of an answered request.
        rejected = {str(e) for e in app.rejected}
        assert len(app.rejected) >= GO_COPIES - 1
        assert rejected == {"GO answers no outstanding request (late, duplicate or replayed)"}
    # RTTs 20 ms and 80 ms: B's GO arrives 30 ms after A's, so A waits 30 ms, and both fire together.
    assert a.fired_at == pytest.approx(b.fired_at, abs=0.002)
    assert a.fired_at == pytest.approx(0.32, abs=0.002)
    assert_no_reflection(run)
    assert not any(k.startswith("dropped_") for k in run.server.stats)
    # The flow of docs/protocol.md, as the server saw it: (requester, receiver, what was sent).
    name = {app.addr: app.name for app in run.apps}
    assert [(name[src], name[dst], mtype.name) for src, dst, mtype in run.server_sent] == [
        ("A", "A", "COOKIE"),
        ("A", "A", "REGISTERED"),
        ("B", "B", "COOKIE"),
        ("A", "A", "PENDING"),  # A's INFO: B is not there yet
        ("B", "B", "REGISTERED"),
        ("B", "B", "PEER"),  # B's INFO, answered...
        ("B", "A", "PEER"),  # ...and pushed to A's waiting INFO
        ("A", "A", "PENDING"),  # A's READY
        *[("B", "B", "GO")] * GO_COPIES,  # a lost GO would be start skew: each goes twice
        *[("B", "A", "GO")] * GO_COPIES,
        *[("A", "A", "GO")] * GO_COPIES,  # A's READY poll (every 2 RTT), in flight as GO was pushed
        ("A", "A", "RESULT_ACK"),
        ("B", "B", "RESULT_ACK"),
    ]
    results = [p.result for p in run.server.sessions[KEYS.session_id].peers if p is not None]
    assert [r.code for r in results if r is not None] == [ResultCode.CONNECTED] * 2


def test_each_peer_places_the_both_registered_instant_from_its_peer_message() -> None:
    """PEER says how long ago (server clock) the second peer registered; minus half the peer's RTT for the
    way to it, each peer finds that instant on its own clock, with no wall clock compared."""
    from rawpunch.punch.session import _both_registered  # noqa: PLC0415

    run = Rendezvous(owd=(0.010, 0.040))
    run.run()
    paired = run.server.sessions[KEYS.session_id].paired
    assert paired is not None
    for app in run.apps:
        ((received, found),) = [(t, e) for t, e in app.events if isinstance(e, PeerFound)]
        assert found.paired_age is not None and found.paired_age > 0
        estimate = _both_registered(received, found.paired_age, app.core.rtt)
        assert estimate == pytest.approx(paired, abs=1e-5), app.name  # symmetric links: exact to the us
        assert _both_registered(received, None, app.core.rtt) == received  # an old server: PEER's arrival


@pytest.mark.parametrize("seed", range(6))
def test_two_clients_pair_despite_30_percent_loss(seed: int) -> None:
    run = Rendezvous(loss=0.3, seed=seed)
    run.run()
    assert run.net.lost > 0
    for app in run.apps:
        assert app.core.state.value == "done", [e for _, e in app.events if isinstance(e, Failed)]
        assert app.fired_at is not None
        kinds = [type(e) for _, e in app.events]
        assert kinds == [Registered, PeerFound, Go, ResultAcknowledged]
        assert all(isinstance(exc, RemoteProtocolError) for exc in app.rejected)
    assert_no_reflection(run)


def test_registered_names_the_mapping_check_port_only_where_the_server_listens_on_one() -> None:
    with_check = Peer(make_server(mapping_port=TCP_PORT + 2), A_ADDR).register(T0)
    assert (with_check.get(Attr.TCP_PORT), with_check.get(Attr.MAPPING_PORT)) == (TCP_PORT, TCP_PORT + 2)
    assert Peer(make_server(), A_ADDR).register(T0).get(Attr.MAPPING_PORT) is None
