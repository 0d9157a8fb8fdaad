"""The NAT probe's server part in ``ServerCore`` (sans-IO): who may make the server send a SYN, where to,
from where, and how many."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import OTHER_KEYS, TCP_PORT
from test_server_core import A_ADDR, T0, X_ADDR, Peer, make_server

from rawpunch.proto import codec
from rawpunch.proto.codec import Attr, Endpoint, ErrorCode, Message, MessageType, ProbeKind, Reaction
from rawpunch.proto.server import PROBE_SOURCE_BURST, CraftedSyn, ServerCore

M = MessageType
MAIN, ALT = "203.0.113.10", "198.51.100.194"
P2 = TCP_PORT + 1
PROBE_SOURCE_BURST_INT = int(PROBE_SOURCE_BURST)
PUBLIC = ("198.51.100.1", 45000)  # where the client's TCP flow came from, as the server saw it


def probing_server(**overrides: Any) -> ServerCore:
    return make_server(probe_addresses=(MAIN, ALT), probe_port=P2, **overrides)


def registered(server: ServerCore, addr: tuple[str, int] = A_ADDR) -> Peer:
    peer = Peer(server, addr)
    peer.register(T0)
    return peer


def discover_via(peer: Peer, local_port: int, via: tuple[str, int], public: tuple[str, int] = PUBLIC) -> None:
    """A DISCOVER from *local_port* that reached the listener *via* from *public*."""
    attrs = ((Attr.TOKEN, peer.token), (Attr.LOCAL_PORT, local_port))
    msg = Message(M.DISCOVER, peer.txids.next(), peer.keys.session_id, attrs)
    peer.server.receive_discovery(codec.encode(msg, peer.keys.control_key), public, T0 + 1, via)


def probe(
    peer: Peer, kind: ProbeKind, now: float = T0 + 2, kind_override: int | None = None, **attrs: int
) -> Message:
    extra = tuple((Attr[name.upper()], value) for name, value in attrs.items())
    code = int(kind) if kind_override is None else kind_override
    ((reply, dst),) = peer.ask(M.PROBE, now, ((Attr.PROBE_KIND, code), *extra))
    assert dst == peer.addr  # only ever to the requester's validated address
    return reply


def test_a_server_without_alt_address_refuses_every_probe_and_sends_nothing() -> None:
    server = make_server()
    reply = probe(registered(server), ProbeKind.HELLO)
    assert reply.type is M.ERROR and reply.get(Attr.ERROR).code is ErrorCode.NOT_SUPPORTED
    assert "--alt-address" in reply.get(Attr.ERROR).reason
    assert server.probes_to_send() == []


def test_hello_names_the_second_address_and_port_and_the_budget() -> None:
    reply = probe(registered(probing_server(probe_budget=7)), ProbeKind.HELLO)
    assert reply.type is M.PROBE_ACK
    assert reply.get(Attr.ALT_ADDRESS) == Endpoint(ALT, TCP_PORT)
    assert (reply.get(Attr.PROBE_PORT), reply.get(Attr.PROBE_BUDGET)) == (P2, 7)


@pytest.mark.parametrize(
    ("via", "sources"),
    [
        ((MAIN, P2), [(MAIN, TCP_PORT), (ALT, P2)]),
        ((ALT, TCP_PORT), [(ALT, P2), (MAIN, TCP_PORT)]),
    ],
)
def test_filter_sends_from_the_other_port_and_the_other_address_to_the_observed_endpoint(
    via: tuple[str, int], sources: list[tuple[str, int]]
) -> None:
    server = probing_server()
    peer = registered(server)
    discover_via(peer, 5000, via)
    reply = probe(peer, ProbeKind.FILTER, local_port=5000)
    expected = [CraftedSyn(Endpoint(*src), Endpoint(*PUBLIC)) for src in sources]
    assert server.probes_to_send() == expected
    assert server.probes_to_send() == []  # handed out once
    assert reply.get_all(Attr.PROBE_FROM) == [syn.src for syn in expected]


def test_simopen_sends_one_syn_from_the_other_port_of_the_same_address() -> None:
    server = probing_server()
    peer = registered(server)
    discover_via(peer, 5000, (MAIN, P2))
    probe(peer, ProbeKind.SIMOPEN, local_port=5000)
    assert server.probes_to_send() == [CraftedSyn(Endpoint(MAIN, TCP_PORT), Endpoint(*PUBLIC))]


@pytest.mark.parametrize("via", [None, (MAIN, P2)])
def test_a_mapping_not_seen_on_a_probe_listener_gets_no_syn(via: tuple[str, int] | None) -> None:
    server = probing_server()
    peer = registered(server)
    if via is not None:
        discover_via(peer, 5000, via)
    reply = probe(peer, ProbeKind.FILTER, local_port=5001)  # asks about a port it never discovered
    assert reply.type is M.ERROR and reply.get(Attr.ERROR).code is ErrorCode.BAD_REQUEST
    assert server.probes_to_send() == []


def test_unsolicited_goes_to_the_validated_address_and_its_answer_is_reported() -> None:
    server = probing_server()
    peer = registered(server)
    probe(peer, ProbeKind.UNSOLICITED, target_port=1023)
    syn = CraftedSyn(Endpoint(MAIN, P2), Endpoint(A_ADDR[0], 1023))
    assert server.probes_to_send() == [syn]
    server.receive_reaction((MAIN, P2), (A_ADDR[0], 1024), Reaction.ICMP)  # about another SYN: ignored
    assert probe(peer, ProbeKind.REACTION, T0 + 3).get(Attr.REACTION) == Reaction.NONE
    server.receive_reaction((MAIN, P2), (A_ADDR[0], 1023), Reaction.RST)
    assert probe(peer, ProbeKind.REACTION, T0 + 4).get(Attr.REACTION) == Reaction.RST


def test_an_expired_peer_leaves_no_unsolicited_state_and_a_reaction_for_it_is_ignored() -> None:
    server = probing_server(peer_idle_timeout=30.0)
    peer = registered(server)
    probe(peer, ProbeKind.UNSOLICITED, target_port=1023)
    assert server.probes_to_send() != []
    server.expire(T0 + 40)
    assert server._unsolicited == {}
    server.receive_reaction((MAIN, P2), (A_ADDR[0], 1023), Reaction.RST)  # late: nobody to tell
    assert server._unsolicited == {}


def test_unsolicited_without_a_target_port_is_refused() -> None:
    server = probing_server()
    reply = probe(registered(server), ProbeKind.UNSOLICITED)
    assert reply.get(Attr.ERROR).code is ErrorCode.BAD_REQUEST
    assert server.probes_to_send() == []


def test_the_per_client_budget_caps_the_syns() -> None:
    server = probing_server(probe_budget=3)
    peer = registered(server)
    discover_via(peer, 5000, (MAIN, P2))
    assert probe(peer, ProbeKind.FILTER, local_port=5000).get(Attr.PROBE_BUDGET) == 1
    assert probe(peer, ProbeKind.SIMOPEN, T0 + 3, local_port=5000).get(Attr.PROBE_BUDGET) == 0
    assert len(server.probes_to_send()) == 3
    reply = probe(peer, ProbeKind.FILTER, T0 + 4, local_port=5000)
    assert reply.get(Attr.ERROR).code is ErrorCode.RATE_LIMITED
    assert server.probes_to_send() == []


def test_the_server_wide_syn_rate_is_bounded() -> None:
    server = probing_server(probe_rate=1.0)  # burst 2
    peer = registered(server)
    discover_via(peer, 5000, (MAIN, P2))
    assert probe(peer, ProbeKind.FILTER, T0 + 2, local_port=5000).type is M.PROBE_ACK
    refused = probe(peer, ProbeKind.SIMOPEN, T0 + 2.1, local_port=5000)
    assert refused.get(Attr.ERROR).code is ErrorCode.RATE_LIMITED
    assert len(server.probes_to_send()) == 2
    assert probe(peer, ProbeKind.SIMOPEN, T0 + 3.5, local_port=5000).type is M.PROBE_ACK


def test_a_stolen_cookie_from_another_address_makes_the_server_send_no_syn() -> None:
    server = probing_server()
    victim = registered(server)
    mallory = Peer(server, X_ADDR)
    mallory.cookie, mallory.token = victim.cookie, victim.token
    out = mallory.ask(
        M.PROBE, T0 + 2, ((Attr.PROBE_KIND, int(ProbeKind.UNSOLICITED)), (Attr.TARGET_PORT, 22))
    )
    assert all(reply.type is M.COOKIE for reply, _ in out)
    assert server.probes_to_send() == []


def test_a_new_session_from_the_same_address_buys_no_more_syns() -> None:
    server = probing_server(probe_budget=100, probe_rate=1000.0)
    first = registered(server)
    discover_via(first, 5000, (MAIN, P2))
    for i in range(PROBE_SOURCE_BURST_INT):
        assert probe(first, ProbeKind.SIMOPEN, T0 + 2 + i * 1e-4, local_port=5000).type is M.PROBE_ACK
    again = Peer(server, (A_ADDR[0], A_ADDR[1] + 1), keys=OTHER_KEYS)  # a fresh session, same address
    again.register(T0 + 2)
    discover_via(again, 5000, (MAIN, P2))
    reply = probe(again, ProbeKind.SIMOPEN, T0 + 2.01, local_port=5000)
    assert reply.get(Attr.ERROR).code is ErrorCode.RATE_LIMITED
    assert "your address" in reply.get(Attr.ERROR).reason
    assert len(server.probes_to_send()) == PROBE_SOURCE_BURST_INT


def test_an_unknown_probe_kind_is_answered_not_left_to_time_out() -> None:
    server = probing_server()
    reply = probe(registered(server), ProbeKind.HELLO, kind_override=99)
    assert reply.get(Attr.ERROR).code is ErrorCode.BAD_REQUEST
    assert "unknown probe kind 99" in reply.get(Attr.ERROR).reason
