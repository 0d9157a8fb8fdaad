"""The strategies' sans-IO cores: classification, auto's choice table, port prediction, the birthday plan.

Prediction and guessing are checked through the pure NAT model (``natmodel``): the primer's low-TTL SYNs
open its NAT, the connector's SYN gets the public port the model allocates, and the handshake completes
through both models only when the plan's ports contain that port.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest

import rawpunch
from rawpunch.lab.profiles import get_profile
from rawpunch.probe.result import NatBehaviour
from rawpunch.proto.codec import Endpoint, TcpMapping
from rawpunch.proto.peerinfo import PeerInfo, decode_peer_info, encode_peer_info
from rawpunch.punch import natmodel
from rawpunch.punch.firewall import PunchFlow, render_apply
from rawpunch.punch.natmodel import CtState, Forward, Nat
from rawpunch.punch.segment import Flags, Segment
from rawpunch.strategy import STRATEGY_NAMES, auto, classify, get_strategy, kernel, plan, runner
from rawpunch.strategy.base import AttemptFailed, PeerView
from rawpunch.strategy.runner import attempt_port, budget, check_strategy, plan_cascade

SERVER = Endpoint("203.0.113.10", 3478)
E_LAN, E_PUB = "10.0.2.2", "198.51.100.10"
S_LAN, S_PUB = "10.0.1.2", "198.51.100.2"
Q = 40000  # the primer's punch port
E_ISN, S_ISN = 7_000_000, 900_000


def mappings(*pairs: tuple[int, int]) -> list[TcpMapping]:
    return [TcpMapping(local, Endpoint(S_PUB, public)) for local, public in pairs]


# --- classification ------------------------------------------------------------------------------------

CLASSIFY_CASES = {
    "port preserved": (mappings((40001, 40001), (51000, 51000), (33333, 33333)), "port-preserving", None),
    "sequential +1": (mappings((40001, 1030), (51000, 1031), (33333, 1032)), "sequential", 1),
    "sequential +4": (mappings((40001, 2000), (51000, 2004), (33333, 2008)), "sequential", 4),
    "sequential -2": (mappings((40001, 9000), (51000, 8998), (33333, 8996)), "sequential", -2),
    "random": (mappings((40001, 31022), (51000, 1443), (33333, 60001)), "random", None),
    "uneven steps": (mappings((40001, 1030), (51000, 1031), (33333, 1033)), "random", None),
    "step too large": (mappings((40001, 1000), (51000, 1100), (33333, 1200)), "random", None),
    "one discovery": (mappings((40001, 1030)), "unknown", None),
}


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_discoveries_classify_the_allocation(case: str) -> None:
    observed, allocation, delta = CLASSIFY_CASES[case]
    found = classify.classify_discoveries(observed)
    assert (found.allocation, found.allocation_delta, found.mapping) == (allocation, delta, "unknown")


@pytest.mark.parametrize(
    ("check", "mapping"),
    [(1032, "unknown"), (1033, "address-and-port-dependent"), (5000, "address-and-port-dependent")],
)
def test_the_mapping_check_repeats_the_last_port_and_shows_per_port_mapping(check: int, mapping: str) -> None:
    """The last local port discovered again at the server's other port: the same public port says
    "endpoint-independent or address-dependent" (left unknown), another says address-and-port-dependent."""
    observed = [*mappings((40001, 1030), (51000, 1031), (33333, 1032)), *mappings((33333, check))]
    found = classify.classify_discoveries(observed)
    assert (found.allocation, found.allocation_delta, found.mapping) == ("sequential", 1, mapping)


@pytest.mark.parametrize(
    ("profile", "mapping"),
    [
        ("apdm-random", "address-and-port-dependent"),
        ("apdm-sequential", "address-and-port-dependent"),
        ("adm-adf-sequential", "unknown"),
        ("eim-apdf-random", "unknown"),
        ("eim-apdf", "unknown"),
    ],
)
def test_the_mapping_check_through_the_nat_models(profile: str, mapping: str) -> None:
    nat = Nat(S_PUB, "10.0.1.1", get_profile(profile), next_port=20000, seed=3)
    nat, found = discover(nat, [41000, 41001, 41002], 0.0)
    check_port = Endpoint(SERVER.host, SERVER.port + 2)
    nat, verdict = natmodel.outbound(nat, syn(Endpoint(nat.lan_ip, 41002), check_port, 1), 0.1)
    assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
    checked = classify.classify_discoveries([*found, TcpMapping(41002, verdict.item.src)])
    assert checked.mapping == mapping


def test_a_probe_result_wins_where_it_knows_and_the_discoveries_fill_the_rest() -> None:
    probe = NatBehaviour(mapping="endpoint-independent", filtering="address-and-port-dependent")
    quick = NatBehaviour(allocation="sequential", allocation_delta=2)
    merged = classify.merge(probe, quick)
    assert (merged.mapping, merged.allocation, merged.allocation_delta) == (
        "endpoint-independent",
        "sequential",
        2,
    )
    assert classify.merge(None, quick) == quick
    known = NatBehaviour(allocation="random")
    assert classify.merge(known, quick).allocation == "random"
    assert classify.merge(known, quick).allocation_delta is None


def test_the_classification_travels_in_the_sealed_peer_info() -> None:
    b = NatBehaviour(mapping="address-and-port-dependent", allocation="sequential", allocation_delta=-3)
    info = decode_peer_info(encode_peer_info(PeerInfo(punch_ports=(1, 2, 3), **classify.info_fields(b))))
    assert classify.from_info(info) == NatBehaviour(
        mapping="address-and-port-dependent", allocation="sequential", allocation_delta=-3
    )
    assert info.punch_ports == (1, 2, 3)
    odd = NatBehaviour(mapping="something new", allocation_delta=1 << 20)
    assert classify.info_fields(odd)["nat_mapping"] == "unknown"
    assert classify.info_fields(odd)["nat_delta"] is None


# --- auto --------------------------------------------------------------------------------------------------


def truth(profile: str, delta: int | None = None) -> NatBehaviour:
    """A lab profile's ground truth as a probe would report it."""
    p = get_profile(profile)
    return NatBehaviour(
        mapping=p.mapping, filtering=p.filtering, allocation=p.allocation, allocation_delta=delta
    )


