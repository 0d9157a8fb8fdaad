"""Each strategy connects where it should, through real Linux (and userspace) NATs in network namespaces.

Every punch runs ``rawpunch peer --strategy ...`` in both hosts of ``two_nats(hops=2)`` (netcat mode), sends
data each way, and checks: both exit 0, each received exactly what the other sent, the ``connected`` event
names the expected strategy, and every ``attempt`` event before it carries strategy, ports, TTL, outcome and
time. Lab per test; nothing timed (speed goes to the matrix).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rawpunch.lab.impair import Impairment
from rawpunch.lab.netns import Lab
from rawpunch.lab.profiles import get_profile
from rawpunch.lab.scenario import PunchRun, punch_peers, start_server
from rawpunch.lab.topology import two_nats
from rawpunch.probe import cache
from rawpunch.probe.result import NatBehaviour

pytestmark = pytest.mark.root
TIMEOUT = 90.0
KEY_A = "10.0.1.1|10.0.1.2"  # probe cache key of host a: its default gateway (nat-a) and its address


@pytest.fixture(autouse=True)
def _own_probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The peers read the probe cache from here: another test's cached results must not steer auto."""
    monkeypatch.setenv("RAWPUNCH_CACHE_DIR", str(tmp_path))
    return tmp_path


def punch(
    profile_a: str,
    profile_b: str,
    strategy: str,
    punches: int = 1,
    args: tuple[str, ...] = (),
    impairment: Impairment | None = None,
) -> list[dict[str, PunchRun]]:
    results = []
    topology = two_nats(hops=2, profile_a=profile_a, profile_b=profile_b, impairment=impairment)
    with Lab(topology) as lab:
        server = start_server(lab)
        for i in range(punches):
            send = {"a": os.urandom(50_000) + b"from a", "b": os.urandom(70_000) + b"from b"}
            runs = punch_peers(
                lab,
                server.endpoint,
                os.urandom(12).hex(),
                send,
                args=("--strategy", strategy, *args),
                timeout=TIMEOUT,
            )
            for name, other in (("a", "b"), ("b", "a")):
                run = runs[name]
                assert run.returncode == 0, f"punch {i}, peer {name} ({strategy}):\n{run.stderr}"
                assert run.received == send[other], f"punch {i}: {name} got other bytes than {other} sent"
            results.append(runs)
    return results


def attempts(run: PunchRun) -> list[dict[str, object]]:
    found = [e for e in run.events if e["event"] == "attempt"]
    for e in found:
        assert {"strategy", "ports", "ttl", "outcome", "ms"} <= set(e), e
    return found


def winner(run: PunchRun) -> str:
    connected = run.event("connected")
    assert connected is not None, run.stderr
    last = attempts(run)[-1]
    assert last["outcome"] == "connected" and last["strategy"] == connected["strategy"]
    return str(connected["strategy"])


CASES = [
    ("eim-apdf", "eim-apdf", "low-ttl-listen"),
    ("eim-apdf-rst", "eim-apdf-rst", "low-ttl-listen"),
    ("eim-apdf", "eim-apdf", "simultaneous-open"),
    ("apdm-sequential", "eim-apdf", "port-prediction"),
    ("eim-apdf-rst", "adm-adf-sequential", "port-prediction"),
    ("apdm-sequential", "apdm-sequential", "port-prediction"),  # both sides predicted
    ("apdm-random", "eim-apdf", "birthday"),
    ("adm-adf-sequential", "apdm-random", "birthday"),  # the sequential side primes and listens
]
EXHAUSTION_CASES = [
    ("apdm-random", "apdm-random"),  # both sides exhaust
    ("apdm-sequential", "apdm-random"),  # the random side exhausts, the sequential one sends REACH flows
]


@pytest.mark.parametrize(("profile_a", "profile_b", "strategy"), CASES, ids=["-".join(c) for c in CASES])
def test_a_strategy_connects_through_the_nats_it_is_for(
    profile_a: str, profile_b: str, strategy: str
) -> None:
    # Birthday succeeds with a computed probability: 2000 SYNs make a failure (1e-7) no test's business.
    extra = ("--syn-budget", "2000") if strategy == "birthday" else ()
    (runs,) = punch(profile_a, profile_b, strategy, args=extra)
    for run in runs.values():
        assert winner(run) == strategy
        assert len(attempts(run)) == 1
        if strategy == "birthday":
            guessed = run.event("birthday")
            assert guessed is not None and guessed["connections"] == guessed["guesses"] == 1000
            # Against a sequential primer the connections spread over its predicted ports (plan.birthday).
            floor = 0.85 if "sequential" in profile_a + profile_b else 0.9999
            assert guessed["probability"] > floor


