"""Sans-IO plans of the kernel-socket strategies: who plays which role, which ports, which TTL, when.

These strategies leave the handshake to the kernel's own TCP (no crafted segments, no splice): each side opens
ordinary sockets and ``connect()``\\s at the right moment, and the plan decides everything that must agree
between the peers from data both hold (slots, the exchanged peer info, the server-observed endpoints), never
from a clock. ``kernel.py`` carries a plan out.

The pattern is STUNT's #2 (Guha and Francis, "Characterization and Measurement of TCP Traversal through
NATs and Firewalls", IMC 2005), in the form FACTS.md verified between two Linux NATs:

* the **primer** sends, from its punch port, a SYN with a low TTL (``connect()`` with ``IP_TTL`` set, then
  set back): it passes its own NAT, which creates the mapping and a conntrack entry in SYN_SENT, and dies in
  the core before the peer's NAT (which would drop it or answer with a RST). The router's ICMP
  time-exceeded is dropped by a firewall rule, or it would abort the socket in SYN_SENT (RFC 1122 section
  4.2.3.9 allows that, and Linux does);
* the **connector** then ``connect()``\\s with a normal TTL. Its SYN passes its own NAT, finds the primer's
  NAT expecting it (a reply-direction SYN: conntrack's simultaneous open, SYN_SENT2) and reaches the primer's
  socket, still in SYN-SENT: RFC 9293 section 3.5 figure 8, the kernel answers SYN-ACK with the ISN of its
  own SYN (so conntrack's window check passes), and both ends are ESTABLISHED a round trip later.

The primer's socket stays in SYN-SENT rather than being a ``listen()`` socket, as STUNT's name suggests: a
listener would answer with an ISN of its own, unrelated to the one the low-TTL SYN showed conntrack, whose
window check may then refuse the SYN-ACK; the SYN-SENT socket answers with the primed ISN, the exchange
FACTS.md verified.

The strategies differ in what the primer aims at and how many sockets there are:

* ``low-ttl-listen``: one target, the connector's public endpoint (both NATs stable);
* ``port-prediction``: the connector is behind a NAT that allocates sequentially (RFC 4787 section 4.2.1):
  its mapping towards the primer will be the last discovered public port plus ``delta`` (one new mapping
  later), so the primer primes a window of the next ``window`` ports in steps of ``delta``;
* ``birthday``: the connector's NAT allocates at random: the primer primes ``m`` random ports of the NAT's
  range and the connector opens ``n`` connections from ``n`` local ports, ``n`` random draws from that range.
  Each draw hits a primed port with probability ``m / N``; the chance that at least one does is
  ``1 - (1 - m/N)^n``, about ``1 - exp(-n m / N)`` (the birthday bound), computed and logged per attempt.
  The SYN budget ``n + m`` and the rate are bounded. The primer also *listens* on its port: a NAT whose
  filtering is endpoint-independent, or address-dependent (RFC 4787 section 5; a priming SYN went to the
  peer's address), admits the connector's SYN from whatever port the random NAT gave it, and the listener
  accepts it: no guess needed, one round trip. So both start with a ``burst``: the primer one priming SYN,
  the connector one SYN per target; both then wait ``pause`` for that connection, and only without it
  spend the rest of the budget (the connector's rest after the primer's). Behind such NATs the hundreds of
  SYNs are never sent, and no NAT has to track them (a userspace NAT that admits them all slows down with
  every entry, and the authentication then waits behind them). When the primer's NAT allocates
  sequentially (and maps per remote address, or independently of it), the connector aims at the primer's
  predicted next ports, one connection per prediction in turn. The connector's first connection leaves
  from its punch port and the primer's first guess is that port's public one, as the server saw it: a
  certain hit where the "random" NAT is endpoint-independent after all (a carrier-grade NAT), which the
  fast classification cannot tell (``auto``: maybe-stable);
* ``simultaneous-open`` (the baseline, libp2p DCUtR style): both ``connect()`` at GO with a normal TTL and
  again ``RETRY_DELAY`` after each refusal; a SYN that reaches the other NAT before that NAT's own SYN left
  is dropped or answered with RST (FACTS.md), so between RST-answering NATs it connects only when two
  retries happen to cross (seconds, in the lab), and the others are faster.

The connector waits ``lead`` after GO: the primer's SYNs must have left first. GO's RTT-compensated delays
make the two GOs coincide up to the error of the RTT estimates; ``lead`` adds that margin (from the measured
server RTT) to the time the primer needs to send its SYNs at the plan's rate (birthday: see above).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Literal

from rawpunch.proto.codec import Endpoint

Role = Literal["primer", "connector", "both"]
PORT_RANGE = (1024, 65535)  # Linux NAT's range for source ports >= 1024 (nf_nat_l4proto_unique_tuple)
NORMAL_TTL = 64
PREDICTION_WINDOW = 8
#: 750 guesses x 750 connections: P(success) = 1 - exp(-750^2 / 64512) = 99.98% (1000 gave 97.9%, and the
#: 20-punch auto matrix showed that 2% as misses on stable x random pairs); 750 SYNs take 0.4 s per side.
BIRTHDAY_SYN_BUDGET = 1500
BIRTHDAY_RATE = 2000.0  # SYNs per second, each side
SYN_INTERVAL = 0.001  # between the primer's SYNs in the small plans


@dataclass(frozen=True)
class KernelPlan:
    strategy: str
    role: Role
    local_ports: tuple[int, ...]
    """Ports to connect from, one socket each (0: the kernel picks). The primer uses one port."""
    targets: tuple[Endpoint, ...]
    """Where the SYNs go: the primer's guesses or predictions, the connector's one peer endpoint."""
    ttl: int
    """TTL of the first SYN of each socket (the primer's low TTL)."""
    lead: float
    """Seconds after GO before the first SYN."""
    interval: float
    """Seconds between consecutive SYNs (the rate bound)."""
    retry: bool
    """Connect again after a refusal (RST) until the attempt's budget is spent."""
    probability: float | None = None
    """Expected chance of success, where it can be computed (birthday)."""
    listen: bool = False
    """Also accept connections from any port of the peer's host on the (first) local port: the birthday
    primer, the port-prediction connector."""
    burst: int = 0
    """SYNs sent at ``lead``, before ``pause``; 0: no pause (birthday: see the module doc)."""
    pause: float = 0.0
    """Seconds between the first ``burst`` SYNs and the others, which are sent only if nothing connected."""

    @property
    def syns(self) -> int:
        return max(len(self.local_ports), len(self.targets))


def lead_margin(server_rtt: float | None) -> float:
    """Margin for the GO skew between the peers: half the RTT to the server, 10..100 ms."""
    return min(0.1, max(0.01, (server_rtt or 0.1) / 2))


def primer_slot(strategy: str, stable_slot: int) -> int:
    """Who primes: the stable side for prediction and guessing (its endpoint is known), else slot 0."""
    return stable_slot if strategy in ("port-prediction", "birthday") else 0


def simultaneous_open(local_port: int, peer: Endpoint) -> KernelPlan:
    return KernelPlan("simultaneous-open", "both", (local_port,), (peer,), NORMAL_TTL, 0.0, 0.0, True)


def low_ttl_listen(
    role: Role, local_port: int, peer: Endpoint, ttl: int, server_rtt: float | None
) -> KernelPlan:
    if role == "primer":
        return KernelPlan("low-ttl-listen", role, (local_port,), (peer,), ttl, 0.0, 0.0, False)
    return KernelPlan(
        "low-ttl-listen", role, (local_port,), (peer,), NORMAL_TTL, lead_margin(server_rtt), 0.0, True
    )


def predict_ports(last: int, delta: int, window: int = PREDICTION_WINDOW) -> tuple[int, ...]:
    """The next ``window`` ports after ``last`` in steps of ``delta``, wrapping inside ``PORT_RANGE``."""
    low, high = PORT_RANGE
    size = high - low + 1
    return tuple(low + (last - low + k * delta) % size for k in range(1, window + 1))


@dataclass(frozen=True)
class Prediction:
    """A sequentially allocating NAT's next mappings: ``last + k * delta`` for k = 1, 2, ..."""

    host: str
    last: int
    delta: int

    def endpoints(self, window: int = PREDICTION_WINDOW) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(self.host, p) for p in predict_ports(self.last, self.delta, window))