UNKNOWN = NatBehaviour()
SEQUENTIAL_QUICK = NatBehaviour(allocation="sequential", allocation_delta=1)
RANDOM_QUICK = NatBehaviour(allocation="random")
PRESERVING_QUICK = NatBehaviour(allocation="port-preserving")
AUTO_CASES = {
    "eim x eim": (truth("eim-apdf"), truth("eim-apdf-rst"), "crafted-handshake", 0),
    "nothing known": (UNKNOWN, UNKNOWN, "crafted-handshake", 0),
    "preserving x preserving (quick)": (PRESERVING_QUICK, PRESERVING_QUICK, "crafted-handshake", 0),
    "sequential x eim": (truth("apdm-sequential", 1), truth("eim-apdf"), "port-prediction", 1),
    "eim x sequential (quick)": (PRESERVING_QUICK, SEQUENTIAL_QUICK, "port-prediction", 0),
    "random x eim": (truth("apdm-random"), truth("eim-apdf"), "birthday", 1),
    "eim x random (quick)": (UNKNOWN, RANDOM_QUICK, "birthday", 0),
    "eim with random ports x eim": (truth("eim-apdf-random"), truth("eim-apdf"), "crafted-handshake", 0),
    "random x random (quick: maybe stable)": (truth("apdm-random"), RANDOM_QUICK, "birthday", 1),
    "random x random": (truth("apdm-random"), truth("apdm-random"), "port-exhaustion", 0),
    "random ports x sequential (quick)": (SEQUENTIAL_QUICK, RANDOM_QUICK, "port-prediction", 1),
    "random ports x random ports (quick)": (RANDOM_QUICK, RANDOM_QUICK, "birthday", 0),
    "sequential without delta": (NatBehaviour(allocation="sequential"), UNKNOWN, "crafted-handshake", 0),
    "sequential x sequential": (truth("apdm-sequential", 1), SEQUENTIAL_QUICK, "port-prediction", 0),
    "address-dependent sequential x random": (
        truth("adm-adf-sequential", 1),
        truth("apdm-random"),
        "birthday",
        0,
    ),
    "symmetric sequential x random ports (quick)": (
        truth("apdm-sequential", 1),
        RANDOM_QUICK,
        "port-prediction",
        1,
    ),
}


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_chooses_from_both_nats(case: str) -> None:
    slot0, slot1, first, stable = AUTO_CASES[case]
    chosen = auto.cascade(slot0, slot1)
    assert chosen[0] == first
    assert set(chosen) <= set(STRATEGY_NAMES) - {"auto"}
    for name in set(chosen):  # a strategy comes at most twice: once with each side as the stable one
        assert chosen.count(name) <= 2
    assert auto.stable_side(slot0, slot1) == stable


