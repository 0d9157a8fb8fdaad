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
  The SYN budget ``n + m`` and the rate are bounded;
* ``simultaneous-open`` (the baseline, libp2p DCUtR style): both ``connect()`` at GO with a normal TTL and
  again ``RETRY_DELAY`` after each refusal; a SYN that reaches the other NAT before that NAT's own SYN left
  is dropped or answered with RST (FACTS.md), so between RST-answering NATs it connects only when two
  retries happen to cross (seconds, in the lab), and the others are faster.

The connector waits ``lead`` after GO: the primer's SYNs must have left first. GO's RTT-compensated delays
make the two GOs coincide up to the error of the RTT estimates; ``lead`` adds that margin (from the measured
server RTT) to the time the primer needs to send its SYNs at the plan's rate.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

from rawpunch.proto.codec import Endpoint

Role = Literal["primer", "connector", "both"]
PORT_RANGE = (1024, 65535)  # Linux NAT's range for source ports >= 1024 (nf_nat_l4proto_unique_tuple)
NORMAL_TTL = 64
PREDICTION_WINDOW = 8
BIRTHDAY_SYN_BUDGET = 1000
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
    """
    if role == "primer":
        targets = connector.endpoints(window)
        return KernelPlan("port-prediction", role, (local_port,), targets, ttl, 0.0, SYN_INTERVAL, False)
    lead = lead_margin(server_rtt) + window * SYN_INTERVAL
    if isinstance(primer, Prediction):
        targets = primer.endpoints(window)
        return KernelPlan(
            "port-prediction", role, (local_port,), targets, NORMAL_TTL, lead, SYN_INTERVAL, False
        )
    return KernelPlan("port-prediction", role, (local_port,), (primer,), NORMAL_TTL, lead, 0.0, True)


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
    peer: Endpoint,
    ttl: int,
    server_rtt: float | None,
    seed: bytes,
    budget: int = BIRTHDAY_SYN_BUDGET,
    rate: float = BIRTHDAY_RATE,
    port_range: tuple[int, int] = PORT_RANGE,
) -> KernelPlan:
    """The primer primes ``m`` guessed ports; the connector opens ``n`` connections from fresh local ports."""
    size = port_range[1] - port_range[0] + 1
    n, m = birthday_sizes(budget, size)
    p = birthday_probability(n, m, size)
    interval = 1.0 / rate
    if role == "primer":
        targets = tuple(Endpoint(peer.host, port) for port in guess_ports(seed, m, port_range))
        return KernelPlan("birthday", role, (local_port,), targets, ttl, 0.0, interval, False, p)
    lead = lead_margin(server_rtt) + m * interval
    return KernelPlan("birthday", role, (0,) * n, (peer,), NORMAL_TTL, lead, interval, False, p)


def birthday_approximation(n: int, m: int, size: int) -> float:
    """``1 - exp(-n m / N)``: the familiar form of ``birthday_probability`` (close when ``m << N``)."""
    return 1.0 - math.exp(-n * m / size)
