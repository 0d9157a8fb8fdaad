"""Peer authentication on the punched connection, and the retry of a punch whose path it finds broken.

A forged segment can poison a NAT's conntrack entry of the punch so that the flow drops there
(tests/lab/test_punch.py, the attacked punches). The authentication is what notices: it succeeds only when
the peer's proof verified *and* the peer confirmed that ours did, so both ends agree; anything less is a
``PunchError`` that the cascade answers with a retry on a fresh port (``runner.with_retry``). A proof that
arrives and does not verify is ``WrongSecret``: at once, and never retried. No root needed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from rawpunch.probe.result import NatBehaviour
from rawpunch.proto.client import Go
from rawpunch.proto.codec import Endpoint
from rawpunch.proto.keys import SessionKeys
from rawpunch.proto.peerinfo import PeerInfo
from rawpunch.punch import session
from rawpunch.punch.engine import PunchConfig
from rawpunch.punch.segment import TcpOptions
from rawpunch.strategy.base import AttemptContext, PeerView
from rawpunch.strategy.runner import (
    attempt_budget,
    attempt_port,
    budget,
    discoveries,
    plan_cascade,
    run_cascade,
    with_retry,
)

KEYS = SessionKeys.derive("the session secret")
OTHER_KEYS = SessionKeys.derive("another secret")


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two ends of a loopback TCP connection: their kernels acknowledge what arrives, as peers' do."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


async def _both(a: socket.socket, b: socket.socket, keys_b: SessionKeys = KEYS) -> list[BaseException | None]:
    outcomes = await asyncio.gather(
        session._authenticate(a, KEYS, 0, timeout=5.0),
        session._authenticate(b, keys_b, 1, timeout=5.0),
        return_exceptions=True,
    )
    return list(outcomes)


def test_both_ends_that_know_the_secret_authenticate(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = tcp_pair
    assert asyncio.run(_both(a, b)) == [None, None]
    for end in (a, b):  # every byte of the authentication was read: the application's data starts clean
        end.setblocking(False)
        with pytest.raises(BlockingIOError):
            end.recv(1)
        end.setblocking(True)
    assert a.getblocking() and b.getblocking()  # handed over as a plain blocking socket


def test_a_wrong_secret_fails_both_ends_at_once_with_its_own_error(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = tcp_pair
    outcomes = asyncio.run(_both(a, b, keys_b=OTHER_KEYS))
    for outcome in outcomes:
        assert isinstance(outcome, session.WrongSecret), outcomes
        assert str(outcome) == (
            "the other end of the punched connection does not know the session secret: closed"
        )
    assert a.fileno() == b.fileno() == -1  # closed


def test_a_silent_path_fails_naming_the_step_that_got_no_answer() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(session.PunchError) as failed:
            asyncio.run(session._authenticate(a, KEYS, 0, timeout=0.05))
    finally:
        a.close()
        b.close()
    assert not isinstance(failed.value, session.WrongSecret)
    assert str(failed.value) == (
        "peer authentication on the punched connection failed: no challenge from the peer within 0.05 s"
    )


def test_a_verified_proof_is_not_enough_without_the_peers_confirmation() -> None:
    """The peer's proof verifies, but no word comes that ours did (our segments drop at its NAT, say):
    the other end would not agree, so neither may hand its socket over."""
    a, b = socket.socketpair()

    async def peer_that_never_confirms() -> None:
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        ours = await session._recv_exactly(loop, b, session.CHALLENGE_LEN)
        await loop.sock_sendall(b, bytes(session.CHALLENGE_LEN))  # its challenge
        await loop.sock_sendall(b, KEYS.prove(ours, struct.pack("!B", 1)))  # a valid proof

    async def run() -> None:
        peer = asyncio.create_task(peer_that_never_confirms())
        try:
            await session._authenticate(a, KEYS, 0, timeout=0.2)
        finally:
            await peer

    try:
        with pytest.raises(session.PunchError) as failed:
            asyncio.run(run())
    finally:
        a.close()
        b.close()
    assert not isinstance(failed.value, session.WrongSecret)
    assert "the peer's proof verified, but no word that ours did within 0.2 s" in str(failed.value)


@pytest.mark.parametrize(
    ("rtt", "remaining", "timeout"),
    [
        (None, 4.0, session.AUTH_FLOOR),  # no estimate: the floor
        (0.0005, 4.0, session.AUTH_FLOOR),  # a LAN: the floor, two kernel retransmissions
        (0.3, 4.0, session.AUTH_RTTS * 0.3),  # a long path: a few of its round trips
        (0.3, 1.5, 1.5),  # never beyond the attempt's budget
    ],
)
def test_authentication_waits_a_few_rtts_within_the_budget(
    rtt: float | None, remaining: float, timeout: float
) -> None:
    assert session.auth_timeout(rtt, remaining) == pytest.approx(timeout)


# --- the retry on a fresh port (runner) --------------------------------------------------------------------


def view(slot: int, ports: tuple[int, ...], strategy: str, isn: int | None = None) -> PeerView:
    info = PeerInfo(isn=isn, punch_ports=ports, tcp_port=ports[0], strategy=strategy)
    public = {p: Endpoint("198.51.100.1", p + 1000) for p in ports}
    return PeerView(slot, info, NatBehaviour(), public, 0)


def test_the_crafted_handshake_alone_discovers_a_spare_port_for_its_retry() -> None:
    assert discoveries("crafted-handshake") == 2
    assert discoveries("simultaneous-open") == discoveries("low-ttl-listen") == 1  # not retried


def test_a_requested_crafted_handshake_is_retried_once_on_the_next_port_of_both_peers() -> None:
    me = view(0, (40000, 40001), "crafted-handshake")
    peer = view(1, (50000, 50001), "crafted-handshake")
    names = plan_cascade("crafted-handshake", me, peer)
    assert names == ("crafted-handshake", "crafted-handshake")
    assert [(attempt_port(me, i), attempt_port(peer, i)) for i in range(2)] == [
        (40000, 50000),
        (40001, 50001),
    ]
    # The first gets half of the deadline, the retry the rest (both compute it alike).
    assert attempt_budget(names, 0, 10.0) == 5.0
    assert attempt_budget(names, 1, 4.9) == 4.9
    # In a longer cascade, the earlier strategies keep their budgets.
    longer = ("port-prediction", *names)
    assert attempt_budget(longer, 0, 10.0) == budget("port-prediction", 10.0, last=False)
    assert attempt_budget(longer, 1, 7.0) == 3.5


@pytest.mark.parametrize(
    ("names", "ports", "planned"),
    [
        # no spare port on one side (an older peer): the same entries would fail the same way
        (("crafted-handshake",), (1, 1), ("crafted-handshake",)),
        # a cascade ending in it, with a port left for it
        (
            ("port-prediction", "crafted-handshake"),
            (3, 3),
            ("port-prediction", "crafted-handshake", "crafted-handshake"),
        ),
        # ... without one
        (("port-prediction", "crafted-handshake"), (2, 3), ("port-prediction", "crafted-handshake")),
        # other strategies keep their cascade
        (("crafted-handshake", "simultaneous-open"), (3, 3), ("crafted-handshake", "simultaneous-open")),
        (("birthday",), (3, 3), ("birthday",)),
    ],
)
def test_the_retry_needs_a_fresh_port_on_both_sides(
    names: tuple[str, ...], ports: tuple[int, int], planned: tuple[str, ...]
) -> None:
    me = view(0, tuple(range(40000, 40000 + ports[0])), ",".join(names))
    peer = view(1, tuple(range(50000, 50000 + ports[1])), ",".join(names))
    assert with_retry(names, me, peer) == planned
    assert with_retry(names, peer, me) == planned  # both peers agree


# --- the retry through the cascade's READY/GO machinery (runner.run_cascade) -------------------------------


class FakeClient:
    """The rendezvous as ``run_cascade`` uses it: our address, the RTT, and READY -> GO per attempt."""

    def __init__(self) -> None:
        self.local_address = Endpoint("10.0.1.2", 0)
        self.core = SimpleNamespace(rtt=0.001)
        self.readies: list[int] = []

    async def ready(self, attempt: int) -> Go:
        self.readies.append(attempt)
        return Go(delay=0.0, attempt=attempt)


def run_crafted_cascade(
    monkeypatch: pytest.MonkeyPatch, outcomes: list[BaseException | None]
) -> tuple[list[int], FakeClient, object]:
    """``run_cascade`` of a requested crafted handshake, each attempt's adapter giving the next outcome
    (an exception, or None: connected). Returns the local ports tried, the client, and the result."""
    tried: list[int] = []

    async def attempt(ctx: AttemptContext, config: PunchConfig) -> socket.socket:
        tried.append(config.local.port)
        await ctx.go()
        outcome = outcomes[len(tried) - 1]
        if outcome is not None:
            raise outcome
        return socket.socket()

    monkeypatch.setattr(session, "punch_and_splice", attempt)
    me = view(0, (40000, 40001), "crafted-handshake", isn=1)
    peer = view(1, (50000, 50001), "crafted-handshake", isn=2)
    names = plan_cascade("crafted-handshake", me, peer)
    client = FakeClient()
    common = {"options": TcpOptions(1460, 7, True, None), "isn": 1, "priming_ttl": 2, "pcap": None}

    rendezvous: Any = client

    async def run() -> object:
        try:
            sock, ctx = await run_cascade(rendezvous, KEYS, me, peer, names, common, 10.0, lambda e: None)
        except Exception as exc:
            return exc
        sock.close()
        return ctx

    return tried, client, asyncio.run(run())


def test_a_poisoned_first_attempt_is_retried_on_the_spare_port(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = session.PunchError("peer authentication on the punched connection failed: no challenge ...")
    tried, client, result = run_crafted_cascade(monkeypatch, [broken, None])
    assert tried == [40000, 40001]
    assert client.readies == [0, 1]  # each attempt from its own GO
    assert isinstance(result, AttemptContext) and result.attempt == 1
    assert result.peer_public == Endpoint("198.51.100.1", 51001)  # the peer's spare port, as discovered


def test_a_wrong_secret_ends_the_cascade_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = session.WrongSecret("the other end of the punched connection does not know the session secret")
    tried, client, result = run_crafted_cascade(monkeypatch, [wrong, None])
    assert tried == [40000] and client.readies == [0]  # never retried
    assert result is wrong