def test_both_peers_compute_the_same_cascade() -> None:
    """Each peer calls cascade(slot 0's, slot 1's); the table must not depend on the order either."""
    behaviours = [case[0] for case in AUTO_CASES.values()] + [case[1] for case in AUTO_CASES.values()]
    for a, b in itertools.product(behaviours, repeat=2):
        assert auto.cascade(a, b) == auto.cascade(b, a)
    assert set(auto.CASCADES) == {
        frozenset(pair) for pair in itertools.combinations_with_replacement(auto.NAT_CLASSES, 2)
    }


def test_strategy_names_are_known_and_bad_ones_say_which_exist() -> None:
    assert STRATEGY_NAMES[0] == "auto"
    for name in STRATEGY_NAMES[1:]:
        assert get_strategy(name).name == name
        assert name in auto.CASCADES[frozenset({"stable"})] or name in (
            "port-prediction",
            "birthday",
            "port-exhaustion",
        )
    with pytest.raises(ValueError, match="unknown strategy 'magic'; choose one of: auto, crafted-handshake"):
        check_strategy("magic")


@pytest.mark.parametrize(
    ("strategy", "remaining", "last", "expected"),
    [
        ("crafted-handshake", 10.0, False, 4.0),
        ("crafted-handshake", 10.0, True, 10.0),
        ("birthday", 3.0, False, 3.0),
        ("port-prediction", -1.0, True, 0.0),
    ],
)
def test_attempt_budgets_share_one_total_deadline(
    strategy: str, remaining: float, last: bool, expected: float
) -> None:
    assert budget(strategy, remaining, last) == expected


# --- port prediction through the NAT model --------------------------------------------------------------


def syn(src: Endpoint, dst: Endpoint, seq: int, ttl: int = 64) -> Segment:
    return Segment(src, dst, seq=seq, flags=Flags.SYN, ttl=ttl)


def discover(nat: Nat, lan_ports: list[int], now: float) -> tuple[Nat, list[TcpMapping]]:
    found = []
    for port in lan_ports:
        nat, verdict = natmodel.outbound(nat, syn(Endpoint(nat.lan_ip, port), SERVER, 1), now)
        assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
        found.append(TcpMapping(port, verdict.item.src))
    return nat, found


def kernel_handshake(
    primer: Nat,
    primer_lan: Endpoint,
    targets: tuple[Endpoint, ...],
    connector: Nat,
    connector_lan: Endpoint,
    primer_public: Endpoint,
    now: float,
) -> tuple[Nat, Nat, bool]:
    """The primer's low-TTL SYNs to ``targets``, the connector's SYN, and -- if it gets in -- the kernel's
    simultaneous-open SYN-ACK and the final ACK. True when every segment passed both NATs."""
    for target in targets:
        primer, verdict = natmodel.outbound(primer, syn(primer_lan, target, E_ISN, ttl=2), now)
        assert isinstance(verdict, Forward)  # passes its own NAT (and dies at the next router)
    connector, out = natmodel.outbound(connector, syn(connector_lan, primer_public, S_ISN), now + 0.01)
    assert isinstance(out, Forward) and isinstance(out.item, Segment)
    primer, into = natmodel.inbound(primer, out.item, now + 0.02)
    if not (isinstance(into, Forward) and into.item.dst == primer_lan):
        return primer, connector, False
    seen_from = out.item.src
    synack = Segment(primer_lan, seen_from, seq=E_ISN, ack=S_ISN + 1, flags=Flags.SYN | Flags.ACK)
    primer, out2 = natmodel.outbound(primer, synack, now + 0.03)
    assert isinstance(out2, Forward) and isinstance(out2.item, Segment)
    connector, into2 = natmodel.inbound(connector, out2.item, now + 0.04)
    assert isinstance(into2, Forward) and into2.item.dst == connector_lan
    ack = Segment(connector_lan, primer_public, seq=S_ISN + 1, ack=E_ISN + 1, flags=Flags.ACK)
    connector, out3 = natmodel.outbound(connector, ack, now + 0.05)
    assert isinstance(out3, Forward) and isinstance(out3.item, Segment)
    primer, into3 = natmodel.inbound(primer, out3.item, now + 0.06)
    assert isinstance(into3, Forward)
    return primer, connector, True


