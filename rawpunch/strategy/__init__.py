"""Punch strategies behind one interface (``base.Strategy``), and ``auto``, which chains them.

======================  ====================================================================================
``crafted-handshake``   crafted SYN/SYN-ACK with a priming TTL, RST suppression, TCP_REPAIR splice
                        (``rawpunch.punch.session``): stable NATs, also those that answer early SYNs with RST
``simultaneous-open``   kernel ``connect()`` on both sides at GO (RTT/2 synchronised): the baseline
``low-ttl-listen``      one side's low-TTL SYN opens its NAT, the other connects (STUNT #2)
``port-prediction``     sequential NAT against a stable or sequential one: prime the predicted next ports
``birthday``            random-port NAT against a stable or sequential one: the stable side primes guesses
                        and listens, the random side connects; a bounded SYN budget
``port-exhaustion``     two per-destination random-port NATs, or one against a sequential NAT: each random
                        side fills its NAT's ports towards one peer endpoint (``sweep.py``); crafted finish
``auto``                the cascade for the pair of NATs (``auto.CASCADES``), under one total deadline
======================  ====================================================================================
"""

from __future__ import annotations

from rawpunch.strategy.base import Strategy

AUTO = "auto"
STRATEGY_NAMES: tuple[str, ...] = (
    AUTO,
    "crafted-handshake",
    "simultaneous-open",
    "low-ttl-listen",
    "port-prediction",
    "birthday",
    "port-exhaustion",
)


def preload() -> None:
    """Import the strategies' modules now (about 5 ms), before the peer is found and the clock runs."""
    get_strategy("crafted-handshake")


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (not ``auto``, which is the runner's cascade)."""
    from rawpunch.strategy import crafted, exhaustion, kernel  # noqa: PLC0415 - keep the package light

    known: dict[str, Strategy] = {
        "crafted-handshake": crafted.CraftedHandshake(),
        "simultaneous-open": kernel.SimultaneousOpen(),
        "low-ttl-listen": kernel.LowTtlListen(),
        "port-prediction": kernel.PortPrediction(),
        "birthday": kernel.Birthday(),
        "port-exhaustion": exhaustion.PortExhaustion(),
    }
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}") from None


__all__ = ["AUTO", "STRATEGY_NAMES", "Strategy", "get_strategy"]