AUTO_CASES = [
    ("eim-apdf", "eim-apdf-rst", "crafted-handshake"),
    ("eim-apdf-random", "eim-apdf", "birthday"),  # random ports seen, mapping unknown: guess
    ("apdm-sequential", "eim-apdf", "port-prediction"),
    ("adm-adf-sequential", "apdm-sequential", "port-prediction"),
    ("eim-apdf-rst", "apdm-random", "birthday"),
    ("eim-eif", "apdm-random", "birthday"),  # the listener takes the first SYN: no guessing
    ("apdm-random", "adm-adf-sequential", "birthday"),  # per-port mapping seen: the sequential side primes
    ("apdm-random", "eim-apdf-random", "birthday"),  # both maybe stable: guessed both ways at once
]


@pytest.mark.parametrize(
    ("profile_a", "profile_b", "expected"), AUTO_CASES, ids=["-".join(c) for c in AUTO_CASES]
)
def test_auto_picks_the_strategy_for_the_pair(profile_a: str, profile_b: str, expected: str) -> None:
    (runs,) = punch(profile_a, profile_b, "auto", args=("--syn-budget", "2000"))  # birthday: see above
    for run in runs.values():
        assert winner(run) == expected
        cascade = run.event("cascade")
        assert cascade is not None and cascade["strategies"][0] == expected


@pytest.mark.parametrize(
    ("profile_a", "profile_b"), EXHAUSTION_CASES, ids=["-".join(c) for c in EXHAUSTION_CASES]
)
def test_port_exhaustion_connects_per_destination_random_nats_and_releases_their_entries(
    profile_a: str, profile_b: str
) -> None:
    """Pairs no guessing reaches (``sweep.py``): over an impaired core (30 +- 10 ms, 1 % loss) the sweep finds
    the flow both NATs mapped to each other, the crafted handshake's engine finishes it, the data crosses
    intact, and afterwards a netfilter NAT holds no more than a handful of the tens of thousands of entries
    the sweep made (the releases moved them to CLOSE, which conntrack drops when no reply was seen)."""
    impairment = Impairment(delay_ms=30, jitter_ms=10, loss=0.01, seed=5)
    topology = two_nats(hops=2, profile_a=profile_a, profile_b=profile_b, impairment=impairment)
    with Lab(topology) as lab:
        server = start_server(lab)
        send = {"a": os.urandom(40_000) + b"from a", "b": os.urandom(60_000) + b"from b"}
        runs = punch_peers(
            lab, server.endpoint, os.urandom(12).hex(), send, ("--strategy", "port-exhaustion"), TIMEOUT
        )
        for name, other in (("a", "b"), ("b", "a")):
            run = runs[name]
            assert run.returncode == 0, f"peer {name}:\n{run.stderr}"
            assert run.received == send[other]
            assert winner(run) == "port-exhaustion"
            plan = run.event("port_exhaustion")
            assert plan is not None and plan["probability"] > 0.95
            assert any(side["kind"] == "exhaust" and side["flows"] == 64512 for side in plan["sides"])
        for nat, profile in (("nat-a", profile_a), ("nat-b", profile_b)):
            if get_profile(profile).backend != "netfilter":
                continue  # the userspace NAT keeps its own table (and only the sequential side's 1,024)
            count = lab.node(nat).run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout
            assert int(count) < 1000, f"{nat} still tracks {count.strip()} entries after the releases"


IMPAIRED_CASES = [
    ("apdm-sequential", "eim-apdf", "port-prediction"),
    ("eim-apdf-rst", "apdm-random", "birthday"),
    ("eim-apdf", "eim-apdf-rst", "crafted-handshake"),
]


@pytest.mark.parametrize(
    ("profile_a", "profile_b", "expected"), IMPAIRED_CASES, ids=["-".join(c) for c in IMPAIRED_CASES]
)
def test_auto_connects_over_an_impaired_core(profile_a: str, profile_b: str, expected: str) -> None:
    """The world has delay, jitter and loss: 20 +- 5 ms on the core and 3 % loss, the GO synchronised from
    measured RTTs. Two punches per pair, both connect (the data checked by ``punch``); auto's first choice is
    the expected strategy, and the winner is one of the cascade (a lost segment may cost the first attempt:
    the cascade is there for that)."""
    impairment = Impairment(delay_ms=20, jitter_ms=5, loss=0.03, seed=11)
    for runs in punch(profile_a, profile_b, "auto", 2, ("--syn-budget", "2000"), impairment):
        for run in runs.values():
            cascade = run.event("cascade")
            assert cascade is not None and cascade["strategies"][0] == expected
            assert winner(run) in cascade["strategies"]