def nats(connector_profile: str, primer_profile: str = "eim-apdf", **kw: object) -> tuple[Nat, Nat]:
    primer = Nat(E_PUB, "10.0.2.1", get_profile(primer_profile))
    connector = Nat(S_PUB, "10.0.1.1", get_profile(connector_profile), **kw)  # type: ignore[arg-type]
    return primer, connector


@pytest.mark.parametrize("next_port", [1024, 30000, 65533])
def test_port_prediction_through_a_sequential_nat_model(next_port: int) -> None:
    primer, connector = nats("apdm-sequential", next_port=next_port)
    connector, seen = discover(connector, [41000, 41001, 41002], 0.0)
    quick = classify.classify_discoveries(seen)
    assert (quick.allocation, quick.allocation_delta) == ("sequential", 1)
    primer, own = discover(primer, [Q], 0.0)
    p = plan.port_prediction(
        "primer", Q, plan.Prediction(S_PUB, seen[-1].public.port, 1), own[0].public, 2, 0.01
    )
    connector_lan = Endpoint(S_LAN, 41003)
    primer, connector, ok = kernel_handshake(
        primer, Endpoint(E_LAN, Q), p.targets, connector, connector_lan, own[0].public, 1.0
    )
    assert ok
    entry = connector.entry(connector_lan, own[0].public, 1.1)
    assert entry is not None and entry.state is CtState.ESTABLISHED
    assert entry.public in p.targets


def test_without_priming_or_with_a_wrong_delta_the_sequential_nat_keeps_the_connector_out() -> None:
    def unprimed(last: int) -> tuple[Endpoint, ...]:
        return ()

    def wrong_delta(last: int) -> tuple[Endpoint, ...]:
        prediction = plan.Prediction(S_PUB, last, 5)
        return plan.port_prediction("primer", Q, prediction, Endpoint(E_PUB, Q), 2, 0.01).targets

    for targets_of in (unprimed, wrong_delta):
        primer, connector = nats("apdm-sequential", next_port=2000)
        connector, seen = discover(connector, [41000, 41001, 41002], 0.0)
        primer, own = discover(primer, [Q], 0.0)
        *_, ok = kernel_handshake(
            primer,
            Endpoint(E_LAN, Q),
            targets_of(seen[-1].public.port),
            connector,
            Endpoint(S_LAN, 41003),
            own[0].public,
            1.0,
        )
        assert not ok


@pytest.mark.parametrize("double", [True, False])
def test_between_two_sequential_nats_the_k_th_syns_name_each_others_k_th_mapping(double: bool) -> None:
    """Both NATs allocate sequentially: the primer's k-th priming SYN gets its NAT's k-th next port, aimed at
    the connector's k-th predicted port, and the connector aims its k-th SYN at the primer's k-th predicted
    port. Without predicting the primer too (aiming at its discovered endpoint) nothing gets in."""
    primer_nat = Nat(E_PUB, "10.0.2.1", get_profile("apdm-sequential"), next_port=5000)
    connector_nat = Nat(S_PUB, "10.0.1.1", get_profile("apdm-sequential"), next_port=30000)
    primer_nat, primer_seen = discover(primer_nat, [40001, 40002, Q], 0.0)
    connector_nat, connector_seen = discover(connector_nat, [41000, 41001, 41002], 0.0)
    connector = plan.Prediction(S_PUB, connector_seen[-1].public.port, 1)
    primer_next = plan.Prediction(E_PUB, primer_seen[-1].public.port, 1)
    aim = primer_next if double else primer_seen[-1].public
    primes = plan.port_prediction("primer", Q, connector, aim, 2, 0.01)
    dials = plan.port_prediction("connector", 41003, connector, aim, 2, 0.01)
    assert dials.retry is not double
    for target in primes.targets:
        primer_nat, verdict = natmodel.outbound(
            primer_nat, syn(Endpoint(E_LAN, Q), target, E_ISN, ttl=2), 0.1
        )
        assert isinstance(verdict, Forward)
    passed = []
    for target in dials.targets:
        connector_nat, out = natmodel.outbound(connector_nat, syn(Endpoint(S_LAN, 41003), target, S_ISN), 0.2)
        assert isinstance(out, Forward) and isinstance(out.item, Segment)
        primer_nat, into = natmodel.inbound(primer_nat, out.item, 0.3)
        passed.append(isinstance(into, Forward) and into.item.dst == Endpoint(E_LAN, Q))
        if passed[-1] and len(passed) == 1:  # the kernel's SYN-ACK of the first pair gets back in too
            synack = Segment(
                Endpoint(E_LAN, Q), out.item.src, seq=E_ISN, ack=S_ISN + 1, flags=Flags.SYN | Flags.ACK
            )
            primer_nat, back = natmodel.outbound(primer_nat, synack, 0.4)
            assert isinstance(back, Forward) and isinstance(back.item, Segment)
            connector_nat, home = natmodel.inbound(connector_nat, back.item, 0.5)
            assert isinstance(home, Forward) and home.item.dst == Endpoint(S_LAN, 41003)
    assert passed == ([True] * plan.PREDICTION_WINDOW if double else [False])


