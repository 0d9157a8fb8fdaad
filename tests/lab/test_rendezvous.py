"""The rendezvous in the lab: a live server in the core, two peers behind two NATs.

Each peer's learned TCP endpoint is checked against its own NAT's conntrack table, so the test
compares the protocol's answer with the kernel's ground truth rather than with itself.
"""

from __future__ import annotations

import ast
import hmac
import os
import random
import signal
import socket

import pytest

from rawpunch.lab.netns import Lab
from rawpunch.lab.scenario import PeerRun, RunningServer, conntrack_public, run_peers, start_server
from rawpunch.lab.topology import two_nats
from rawpunch.proto import codec
from rawpunch.proto.codec import Attr, Endpoint, Message, MessageType
from rawpunch.proto.keys import control_key
from rawpunch.proto.replay import TxidSource

pytestmark = pytest.mark.root

NAT_OF = {"a": "nat-a", "b": "nat-b"}


def _stop(server: RunningServer) -> dict[str, int]:
    """Stop the server with SIGTERM and return the counters it logs on its way out."""
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    lines = [line for line in server.log if "counters:" in line]
    assert lines, "server did not log its counters on SIGTERM:\n" + "\n".join(server.log)
    return dict(ast.literal_eval(lines[-1].split("counters: ", 1)[1]))


def _assert_paired(lab: Lab, runs: dict[str, PeerRun]) -> None:
    for name, run in runs.items():
        assert run.returncode == 0, f"peer {name} failed:\n{run.stderr}"
        assert set(run.events) >= {"registered", "tcp_endpoint", "peer", "go"}, run.events
    for name, other in (("a", "b"), ("b", "a")):
        mine, theirs = runs[name].events, runs[other].events
        nat = lab.node(NAT_OF[name])
        # The UDP and TCP endpoints the server saw carry the NAT's public address.
        assert Endpoint.parse(mine["registered"]["udp"]).host == str(nat.public_address)
        own_tcp = Endpoint.parse(mine["tcp_endpoint"]["public"])
        assert own_tcp.host == str(nat.public_address)
        # ... and the TCP one is exactly what the NAT's conntrack maps the local port to.
        private = Endpoint(str(lab.node(name).address), mine["tcp_endpoint"]["local_port"])
        assert own_tcp in conntrack_public(lab, NAT_OF[name], private)
        # What the other peer learned about us is what we learned about ourselves.
        assert theirs["peer"]["udp"] == mine["registered"]["udp"]
        assert [t["public"] for t in theirs["peer"]["tcp"]] == [str(own_tcp)]
        assert theirs["peer"]["tcp_port"] == mine["tcp_endpoint"]["local_port"]


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-apdf-rst"])
def test_two_peers_behind_two_nats_learn_each_others_endpoints(profile: str) -> None:
    with Lab(two_nats(hops=2, profile_a=profile, profile_b=profile)) as lab:
        server = start_server(lab)
        runs = run_peers(lab, server.endpoint, os.urandom(12).hex(), timeout=30)
        _assert_paired(lab, runs)
        counters = _stop(server)
        assert counters["sessions_created"] == 1


def test_different_secrets_never_pair_and_say_so() -> None:
    with Lab(two_nats(hops=1)) as lab:
        server = start_server(lab)
        runs = {}
        for name, secret in (("a", "one secret"), ("b", "another secret")):
            runs.update(
                run_peers(lab, server.endpoint, secret, nodes=(name,), args=("--timeout", "2"), timeout=20)
            )
        for run in runs.values():
            assert run.returncode == 1
            assert "the peer never came" in run.stderr
        assert _stop(server)["sessions_created"] == 2


def test_server_on_an_occupied_port_says_so() -> None:
    with Lab(two_nats(hops=1)) as lab:
        server = start_server(lab)
        second = lab.node("server").run(
            ["python", "-m", "rawpunch", "server", "--listen", str(server.endpoint)], check=False, timeout=20
        )
        assert second.returncode == 1
        assert "in use" in second.stderr and "--listen" in second.stderr


# --- fuzz -------------------------------------------------------------------------------------------------

FUZZ_DATAGRAMS = 100_000
FLOW_CONTROL_EVERY = 100  # keeps the burst within the server's socket buffer