def test_a_failed_attempt_falls_back_to_the_next_strategy_at_a_new_go() -> None:
    """Port prediction between two port-preserving NATs has no delta to predict from: both peers see that
    in the exchanged classification and give up before sending anything, still taking attempt 0's GO (the
    other waits there); at attempt 1's GO the crafted handshake connects."""
    (runs,) = punch("eim-apdf", "eim-apdf", "port-prediction,crafted-handshake")
    for run in runs.values():
        tried = attempts(run)
        assert [(a["strategy"], str(a["outcome"]).split(":")[0]) for a in tried] == [
            ("port-prediction", "failed"),
            ("crafted-handshake", "connected"),
        ]
        assert winner(run) == "crafted-handshake"
        gos = [e for e in run.events if e["event"] == "go"]
        assert [g["attempt"] for g in gos] == [0, 1]


def test_auto_takes_the_cached_probe_result_into_account(_own_probe_cache: Path) -> None:
    """The same pair as above, but a's probe found endpoint-independent mapping: its random ports do not
    matter (the peer sees the endpoint the server saw), so auto starts with the crafted handshake."""
    probed = NatBehaviour(mapping="endpoint-independent", filtering="address-and-port-dependent")
    assert cache.store(probed, key=KEY_A, directory=_own_probe_cache) is not None
    (runs,) = punch("eim-apdf-random", "eim-apdf", "auto")
    own = runs["a"].event("own_nat")
    assert own is not None and own["from_probe"] and own["mapping"] == "endpoint-independent"
    assert own["allocation"] == "random"  # from the discoveries: the probe did not say
    for run in runs.values():
        assert winner(run) == "crafted-handshake"


def test_auto_falls_back_when_its_first_choice_fails(_own_probe_cache: Path) -> None:
    """a's cached probe result claims sequential ports (delta 1), so auto starts with port prediction; but
    nat-a preserves ports, so b primes the wrong ones and a's SYN stays out; the port exhaustion aims at a
    predicted port too, and misses the same way (within its short schedule: 1,025 flows). The last strategy
    of the cascade, the crafted handshake, connects at attempt 2's GO."""
    wrong = NatBehaviour(allocation="sequential", allocation_delta=1)
    assert cache.store(wrong, key=KEY_A, directory=_own_probe_cache) is not None
    (runs,) = punch("eim-apdf", "eim-apdf", "auto")
    for run in runs.values():
        tried = attempts(run)
        assert [(a["strategy"], str(a["outcome"]).split(":")[0]) for a in tried] == [
            ("port-prediction", "failed"),
            ("port-exhaustion", "failed"),
            ("crafted-handshake", "connected"),
        ]
        assert winner(run) == "crafted-handshake"


def test_auto_goes_straight_to_port_exhaustion_where_no_guessing_reaches(_own_probe_cache: Path) -> None:
    """Probe results say: a symmetric NAT with sequential ports (a) against one with random ports and
    endpoint-dependent mapping (b). Port guessing has a 1 in 64512 chance per SYN there (auto.py), so both
    peers skip it: their one attempt is the port exhaustion, and it connects."""
    for key, profile in ((KEY_A, "apdm-sequential"), ("10.0.2.1|10.0.2.2", "apdm-random")):
        p = get_profile(profile)
        known = NatBehaviour(mapping=p.mapping, filtering=p.filtering, allocation=p.allocation)
        assert cache.store(known, key=key, directory=_own_probe_cache) is not None
    topology = two_nats(hops=2, profile_a="apdm-sequential", profile_b="apdm-random")
    with Lab(topology) as lab:
        server = start_server(lab)
        send = {"a": b"from a", "b": b"from b"}
        runs = punch_peers(lab, server.endpoint, os.urandom(12).hex(), send, ("--strategy", "auto"), TIMEOUT)
    for name, other in (("a", "b"), ("b", "a")):
        run = runs[name]
        assert run.returncode == 0, run.stderr
        assert run.received == send[other]
        cascade = run.event("cascade")
        assert cascade is not None and cascade["strategies"] == ["port-exhaustion"]
        assert [a["strategy"] for a in attempts(run)] == ["port-exhaustion"]


def test_auto_sees_two_per_port_mappings_while_registering_and_exhausts_at_once() -> None:
    """No probe results: the fast classification's mapping check (the last port discovered again at the
    server's second port) shows each NAT mapping per remote port, so auto skips guessing, which cannot meet
    two such mappings, and its one attempt, the port exhaustion, connects over an impaired core."""
    impairment = Impairment(delay_ms=20, jitter_ms=5, loss=0.01, seed=3)
    (runs,) = punch("apdm-random", "apdm-random", "auto", impairment=impairment)
    for run in runs.values():
        own = run.event("own_nat")
        assert own is not None and not own["from_probe"]
        assert (own["mapping"], own["allocation"]) == ("address-and-port-dependent", "random")
        checks = [e for e in run.events if e["event"] == "tcp_endpoint" and e.get("mapping_check")]
        assert len(checks) == 1
        cascade = run.event("cascade")
        assert cascade is not None and cascade["strategies"] == ["port-exhaustion"]
        assert [(a["strategy"], a["outcome"]) for a in attempts(run)] == [("port-exhaustion", "connected")]