@pytest.mark.parametrize(
    ("last", "delta", "expected"),
    [
        (1030, 1, (1031, 1032, 1033)),
        (65534, 1, (65535, 1024, 1025)),
        (1025, -1, (1024, 65535, 65534)),
        (2000, 3, (2003, 2006, 2009)),
    ],
)
def test_predicted_ports_step_by_delta_and_wrap_in_the_range(
    last: int, delta: int, expected: tuple[int, ...]
) -> None:
    assert plan.predict_ports(last, delta, 3) == expected


def test_the_connector_waits_for_the_primers_window() -> None:
    predicted = plan.Prediction(S_PUB, 1030, 1)
    primer = plan.port_prediction("primer", Q, predicted, Endpoint(E_PUB, Q), 2, 0.04)
    connector = plan.port_prediction("connector", 41003, predicted, Endpoint(E_PUB, Q), 2, 0.04)
    assert connector.targets == (Endpoint(E_PUB, Q),)
    assert (primer.role, primer.ttl, primer.lead, len(primer.targets)) == (
        "primer",
        2,
        0.0,
        plan.PREDICTION_WINDOW,
    )
    assert connector.ttl == plan.NORMAL_TTL and connector.retry
    assert connector.lead >= primer.interval * len(primer.targets) + 0.02  # RTT/2 margin for the GO skew


# --- birthday ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "size", "expected"),
    [
        (0, 10, 100, 0.0),
        (1, 1, 100, 0.01),
        (2, 50, 100, 0.75),
        (10, 100, 100, 1.0),
        (500, 500, 64512, 0.9796),
    ],
)
def test_birthday_probability(n: int, m: int, size: int, expected: float) -> None:
    assert plan.birthday_probability(n, m, size) == pytest.approx(expected, abs=1e-4)


def test_the_default_budget_expects_95_percent_on_linux_s_port_range() -> None:
    size = plan.PORT_RANGE[1] - plan.PORT_RANGE[0] + 1
    n, m = plan.birthday_sizes(plan.BIRTHDAY_SYN_BUDGET, size)
    assert n + m == plan.BIRTHDAY_SYN_BUDGET
    assert plan.birthday_probability(n, m, size) >= 0.95
    assert plan.birthday_approximation(n, m, size) == pytest.approx(
        plan.birthday_probability(n, m, size), abs=0.01
    )


def test_birthday_plans_stay_within_the_syn_budget_and_rate() -> None:
    seed = b"both nonces"
    primer = plan.birthday("primer", Q, Endpoint(S_PUB, 2000), 2, 0.02, seed, budget=200, rate=1000)
    connector = plan.birthday("connector", 41000, Endpoint(E_PUB, Q), 2, 0.02, seed, budget=200, rate=1000)
    assert primer.syns + connector.syns == 200
    assert len(set(primer.targets)) == len(primer.targets) == 100
    assert all(plan.PORT_RANGE[0] <= t.port <= plan.PORT_RANGE[1] for t in primer.targets)
    assert primer.interval == connector.interval == 1 / 1000
    # One SYN for a listening primer at once; the others once the primer's SYNs are out.
    assert connector.burst == 1 and connector.lead + connector.pause >= connector.lead + 100 / 1000
    assert primer.probability == connector.probability
    # First the connector's punch port as the server saw it (a hit if its NAT maps endpoint-independently),
    # then guesses both peers recompute from the seed.
    assert primer.targets[0] == Endpoint(S_PUB, 2000) and connector.local_ports[0] == 41000
    assert set(connector.local_ports[1:]) == {0}
    drawn = [port for port in plan.guess_ports(seed, 101) if port != 2000]
    assert drawn[:99] == [t.port for t in primer.targets[1:]]
    assert plan.guess_ports(b"other", 100) != plan.guess_ports(seed, 100)