def port_prediction(
    role: Role,
    local_port: int,
    connector: Prediction,
    primer: Endpoint | Prediction,
    ttl: int,
    server_rtt: float | None,
    window: int = PREDICTION_WINDOW,
) -> KernelPlan:
    """The primer primes the connector's predicted ports; the connector connects to the primer's endpoint.

    When the primer's NAT is sequential too (``primer`` a ``Prediction``), its k-th priming SYN gets its k-th
    next port, and the connector's k-th SYN (its NAT's k-th next port) goes there: the k-th SYNs of both
    sides name each other's k-th mapping, so the pairs match by index. Sent in order, without retries (a
    retry would take a port out of turn).

    The connector also listens on its port. Its SYN to the primer's address opened its own NAT for that
    address: if the NAT filters by address only (or not at all), the primer's priming sockets get in from
    whatever ports the primer's NAT gave them once the kernel retransmits their SYNs (after 1 s, with the
    normal TTL), and the listener takes the one that went to the right predicted port. That connects a
    primer whose NAT turned out to map per remote endpoint (random ports, mapping unknown: maybe-stable),
    where the primer's endpoint the connector aims at is not the one it primed from.
    """
    if role == "primer":
        targets = connector.endpoints(window)
        return KernelPlan("port-prediction", role, (local_port,), targets, ttl, 0.0, SYN_INTERVAL, False)
    lead = lead_margin(server_rtt) + window * SYN_INTERVAL
    if isinstance(primer, Prediction):
        targets = primer.endpoints(window)
        return KernelPlan(
            "port-prediction",
            role,
            (local_port,),
            targets,
            NORMAL_TTL,
            lead,
            SYN_INTERVAL,
            False,
            listen=True,
        )
    return KernelPlan(
        "port-prediction", role, (local_port,), (primer,), NORMAL_TTL, lead, 0.0, True, listen=True
    )


