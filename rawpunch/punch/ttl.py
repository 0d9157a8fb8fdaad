"""Choosing the priming TTL: a SYN that opens our own NAT's mapping and dies before the peer's NAT.

Theory (RFC 791 section 3.2 "Time to Live", RFC 1812 section 5.3.1): every router that *forwards* an IPv4
packet decrements its TTL; a router that receives a packet with TTL <= 1 and would have to forward it drops it
and answers ICMP time exceeded (type 11, code 0). Linux does exactly this in ``ip_forward()``: the check is on
the TTL as it arrives, before the decrement. Count hops from the sending host: the first router (our gateway)
is hop 1. A packet sent with TTL ``t`` arrives at hop ``k`` with ``t - k + 1`` and is forwarded there only if
that is at least 2, so it passes hops ``1 .. t-1`` and dies at hop ``t``.

Priming needs two things of ``t``:

* **Pass our own NAT** (hop ``own``): ``t >= own + 1``. Passing, not just arriving, matters: conntrack creates
  the entry in PREROUTING but only *confirms* it in POSTROUTING (``nf_conntrack_confirm``); a packet that dies
  in ``ip_forward()`` between the two takes its unconfirmed entry with it, and no mapping exists.
* **Die before the peer's NAT** (hop ``peer``): ``t <= peer - 1``. Dying *at* the peer's NAT is not
  enough: the packet is addressed to the NAT box itself, so it is delivered locally, where no TTL check
  happens; the box's own stack sees an unsolicited SYN and (profile ``rst``) answers with a RST that kills
  the mapping we just opened (FACTS.md, "What happens to TCP between two Linux NATs").

The smallest such TTL is ``own + 1``; it exists when ``peer - own >= 2``, i.e. when at least one router sits
between the two NATs. With the NATs adjacent there is no TTL that passes one and not the other.

Numbers, for the lab's ``two_nats(hops=2)`` (a -- nat-a -- r1 -- r2 -- nat-b -- b), seen from a: nat-a
is hop 1, r1 hop 2, r2 hop 3, nat-b hop 4. TTL 2 leaves a as 2, arrives at nat-a as 2 (forwarded, now 1),
arrives at r1 as 1: dropped, ICMP time exceeded from r1. Any TTL in 2..3 works; 2 is chosen. With
``hops=1`` (one core router) TTL 2 still dies at r1, hop 2, one before nat-b at hop 3.

Hop counts come from traceroute-style probes or from TTLs seen on received packets. Linux, macOS and most
routers start at 64 (``net.ipv4.ip_default_ttl``), Windows at 128, some network gear at 255; a packet that
arrives with TTL 57 most likely started at 64 and crossed 7 routers, so its sender is hop 8.
"""

from __future__ import annotations

LINUX_INITIAL_TTL = 64
#: Initial TTLs in common use (RFC 1700 recommended 64; Windows uses 128; many routers 255).
COMMON_INITIAL_TTLS = (64, 128, 255)
MAX_TTL = 255


class NoPrimingTtl(ValueError):
    """No TTL passes our NAT and expires before the peer's: the NATs are adjacent (or the hops are wrong)."""


def priming_ttl(own_nat_hop: int, peer_nat_hop: int) -> int:
    """The smallest TTL that passes our NAT (hop ``own_nat_hop``) and expires at least one hop before the
    peer's NAT (hop ``peer_nat_hop``), both counted from the sending host with its gateway as hop 1."""
    if own_nat_hop < 1:
        raise ValueError(f"our NAT is hop {own_nat_hop}: the first router (the host's gateway) is hop 1")
    if peer_nat_hop <= own_nat_hop:
        raise ValueError(
            f"the peer's NAT (hop {peer_nat_hop}) cannot be nearer than our own NAT (hop {own_nat_hop})"
        )
    ttl = own_nat_hop + 1
    if ttl > peer_nat_hop - 1:
        raise NoPrimingTtl(
            f"no priming TTL exists: our NAT is hop {own_nat_hop} and the peer's NAT hop {peer_nat_hop}, "
            "with no router between them where a SYN could expire. A TTL that passes our NAT "
            f"(>= {ttl}) reaches the peer's NAT, which drops it or answers with a RST that closes our mapping"
        )
    return ttl


def initial_ttl(received_ttl: int) -> int:
    """The likely initial TTL of a packet that arrived with ``received_ttl``: the smallest common one."""
    if not 1 <= received_ttl <= MAX_TTL:
        raise ValueError(f"TTL {received_ttl} is outside 1..{MAX_TTL}")
    return next(t for t in COMMON_INITIAL_TTLS if t >= received_ttl)


def sender_hop(received_ttl: int, initial: int | None = None) -> int:
    """The hop number of the box that sent a packet which arrived with ``received_ttl``.

    Every router between us decremented it once, so ``initial - received_ttl`` routers sit between; the sender
    is one further. ``initial`` defaults to :func:`initial_ttl`'s guess.
    """
    start = initial_ttl(received_ttl) if initial is None else initial
    if received_ttl > start:
        raise ValueError(f"a packet cannot arrive with TTL {received_ttl} when it started with {start}")
    return start - received_ttl + 1