def test_birthday_success_rate_through_a_random_nat_model_matches_the_computed_probability() -> None:
    """A small port range makes hits frequent: over fixed seeds, the share of trials in which a connector
    SYN got through both NAT models is what ``birthday_probability`` predicts (binomial, 4 sigma)."""
    port_range, n, m, trials = (20000, 20199), 12, 12, 150
    size = port_range[1] - port_range[0] + 1
    successes = 0
    for trial in range(trials):
        primer, connector = nats("apdm-random", port_range=port_range, seed=trial)
        primer, own = discover(primer, [Q], 0.0)
        guesses = plan.guess_ports(trial.to_bytes(4, "big"), m, port_range)
        for g in guesses:
            primer, _ = natmodel.outbound(
                primer, syn(Endpoint(E_LAN, Q), Endpoint(S_PUB, g), E_ISN, ttl=2), 0.0
            )
        hit = False
        for i in range(n):
            connector, out = natmodel.outbound(
                connector, syn(Endpoint(S_LAN, 42000 + i), own[0].public, S_ISN), 0.1
            )
            assert isinstance(out, Forward) and isinstance(out.item, Segment)
            primer, into = natmodel.inbound(primer, out.item, 0.2)
            hit = hit or (isinstance(into, Forward) and out.item.src.port in guesses)
        successes += hit
    p = plan.birthday_probability(n, m, size)
    sigma = (p * (1 - p) / trials) ** 0.5
    assert abs(successes / trials - p) <= 4 * sigma


# --- the runner's shared decisions ---------------------------------------------------------------------


def view(slot: int, ports: tuple[int, ...], public: dict[int, int], strategy: str = "auto") -> PeerView:
    info = PeerInfo(punch_ports=ports, tcp_port=ports[0] if ports else None, strategy=strategy)
    eps = {local: Endpoint(S_PUB, pub) for local, pub in public.items()}
    return PeerView(slot, info, NatBehaviour(), eps, 0)


def test_attempt_i_uses_the_i_th_discovered_port_on_each_side() -> None:
    v = view(0, (40000, 40001, 40002), {40000: 1, 40001: 2, 40002: 3})
    assert [attempt_port(v, i) for i in range(5)] == [40000, 40001, 40002, 40000, 40001]
    # A port the server holds no mapping for is skipped; an older peer has only tcp_port.
    assert [attempt_port(view(1, (7, 8), {8: 1}), i) for i in range(2)] == [8, 8]
    old = PeerView(1, PeerInfo(tcp_port=9), NatBehaviour(), {9: Endpoint(S_PUB, 9)}, 9)
    assert attempt_port(old, 3) == 9


@pytest.mark.parametrize(
    ("text", "cascade"),
    [
        ("birthday", ("birthday",)),
        ("port-prediction, crafted-handshake", ("port-prediction", "crafted-handshake")),
    ],
)
def test_an_explicit_strategy_list_is_the_cascade(text: str, cascade: tuple[str, ...]) -> None:
    me, peer = view(0, (1,), {1: 1}, check_strategy(text)), view(1, (2,), {2: 2}, check_strategy(text))
    assert plan_cascade(check_strategy(text), me, peer) == cascade


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("auto,birthday", "'auto' is a cascade of its own"),
        ("birthday,birthday", "names a strategy twice"),
        ("birthday,", "unknown strategy ''"),
    ],
)
def test_bad_strategy_lists_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        check_strategy(text)


def test_peers_that_asked_for_different_strategies_are_told_so() -> None:
    me, peer = view(0, (1,), {1: 1}, "auto"), view(1, (2,), {2: 2}, "birthday")
    with pytest.raises(AttemptFailed, match="the peer runs --strategy birthday, this side auto"):
        plan_cascade("auto", me, peer)


def test_connect_refuses_an_unknown_strategy_before_sending_anything() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        rawpunch.connect("203.0.113.10:3478", "a long enough secret", strategy="fastest")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--strategy", "magic"), "argument --strategy: unknown strategy 'magic'; choose one of: auto,"),
        (("--strategy", "auto,birthday"), "'auto' is a cascade of its own"),
        (("--syn-budget", "1"), "argument --syn-budget: '1': give a number of SYNs from 2 to 8000"),
    ],
)
def test_peer_command_line_refuses_bad_strategy_options_in_one_line(
    args: tuple[str, ...], error: str
) -> None:
    argv = [sys.executable, "-m", "rawpunch", "peer", "--server", "203.0.113.10:3478", "--session", "s" * 20]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert error in done.stderr.splitlines()[-1]


