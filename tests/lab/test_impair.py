"""Impairment on core links, measured: the delay, jitter and loss the middle router produces match what
was asked. This kernel has no sch_netem, so the userspace NFQUEUE backend does the work (the test says so).

Measured with paced UDP echoes from probe1 to the server, both on the impaired router: one-way delays from
the shared monotonic clock (sent, reached the server, came back) and one-way loss from the server's count.
Medians for the delay (within 10% of the request); loss from enough samples that 10% of the requested
share is over 3 standard deviations; the router's random choices are seeded, and only the interleaving of
the two directions varies from run to run.

Needs root (marked ``root``); each test builds its own lab.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import pytest

from rawpunch.lab.impair import READY_LINE, Impairment, PingResult, ping
from rawpunch.lab.netns import Lab
from rawpunch.lab.topology import two_nats

pytestmark = pytest.mark.root

LabFactory = Callable[..., Lab]
ECHO_PORT = 9000
TOLERANCE = 0.10


def measure(lab_factory: LabFactory, imp: Impairment | None, count: int, interval_s: float) -> PingResult:
    lab = lab_factory(two_nats(hops=1, probes=True, impairment=imp))
    if imp is not None:
        assert lab.impairments == {"r1": "userspace"}  # no sch_netem here (FACTS.md)
    echo = lab.node("server").popen(
        [sys.executable, "-m", "rawpunch.lab.impair", "echo", "--port", str(ECHO_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == READY_LINE
    held = 0.0 if imp is None else (imp.delay_ms + imp.jitter_ms) / 1000
    drain = 2 * held + 0.5  # no echo can come back later than this after the last request
    server = str(lab.topology.address("server"))
    result = lab.node("probe1").call(ping, server, ECHO_PORT, count, interval_s, drain, timeout=120)
    print(f"{imp}: {result}")
    return result


def test_delay_and_jitter_match_the_request(lab_factory: LabFactory) -> None:
    imp = Impairment(delay_ms=20, jitter_ms=5, loss=0.02, seed=1)
    result = measure(lab_factory, imp, count=1000, interval_s=0.002)
    for direction, median in zip(("forward", "backward"), result.median_ms(), strict=True):
        assert abs(median - imp.delay_ms) <= TOLERANCE * imp.delay_ms, f"{direction}: {result}"
    uniform_sd = imp.jitter_ms / math.sqrt(3)
    for sd in result.jitter_ms():
        assert abs(sd - uniform_sd) <= 2 * TOLERANCE * uniform_sd, str(result)
    # 1000 samples cannot pin 2% to within 10%; the loss test below does that with a larger share.
    assert 0 < result.forward_loss < 0.06 and 0 < result.backward_loss < 0.06, str(result)


def test_loss_matches_the_request(lab_factory: LabFactory) -> None:
    imp = Impairment(loss=0.2, seed=7)
    result = measure(lab_factory, imp, count=10000, interval_s=0.0001)
    # Binomial: sd = sqrt(0.2 * 0.8 / ~9000) = 0.0042; 10% of 0.2 is 4.7 sd.
    for loss in (result.forward_loss, result.backward_loss):
        assert abs(loss - imp.loss) <= TOLERANCE * imp.loss, str(result)


def test_the_measurement_itself_loses_and_holds_nothing(lab_factory: LabFactory) -> None:
    result = measure(lab_factory, None, count=10000, interval_s=0.0001)
    assert result.server_received == result.received == result.sent, str(result)
    assert max(result.median_ms()) < 1.0, str(result)