def birthday_probability(n: int, m: int, size: int) -> float:
    """Chance that at least one of ``n`` uniform draws from ``size`` ports hits one of ``m`` primed ones."""
    if size <= 0 or m >= size:
        return 1.0 if n > 0 and m > 0 else 0.0
    return 1.0 - (1.0 - m / size) ** n


def birthday_sizes(budget: int, size: int) -> tuple[int, int]:
    """(n, m) splitting the SYN budget evenly: ``n * m`` is largest at ``n == m`` for a given sum."""
    m = min(budget // 2, size)
    return budget - m, m


def guess_ports(seed: bytes, m: int, port_range: tuple[int, int] = PORT_RANGE) -> tuple[int, ...]:
    """``m`` distinct ports of the range, in an order both peers can recompute from ``seed``."""
    low, high = port_range
    rng = random.Random(hashlib.sha256(seed).digest())
    return tuple(rng.sample(range(low, high + 1), min(m, high - low + 1)))


def birthday(
    role: Role,
    local_port: int,
    peer: Endpoint | Prediction,
    ttl: int,
    server_rtt: float | None,
    seed: bytes,
    budget: int = BIRTHDAY_SYN_BUDGET,
    rate: float = BIRTHDAY_RATE,
    port_range: tuple[int, int] = PORT_RANGE,
) -> KernelPlan:
    """The primer primes ``m`` guessed ports and listens; the connector opens ``n`` connections from fresh
    local ports to ``peer``: the primer's endpoint, or its NAT's predicted next ports (a ``Prediction``)."""
    size = port_range[1] - port_range[0] + 1
    n, m = birthday_sizes(budget, size)
    interval = 1.0 / rate
    targets = peer.endpoints() if isinstance(peer, Prediction) else (peer,)
    # A connection guesses right only if it also aims at the primer's actual mapping: one of ``targets``.
    p = birthday_probability(-(-n // len(targets)), m, size)
    wait = listen_pause(server_rtt)
    if role == "primer":
        # First the port the server saw for the connector's punch port, which its first connection uses:
        # where the connector's NAT maps endpoint-independently, that one is a certain hit.
        known = targets[0].port
        drawn = (port for port in guess_ports(seed, m + 1, port_range) if port != known)
        ports = (known, *itertools.islice(drawn, m - 1)) if m else ()
        guesses = tuple(Endpoint(targets[0].host, port) for port in ports)
        return KernelPlan(
            "birthday",
            role,
            (local_port,),
            guesses,
            ttl,
            0.0,
            interval,
            False,
            p,
            listen=True,
            burst=1,
            pause=wait,
        )
    # The connector's first SYNs need only the primer's first priming SYN out (or none, behind
    # endpoint-independent filtering); its others wait until the primer's others are out.
    margin = lead_margin(server_rtt)
    pause = wait + m * interval
    return KernelPlan(
        "birthday",
        role,
        (local_port,) + (0,) * (n - 1),
        targets,
        NORMAL_TTL,
        margin,
        interval,
        False,
        p,
        burst=len(targets),
        pause=pause,
    )


def listen_pause(server_rtt: float | None) -> float:
    """How long both sides of a birthday attempt wait for the listener's connection after their first SYNs:
    the GO skew margin plus two round trips between the peers, estimated by the server's (it sits between
    them), within 50..600 ms."""
    rtt = server_rtt or 0.2
    return min(0.6, max(0.05, lead_margin(server_rtt) + 2 * rtt))


def birthday_approximation(n: int, m: int, size: int) -> float:
    """``1 - exp(-n m / N)``: the familiar form of ``birthday_probability`` (close when ``m << N``)."""
    return 1.0 - math.exp(-n * m / size)