def test_kernel_socket_strategies_install_the_time_exceeded_and_rst_drops_only() -> None:
    """Low-TTL SYNs of kernel sockets: their expiry's ICMP must not abort the socket in SYN-SENT, and the
    kernel's RST to a peer SYN that came before our socket must not abort the peer's; nothing is queued (the
    kernel answers its own segments), and any port of the peer's host counts."""
    flow = PunchFlow(40000, Endpoint(S_PUB, 1027), 0, kernel_sockets=True)
    text = render_apply("k1", flow)
    icmp, rst = [line for line in text.splitlines() if line.startswith("-A RAWPUNCH-k1-")]
    assert "--icmp-type 11" in icmp and icmp.endswith("-j DROP") and "NFQUEUE" not in text
    assert "@8>>16=0x9C40" in icmp  # local port 40000, peer port not compared
    assert "0x0403" not in icmp  # 1027
    assert rst.startswith("-A RAWPUNCH-k1-OUT") and f"-d {S_PUB}/32" in rst and "--sport 40000" in rst
    assert "--tcp-flags RST RST" in rst and "--dport" not in rst and rst.endswith("-j DROP")
    for rule in (icmp, rst):
        assert '--comment "rawpunch k1' in rule


def test_a_repeated_strategy_swaps_the_stable_side() -> None:
    names = ("birthday", "birthday", "crafted-handshake")  # a cascade of one's own (--strategy a,b,c)
    assert [auto.stable_slot_for(names, i, 0) for i in range(len(names))] == [0, 1, 0]
    assert [auto.stable_slot_for(names, i, 1) for i in range(len(names))] == [1, 0, 1]


# --- who primes, and pairs no guessing reaches -----------------------------------------------------------


@pytest.mark.parametrize(
    ("slot0", "slot1", "primer"),
    [
        (PRESERVING_QUICK, RANDOM_QUICK, 0),  # the stable side
        (RANDOM_QUICK, SEQUENTIAL_QUICK, 1),  # the sequential side: its next ports are predicted
        (truth("apdm-random"), truth("adm-adf-sequential", 1), 1),
        (RANDOM_QUICK, RANDOM_QUICK, 0),
    ],
)
def test_birthday_primes_from_the_side_the_other_can_aim_at(
    slot0: NatBehaviour, slot1: NatBehaviour, primer: int
) -> None:
    names = auto.cascade(slot0, slot1)
    first = names.index("birthday")
    stable = auto.stable_slot_for(names, first, auto.stable_side(slot0, slot1))
    assert auto.birthday_primer(slot0, slot1, stable) == primer
    if names.count("birthday") == 2:  # the repeat swaps the roles
        second = names.index("birthday", first + 1)
        swapped = auto.stable_slot_for(names, second, auto.stable_side(slot0, slot1))
        assert auto.birthday_primer(slot0, slot1, swapped) == 1 - primer


def test_random_ports_against_sequential_ones_try_prediction_then_the_sequential_side_primes() -> None:
    assert auto.cascade(RANDOM_QUICK, SEQUENTIAL_QUICK) == ("port-prediction", "birthday", "port-exhaustion")
    sequential_adf = truth("adm-adf-sequential", 1)
    assert auto.cascade(sequential_adf, truth("apdm-random")) == ("birthday", "port-exhaustion")


def test_a_symmetric_sequential_nat_against_a_random_one_goes_to_port_exhaustion_without_guessing() -> None:
    symmetric = truth("apdm-sequential", 1)
    assert auto.cascade(symmetric, truth("apdm-random")) == ("port-exhaustion",)
    # Random ports with the mapping unknown may be endpoint-independent: port prediction first.
    assert auto.cascade(RANDOM_QUICK, symmetric) == ("port-prediction", "port-exhaustion")
    me = PeerView(0, PeerInfo(punch_ports=(1,), strategy="auto"), symmetric, {1: Endpoint(S_PUB, 1)}, 1)
    peer = PeerView(1, PeerInfo(punch_ports=(2,), strategy="auto"), truth("apdm-random"), {2: SERVER}, 2)
    assert plan_cascade("auto", me, peer) == ("port-exhaustion",)