def _valid_messages(rng: random.Random) -> list[bytes]:
    """A few well-formed requests of a session of our own, to mutate."""
    sid = rng.randbytes(16)
    key, txids = control_key(sid), TxidSource(rng.randbytes(4))
    cookie = rng.randbytes(codec.COOKIE_LEN)
    msgs = [
        Message(MessageType.REGISTER, txids.next(), sid, ((Attr.PADDING, bytes(60)),)),
        Message(
            MessageType.INFO, txids.next(), sid, ((Attr.COOKIE, cookie), (Attr.SEALED, rng.randbytes(80)))
        ),
        Message(MessageType.READY, txids.next(), sid, ((Attr.COOKIE, cookie), (Attr.RTT_MS, 12))),
    ]
    out = [codec.encode(m, key) for m in msgs]
    # Signed garbage: a valid MAC over a broken attribute list reaches the parser behind the MAC.
    body = codec.HEADER.pack(
        codec.MAGIC, codec.VERSION, MessageType.INFO, 12, 0, txids.next(), sid
    ) + rng.randbytes(12)
    out.append(body + hmac.new(key, body, "sha256").digest())
    return out


def _mutate(rng: random.Random, valid: list[bytes]) -> bytes:
    base = bytearray(rng.choice(valid))
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 1400))
    if kind == 1:
        for _ in range(rng.randrange(1, 8)):
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        return bytes(base)
    if kind == 2:
        return bytes(base[: rng.randrange(len(base))])
    if kind == 3:
        return bytes(base) + rng.randbytes(rng.randrange(1, 200))
    if kind == 4:
        return bytes(base[: codec.HEADER_LEN]) + rng.randbytes(rng.randrange(0, 300))
    return bytes(base)  # an exact replay


def _probe(sock: socket.socket, sid: bytes, txids: TxidSource, tries: int = 5) -> int:
    """Send a valid REGISTER until its COOKIE comes back (a probe can be lost in a full buffer)."""
    for _ in range(tries):
        probe = Message(MessageType.REGISTER, txids.next(), sid, ((Attr.PADDING, bytes(60)),))
        sock.send(codec.encode(probe, control_key(sid)))
        try:
            while codec.peek_header(sock.recv(2048)).transaction_id != probe.transaction_id:
                pass  # an answer to a fuzz datagram (there are few): skip it
            return 1
        except TimeoutError:
            continue
    return 0


def _fuzz(server: tuple[str, int], count: int, seed: int) -> int:
    """Runs inside a lab node: send ``count`` hostile datagrams, flow-controlled by a probe.

    Every FLOW_CONTROL_EVERY datagrams a fresh, valid REGISTER goes out and we wait for its
    COOKIE: the server reads one socket in order, so the answer proves it has processed every
    datagram before it. Returns how many probes were answered.
    """
    rng = random.Random(seed)
    valid = _valid_messages(rng)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(server)
    sock.settimeout(1.0)
    answered = 0
    sid = rng.randbytes(16)
    txids = TxidSource(rng.randbytes(4))
    for i in range(count):
        sock.send(_mutate(rng, valid))
        if (i + 1) % FLOW_CONTROL_EVERY == 0:
            answered += _probe(sock, sid, txids)
    sock.close()
    return answered


def test_fuzzed_server_still_pairs_two_peers() -> None:
    with Lab(two_nats(hops=1)) as lab:
        # A high per-source rate so the fuzz reaches the parser instead of the rate limiter.
        server = start_server(lab, args=("--rate", "1000000"))
        target = (server.endpoint.host, server.endpoint.port)
        probes = lab.node("a").call(_fuzz, target, FUZZ_DATAGRAMS, 1234, timeout=300)
        assert probes == FUZZ_DATAGRAMS // FLOW_CONTROL_EVERY
        runs = run_peers(lab, server.endpoint, os.urandom(12).hex(), timeout=30)
        _assert_paired(lab, runs)
        counters = _stop(server)
        assert counters["datagrams"] >= FUZZ_DATAGRAMS
        rejected = sum(v for k, v in counters.items() if k.startswith("dropped_"))
        assert rejected > FUZZ_DATAGRAMS // 2, counters
        assert server.proc.returncode == 0


def test_peer_without_a_server_says_so() -> None:
    with Lab(two_nats(hops=1)) as lab:
        # Nothing listens on this port of the server node: the peer must give up with a clear line.
        run = run_peers(lab, Endpoint(str(lab.node("server").address), 3999), "s", nodes=("a",), timeout=30)[
            "a"
        ]
        assert run.returncode == 1
        assert "no answer from the rendezvous server 203.0.113.10:3999" in run.stderr