def test_wherever_a_side_is_not_stable_port_exhaustion_is_the_last_resort_and_the_deadline_grows() -> None:
    for classes, names in auto.CASCADES.items():
        assert ("port-exhaustion" in names) == (classes != frozenset({"stable"}))
        deadline = runner.default_deadline(names)
        assert deadline == (runner.EXHAUSTION_DEADLINE if "port-exhaustion" in names else 10.0)


def test_the_birthday_connector_aims_at_a_sequential_primers_next_ports_in_turn() -> None:
    predicted = plan.Prediction(E_PUB, 2000, 1)
    connector = plan.birthday("connector", 0, predicted, 2, 0.02, b"seed", budget=200, rate=1000)
    window = predicted.endpoints()
    assert connector.targets == window and connector.burst == len(window)
    pairs = list(kernel._pairs(connector))
    assert len(pairs) == 100 and [t for _, t in pairs[: 2 * len(window)]] == [*window, *window]
    # Each connection guesses right only if it aims at the real mapping too: n / window draws count.
    assert connector.probability == plan.birthday_probability(-(-100 // len(window)), 100, 64512)
    primer = plan.birthday("primer", Q, Endpoint(S_PUB, 1), 2, 0.02, b"seed", budget=200, rate=1000)
    assert primer.listen and not connector.listen
    assert connector.lead + connector.pause >= primer.syns * primer.interval  # the rest after the guesses


def listener_handshake(primer: Nat, primer_lan: Endpoint, connector: Nat, aim: Endpoint) -> bool:
    """The connector's SYN from a fresh port to ``aim``; True if the primer's NAT lets it in to
    ``primer_lan`` (where the listener takes it) and the listener's SYN-ACK gets back through both."""
    lan = Endpoint(S_LAN, 45000)
    connector, out = natmodel.outbound(connector, syn(lan, aim, S_ISN), 0.1)
    assert isinstance(out, Forward) and isinstance(out.item, Segment)
    primer, into = natmodel.inbound(primer, out.item, 0.2)
    if not (isinstance(into, Forward) and into.item.dst == primer_lan):
        return False
    synack = Segment(primer_lan, out.item.src, seq=E_ISN, ack=S_ISN + 1, flags=Flags.SYN | Flags.ACK)
    primer, back = natmodel.outbound(primer, synack, 0.3)
    assert isinstance(back, Forward) and isinstance(back.item, Segment)
    connector, home = natmodel.inbound(connector, back.item, 0.4)
    return isinstance(home, Forward) and home.item.dst == lan


@pytest.mark.parametrize(
    ("primer_profile", "gets_in"),
    [("adm-adf-sequential", True), ("eim-eif", True), ("apdm-sequential", False), ("eim-apdf", False)],
)
def test_a_listening_primer_takes_the_random_sides_syn_where_its_nat_filters_by_address(
    primer_profile: str, gets_in: bool
) -> None:
    """One priming SYN to a wrong guess of the peer's port: behind address-dependent or endpoint-independent
    filtering the connector's SYN from its random port reaches the listener at the predicted next port."""
    primer, connector = nats("apdm-random", primer_profile)
    connector = dataclasses.replace(connector, seed=7)
    primer, found = discover(primer, [Q, Q + 1], 0.0)
    lan = Endpoint(E_LAN, Q + 1)
    primer, verdict = natmodel.outbound(primer, syn(lan, Endpoint(S_PUB, 1), E_ISN, ttl=2), 0.05)
    assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
    allocation = get_profile(primer_profile).allocation
    if allocation == "sequential":
        assert verdict.item.src == plan.Prediction(E_PUB, found[-1].public.port, 1).endpoints(1)[0]
    assert listener_handshake(primer, lan, connector, verdict.item.src) is gets_in


def test_two_maybe_stable_sides_guess_both_ways_at_once_and_no_other_pair_does() -> None:
    """Either may be the endpoint-independent one that must prime: a one-way attempt is a coin toss."""
    pairs = list(
        itertools.product([PRESERVING_QUICK, RANDOM_QUICK, SEQUENTIAL_QUICK, truth("apdm-random")], repeat=2)
    )
    both = [(a, b) for a, b in pairs if auto.guesses_both_ways(a, b)]
    assert both == [(RANDOM_QUICK, RANDOM_QUICK)]
    assert auto.cascade(RANDOM_QUICK, RANDOM_QUICK)[0] == "birthday"
