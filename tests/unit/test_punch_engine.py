"""The punch engine: its transition table cell by cell, exact-number checks, timers, negotiation, and two
engines pumped through the NAT model (``punch_helpers.Pump``)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest
from punch_helpers import (
    A_ISN,
    A_OPTIONS,
    B_ISN,
    B_OPTIONS,
    B_PORT,
    LAN_B,
    Driven,
    Pump,
    config_a,
    engine_in,
    peer_segment,
)

from rawpunch.proto.codec import Endpoint
from rawpunch.proto.errors import LocalProtocolError
from rawpunch.proto.peerinfo import PeerInfo
from rawpunch.punch.engine import (
    TRANSITIONS,
    AckSent,
    Connected,
    Failed,
    IcmpKind,
    IcmpReceived,
    Negotiated,
    PeerAckReceived,
    PeerSynAckReceived,
    PeerSynReceived,
    Primed,
    PunchConfig,
    PunchEngine,
    PunchState,
    ResetReceived,
    SegmentKind,
    SynAckSent,
    SynSent,
    event_record,
    negotiate,
    options_from_peer_info,
    segment_kind,
)
from rawpunch.punch.natmodel import CtState
from rawpunch.punch.segment import SEQ_MOD, Flags, Segment, TcpOptions, seq_add

St, K = PunchState, SegmentKind
SYN, SA, ACK, RST = Flags.SYN, Flags.SYN | Flags.ACK, Flags.ACK, Flags.RST


def valid_segment(d: Driven, kind: SegmentKind) -> Segment:
    """A segment of ``kind`` with exactly the numbers the engine expects in its current state."""
    cfg = d.engine.config
    if kind is K.RST:
        in_syn_sent = d.engine.state in (St.PRIMED, St.SYN_SENT)
        return peer_segment(cfg, "nat-rst" if in_syn_sent else "rst")
    name = {K.SYN: "syn", K.SYN_ACK: "syn-ack", K.ACK: "ack", K.OTHER: "fin"}[kind]
    return peer_segment(cfg, name)


def shape(segments: list[Segment]) -> list[tuple[Flags, int]]:
    return [(s.flags, s.ttl) for s in segments]


# --- the transition table, cell by cell ---------------------------------------------------------------------

IGNORED = "ignored"
# (state, kind) -> (state afterwards, (flags, ttl) of what is sent, event types)
EXPECTED: dict[tuple[PunchState, SegmentKind], tuple[PunchState, list[tuple[Flags, int]], list[type]]] = {
    (St.PRIMED, K.SYN): (St.SYN_RECEIVED, [(SA, 64)], [PeerSynReceived, SynAckSent]),
    (St.PRIMED, K.SYN_ACK): (St.ESTABLISHED, [(ACK, 64)], [PeerSynAckReceived, AckSent, Connected]),
    (St.PRIMED, K.RST): (St.PRIMED, [(RST, 2), (SYN, 2)], [ResetReceived, Primed]),
    (St.SYN_SENT, K.SYN): (St.SYN_RECEIVED, [(SA, 64)], [PeerSynReceived, SynAckSent]),
    (St.SYN_SENT, K.SYN_ACK): (St.ESTABLISHED, [(ACK, 64)], [PeerSynAckReceived, AckSent, Connected]),
    (St.SYN_SENT, K.RST): (St.SYN_SENT, [(RST, 2), (SYN, 2)], [ResetReceived, Primed]),
    (St.SYN_RECEIVED, K.SYN): (St.SYN_RECEIVED, [(SA, 64)], [SynAckSent]),
    (St.SYN_RECEIVED, K.SYN_ACK): (St.ESTABLISHED, [(ACK, 64)], [PeerSynAckReceived, AckSent, Connected]),
    (St.SYN_RECEIVED, K.ACK): (St.ESTABLISHED, [], [PeerAckReceived, Connected]),
    (St.SYN_RECEIVED, K.RST): (St.SYN_SENT, [(RST, 2), (SYN, 2)], [ResetReceived, Primed]),
    (St.ESTABLISHED, K.SYN): (St.ESTABLISHED, [(ACK, 64)], [AckSent]),
    (St.ESTABLISHED, K.SYN_ACK): (St.ESTABLISHED, [(ACK, 64)], [AckSent]),
}
CELLS = [(state, kind) for state in PunchState for kind in SegmentKind]


def test_transition_table_is_total() -> None:
    assert set(TRANSITIONS) == set(CELLS)


@pytest.mark.parametrize(("state", "kind"), CELLS, ids=[f"{s.value}-{k.value}" for s, k in CELLS])
def test_transition_cell(state: PunchState, kind: SegmentKind) -> None:
    d = engine_in(state)
    before_events = len(d.events)
    ignored = sum(d.engine.ignored.values())
    sent = d.feed(valid_segment(d, kind), after=0.01)
    new_state, want_sent, want_events = EXPECTED.get((state, kind), (state, [], []))
    assert d.engine.state is new_state
    assert shape(sent) == want_sent
    assert [type(e) for e in d.events[before_events:]] == want_events
    if (state, kind) not in EXPECTED:
        assert sum(d.engine.ignored.values()) == ignored + 1, "a cell without effect counts the segment"


# --- segments whose numbers do not fit ----------------------------------------------------------------------

_cfg = config_a()
OTHER_HOST = Endpoint("203.0.113.66", B_PORT)
MISFITS = [
    (St.SYN_SENT, "syn", {"seq": B_ISN + 1}, "SYN with seq != peer ISN"),
    (St.SYN_SENT, "syn", {"seq": B_ISN - 1}, "the peer's priming SYN (ISN - 1)"),
    (St.SYN_SENT, "syn-ack", {"ack": A_ISN}, "SYN-ACK acking the priming SYN"),
    (St.SYN_SENT, "syn-ack", {"ack": A_ISN + 2}, "SYN-ACK with ack != ISN + 1"),
    (St.SYN_SENT, "syn-ack", {"seq": B_ISN + 7}, "SYN-ACK with the wrong seq"),
    (St.SYN_SENT, "ack", {}, "an ACK before we sent a SYN-ACK"),
    (St.SYN_SENT, "nat-rst", {"ack": A_ISN + 2}, "RST+ACK acking something else"),
    (St.SYN_SENT, "nat-rst", {"flags": Flags.RST}, "RST without ACK in SYN-SENT (RFC 9293 3.10.7.3)"),
    (St.SYN_SENT, "rst", {}, "RST with seq = peer ISN + 1 in SYN-SENT"),
    (St.SYN_SENT, "syn", {"src": replace(_cfg.peer, port=B_PORT + 1)}, "from another port of the peer"),
    (St.SYN_SENT, "syn", {"src": OTHER_HOST}, "from another host"),
    (St.SYN_SENT, "syn", {"dst": replace(_cfg.local, port=1)}, "to another local port"),
    (St.SYN_RECEIVED, "syn-ack", {"ack": seq_add(A_ISN, 1 + 2**31)}, "SYN-ACK with a far-off ack"),
    (St.SYN_RECEIVED, "ack", {"ack": A_ISN}, "ACK acking less than our SYN"),
    (St.SYN_RECEIVED, "ack", {"seq": B_ISN + 2}, "ACK with seq past RCV.NXT"),
    (St.SYN_RECEIVED, "ack", {"seq": B_ISN, "payload": b"x"}, "data at RCV.NXT - 1 (not a window probe)"),
    (St.SYN_RECEIVED, "rst", {"seq": B_ISN}, "RST one below RCV.NXT (RFC 5961 3.2: in window is not enough)"),
    (St.SYN_RECEIVED, "rst", {"seq": B_ISN + 2}, "RST one above RCV.NXT"),
    (St.SYN_RECEIVED, "nat-rst", {}, "a late RST for our SYN while SYN-RECEIVED"),
    (St.PRIMED, "syn-ack", {"ack": A_ISN}, "SYN-ACK for the priming SYN"),
    (St.PRIMED, "nat-rst", {"seq": 5, "ack": A_ISN + 9}, "RST acking nothing we sent"),
]


#: Misfits that passed our NAT before the peer's SYN did: they may have poisoned (or closed) our entry, so
#: they are ignored *and* the entry is reopened (RST and SYN at the priming TTL), nothing else changes.
REOPENING = {
    "SYN with seq != peer ISN",
    "SYN-ACK acking the priming SYN",
    "SYN-ACK with ack != ISN + 1",
    "SYN-ACK with the wrong seq",
    "RST+ACK acking something else",
    "RST without ACK in SYN-SENT (RFC 9293 3.10.7.3)",
    "RST with seq = peer ISN + 1 in SYN-SENT",
    "SYN-ACK for the priming SYN",
    "RST acking nothing we sent",
}
assert {m[3] for m in MISFITS} >= REOPENING


@pytest.mark.parametrize(("state", "kind", "changes", "why"), MISFITS, ids=[m[3] for m in MISFITS])
def test_misfitting_segment_is_ignored(
    state: PunchState, kind: str, changes: dict[str, Any], why: str
) -> None:
    d = engine_in(state)
    ignored, events, timer = sum(d.engine.ignored.values()), len(d.events), d.engine.get_timer()
    sent = d.feed(peer_segment(d.engine.config, kind, **changes), after=0.01)
    assert sum(d.engine.ignored.values()) == ignored + 1
    assert d.engine.state is state and d.engine.get_timer() == timer
    assert not d.of_type(Connected) and not d.of_type(ResetReceived)
    if why in REOPENING:
        assert [(s.flags, s.seq, s.ttl) for s in sent] == [(RST, A_ISN, 2), (SYN, A_ISN, 2)]
        assert [(type(e), e.reopened) for e in d.events[events:]] == [(Primed, True)]
        assert d.engine.poison_reopens == 1
    else:
        assert (sent, d.events[events:]) == ([], [])


def test_misfits_never_connect_however_many() -> None:
    d = engine_in(St.SYN_SENT)
    rng = random.Random(7)
    for _ in range(2000):
        kind = rng.choice(["syn", "syn-ack", "ack", "rst", "nat-rst"])
        wrong = {"seq": rng.getrandbits(32), "ack": rng.getrandbits(32)}
        seg = peer_segment(d.engine.config, kind, **wrong)
        if (seg.seq, seg.ack) in {(B_ISN, A_ISN + 1), (B_ISN, 0), (0, A_ISN + 1)}:
            continue
        d.feed(seg, after=0.001)
    assert d.engine.state is St.SYN_SENT and not d.of_type(Connected) and not d.of_type(ResetReceived)


def test_window_probe_of_a_spliced_peer_completes_the_handshake() -> None:
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "ack", seq=B_ISN), after=0.01)
    assert d.engine.state is St.ESTABLISHED


# --- a duplicate SYN-ACK after our ACK: crossed it, or our NAT refused it (poisoned entry) ------------------


def established_by_synack(**overrides: Any) -> Driven:
    """Real SYN at 100.05, the peer's SYN-ACK (and our ACK) at 100.15: round-trip bound 0.1 s."""
    d = engine_in(St.SYN_SENT, **overrides)
    d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.1)
    assert d.engine.state is St.ESTABLISHED
    return d


def test_duplicate_synack_within_two_round_trips_of_our_ack_is_just_acked() -> None:
    d = established_by_synack()
    for _ in range(3):  # crossed our ACK in flight, however many
        assert shape(d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.05)) == [(ACK, 64)]
    assert not d.of_type(Primed)[1:]


def test_late_duplicate_synack_reopens_our_entry_then_the_next_one_is_acked() -> None:
    d = established_by_synack()
    cfg = d.engine.config
    sent = d.feed(peer_segment(cfg, "syn-ack"), after=0.25)  # > 2 x 0.1 s after our ACK: it was refused
    assert [(s.flags, s.seq, s.ttl) for s in sent] == [(RST, A_ISN, 2), (SYN, A_ISN, 2)]  # no ACK: INVALID
    assert d.of_type(Primed)[-1].reopened and d.engine.state is St.ESTABLISHED
    assert d.engine.get_timer() == pytest.approx(d.now + cfg.initial_rto)  # the caller keeps listening
    assert len(d.of_type(Connected)) == 1
    # the peer's next SYN-ACK went through the fresh entry (SYN_SENT -> SYN_RECV): ACK it, with repeats
    assert shape(d.feed(peer_segment(cfg, "syn-ack"), after=0.5)) == [(ACK, 64)]
    acked = d.now
    assert d.engine.get_timer() == pytest.approx(acked + cfg.initial_rto)
    # crossing duplicates of that ACK are ACKed; a late one reopens again
    assert shape(d.feed(peer_segment(cfg, "syn-ack"), after=0.1)) == [(ACK, 64)]
    assert shape(d.feed(peer_segment(cfg, "syn-ack"), after=0.9)) == [(RST, 2), (SYN, 2)]
    assert len(d.of_type(Connected)) == 1 and d.engine.poison_reopens == 0


def test_late_duplicate_synack_with_wrong_numbers_changes_nothing() -> None:
    d = established_by_synack()
    ignored = sum(d.engine.ignored.values())
    for changes in ({"ack": A_ISN}, {"seq": B_ISN + 1}, {"ack": A_ISN + 2, "seq": B_ISN - 1}):
        assert d.feed(peer_segment(d.engine.config, "syn-ack", **changes), after=1.0) == []
    assert sum(d.engine.ignored.values()) == ignored + 3 and not d.of_type(Primed)[1:]


def test_late_duplicate_synack_without_priming_is_just_acked() -> None:
    d = established_by_synack(priming_ttl=None)
    assert shape(d.feed(peer_segment(d.engine.config, "syn-ack"), after=1.0)) == [(ACK, 64)]


# --- a duplicate SYN in SYN-RECEIVED: crossed our SYN-ACK, or our NAT refuses the SYN-ACK -----------------


def test_duplicate_syn_soon_after_our_synack_is_answered_again() -> None:
    d = engine_in(St.SYN_RECEIVED)  # SYN-ACK sent at 100.06; crossing time: initial_rto (0.25 s)
    assert shape(d.feed(peer_segment(d.engine.config, "syn"), after=0.2)) == [(SA, 64)]
    assert d.engine.state is St.SYN_RECEIVED and d.engine.poison_reopens == 0


def test_late_duplicate_syn_reopens_our_entry_and_goes_back_to_syn_sent() -> None:
    d = engine_in(St.SYN_RECEIVED)
    sent = d.feed(peer_segment(d.engine.config, "syn"), after=0.3)
    # the peer is still in SYN-SENT, so our SYN-ACK dies at our own NAT: a fresh entry, then our real SYN
    assert [(s.flags, s.seq, s.ttl) for s in sent] == [(RST, A_ISN, 2), (SYN, A_ISN, 2), (SYN, A_ISN, 64)]
    assert d.engine.state is St.SYN_SENT and d.engine.poison_reopens == 1
    # the peer answers our SYN with its SYN-ACK, which the fresh entry admits: we finish as the active opener
    assert shape(d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.05)) == [(ACK, 64)]
    assert d.engine.state is St.ESTABLISHED and len(d.of_type(Connected)) == 1


def test_after_going_back_to_syn_sent_a_bare_ack_never_connects() -> None:
    """An ESTABLISHED peer whose ACKs were lost answers our SYN with an ACK: it cannot complete our fresh
    entry (an original-direction ACK in SYN_SENT is INVALID), so the engine must not connect on it."""
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "syn"), after=0.3)
    assert d.feed(peer_segment(d.engine.config, "ack"), after=0.05) == []
    assert d.engine.state is St.SYN_SENT and not d.of_type(Connected)


def test_crossing_time_follows_the_rtt_estimate() -> None:
    d = engine_in(St.SYN_RECEIVED, rtt=0.4)  # crossing time 2 x 0.4 s
    assert shape(d.feed(peer_segment(d.engine.config, "syn"), after=0.7)) == [(SA, 64)]
    assert d.engine.state is St.SYN_RECEIVED
    assert shape(d.feed(peer_segment(d.engine.config, "syn"), after=0.2))[-1] == (SYN, 64)
    assert d.engine.state is St.SYN_SENT


def test_late_duplicate_syn_with_wrong_numbers_or_without_priming_changes_nothing() -> None:
    d = engine_in(St.SYN_RECEIVED)
    assert d.feed(peer_segment(d.engine.config, "syn", seq=B_ISN + 7), after=1.0) == []
    assert d.engine.state is St.SYN_RECEIVED and d.engine.poison_reopens == 0
    plain = engine_in(St.SYN_RECEIVED, priming_ttl=None)
    assert shape(plain.feed(peer_segment(plain.engine.config, "syn"), after=1.0)) == [(SA, 64)]


def test_misfit_rst_in_syn_received_then_silence_goes_back_to_syn_sent() -> None:
    """A forged RST that reached us passed our NAT, which closed our entry: nothing more gets through."""
    d = engine_in(St.SYN_RECEIVED)  # SYN-ACK at 100.06, retransmission due at 100.31
    assert d.feed(peer_segment(d.engine.config, "rst", seq=B_ISN + 999), after=0.01) == []
    assert d.engine.state is St.SYN_RECEIVED  # first the timer: an ESTABLISHED peer would ACK meanwhile
    sent = d.tick()
    assert shape(sent) == [(SA, 64)] and d.engine.state is St.SYN_RECEIVED  # 0.24 s < crossing time
    sent = d.tick()
    assert [(s.flags, s.seq, s.ttl) for s in sent] == [(RST, A_ISN, 2), (SYN, A_ISN, 2), (SYN, A_ISN, 64)]
    assert d.engine.state is St.SYN_SENT and d.engine.poison_reopens == 1


def test_misfit_rst_then_the_peers_ack_connects_as_usual() -> None:
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "rst", seq=B_ISN + 999), after=0.01)
    d.feed(peer_segment(d.engine.config, "ack"), after=0.01)
    assert d.engine.state is St.ESTABLISHED and d.engine.poison_reopens == 0


def test_misfit_rst_then_a_fitting_segment_from_the_peer_clears_the_suspicion() -> None:
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "rst", seq=B_ISN + 999), after=0.01)
    d.feed(peer_segment(d.engine.config, "syn"), after=0.01)  # crossed our SYN-ACK: answered
    for _ in range(3):
        assert shape(d.tick()) == [(SA, 64)]
    assert d.engine.state is St.SYN_RECEIVED and d.engine.poison_reopens == 0


# --- what goes out, and when --------------------------------------------------------------------------------


def test_start_sends_the_priming_syn_then_the_real_syn() -> None:
    d = engine_in(St.IDLE)
    d.engine.start(d.now)
    (priming,) = d.collect()
    assert (priming.seq, priming.ttl, priming.flags) == (A_ISN - 1, 2, SYN)
    assert (priming.src, priming.dst) == (d.engine.config.local, d.engine.config.peer)
    assert d.engine.get_timer() == pytest.approx(d.now + 0.05)
    (real,) = d.tick()
    assert (real.seq, real.ttl, real.flags, real.window) == (A_ISN, 64, SYN, 65535)
    assert real.options == TcpOptions(1460, 7, True, (5050, 0))  # TSval ticks in ms from start
    assert [type(e) for e in d.events] == [Primed, SynSent]


def test_no_syn_delay_sends_both_at_once() -> None:
    d = engine_in(St.IDLE, syn_delay=0.0)
    d.engine.start(d.now)
    assert shape(d.collect()) == [(SYN, 2), (SYN, 64)]


def test_without_priming_only_the_real_syn() -> None:
    d = engine_in(St.IDLE, priming_ttl=None)
    d.engine.start(d.now)
    assert shape(d.collect()) == [(SYN, 64)]
    assert d.engine.state is St.SYN_SENT


def test_syn_retransmission_backs_off_to_max_rto_then_fails_at_the_deadline() -> None:
    d = engine_in(St.IDLE)
    d.engine.start(100.0)
    d.collect()
    times = []
    while d.engine.state is not St.FAILED:
        times.append(d.engine.get_timer())
        d.tick()
    assert times == pytest.approx([100.05, 100.3, 100.8, 101.8, 103.8, 105.8, 107.8, 109.8, 110.0])
    assert [e.transmission for e in d.of_type(SynSent)] == list(range(1, 9))
    # each retransmission reopens our NAT's entry first: RST and SYN at the priming TTL, both seq = ISN
    assert shape(d.sent) == [(SYN, 2), (SYN, 64)] + [(RST, 2), (SYN, 2), (SYN, 64)] * 7
    assert {s.seq for s in d.sent[2:]} == {A_ISN}
    (failed,) = d.of_type(Failed)
    assert failed.elapsed == pytest.approx(10.0)
    assert failed.reason.startswith("no SYN from the peer within 10 s: its NAT may filter")
    assert d.engine.get_timer() is None


def test_synack_retransmission_restarts_from_the_initial_rto() -> None:
    d = engine_in(St.SYN_SENT)  # started at 100, real SYN at 100.05, next SYN due 100.3
    d.feed(peer_segment(d.engine.config, "syn"), after=0.1)  # t = 100.15
    times = []
    while d.engine.state is St.SYN_RECEIVED:
        times.append(d.engine.get_timer())
        d.tick()
    assert times == pytest.approx([100.4, 100.9, 101.9, 103.9, 105.9, 107.9, 109.9, 110.0])
    assert [e.transmission for e in d.of_type(SynAckSent)] == list(range(1, 9))
    assert "our SYN-ACK (sent 8 times) was not answered within 10 s" in d.of_type(Failed)[0].reason


def test_final_ack_is_repeated_then_the_timer_stops() -> None:
    d = engine_in(St.SYN_SENT)
    d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.1)
    start, times = d.now, []
    while (timer := d.engine.get_timer()) is not None:
        times.append(timer - start)
        assert shape(d.tick()) == [(ACK, 64)]
    assert times == pytest.approx([0.25, 0.75, 1.75])
    assert len(d.of_type(AckSent)) == 4 and len(d.of_type(Connected)) == 1


def test_established_by_an_ack_sends_nothing_more() -> None:
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "ack"), after=0.1)
    assert d.engine.get_timer() is None


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([], "no SYN from the peer within 10 s"),
        (["nat-rst"], "the peer's NAT answered our SYN with RST once and no SYN from the peer came through"),
        (
            ["nat-rst", "nat-rst"],
            "answered our SYN with RST twice",
        ),
        (["priming-rst"], "the priming SYN (TTL 2) reached the peer's NAT, which answered with RST"),
        (["syn", "rst"], "our SYN-ACK was answered with RST once"),
        (["syn"], "the peer's SYN came through, but our SYN-ACK (sent 8 times) was not answered"),
        (["unreachable"], "refused our SYN with ICMP unreachable"),
    ],
)
def test_deadline_reasons(script: list[str], reason: str) -> None:
    d = engine_in(St.SYN_SENT)
    cfg = d.engine.config
    for step in script:
        if step == "priming-rst":
            d.feed(peer_segment(cfg, "nat-rst", ack=A_ISN), after=0.01)
        elif step == "unreachable":
            quoted = Segment(cfg.local, cfg.peer, A_ISN, flags=SYN)
            d.engine.receive_icmp(IcmpKind.UNREACHABLE, "198.51.100.10", quoted, d.now)
        else:
            d.feed(peer_segment(cfg, step), after=0.01)
    while d.engine.state is not St.FAILED:
        d.tick()
    assert reason in d.of_type(Failed)[0].reason


def test_reset_for_our_syn_reopens_the_mapping_and_holds_the_syn() -> None:
    d = engine_in(St.SYN_SENT)  # real SYN at 100.05; RTO now 0.5 (backed off once)
    sent = d.feed(peer_segment(d.engine.config, "nat-rst"), after=0.02)
    rst, syn = sent
    assert (rst.flags, rst.seq, rst.ttl) == (RST, A_ISN, 2)
    assert (syn.flags, syn.seq, syn.ttl) == (SYN, A_ISN, 2)  # the ISN: the peer's SYN-ACK must fit
    assert d.engine.get_timer() == pytest.approx(d.now + 0.5)
    (reset,) = d.of_type(ResetReceived)
    assert (reset.origin, reset.count, reset.elapsed) == ("syn-answer", 1, pytest.approx(0.07))
    assert d.of_type(Primed)[-1].reopened


def test_reset_for_the_priming_syn_does_not_prime_again() -> None:
    d = engine_in(St.PRIMED)
    timer = d.engine.get_timer()
    assert d.feed(peer_segment(d.engine.config, "nat-rst", ack=A_ISN), after=0.01) == []
    assert d.engine.get_timer() == timer
    assert d.engine.resets["priming-answer"] == 1


def test_reset_without_priming_just_holds_the_syn() -> None:
    d = engine_in(St.SYN_SENT, priming_ttl=None)
    assert d.feed(peer_segment(d.engine.config, "nat-rst"), after=0.01) == []
    assert d.engine.state is St.SYN_SENT


def test_icmp_about_our_syns_is_reported_other_icmp_ignored() -> None:
    d = engine_in(St.SYN_SENT)
    cfg = d.engine.config
    priming = Segment(cfg.local, cfg.peer, A_ISN - 1, flags=SYN, ttl=1)
    d.engine.receive_icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", priming, d.now)
    d.engine.receive_icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", priming.with_(dst=OTHER_HOST), d.now)
    d.engine.receive_icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", priming.with_(seq=5), d.now)
    d.collect()
    (icmp,) = d.of_type(IcmpReceived)
    assert (icmp.kind, icmp.router, icmp.elapsed) == (
        IcmpKind.TIME_EXCEEDED,
        "198.51.100.2",
        pytest.approx(0.05),
    )
    assert d.engine.ignored["ICMP about another flow"] == 2


def test_icmp_kind_from_type() -> None:
    assert [IcmpKind.from_type(t) for t in (11, 3, 0, 5)] == [
        IcmpKind.TIME_EXCEEDED,
        IcmpKind.UNREACHABLE,
        None,
        None,
    ]


def test_start_twice_is_a_local_error() -> None:
    d = engine_in(St.SYN_SENT)
    with pytest.raises(LocalProtocolError, match="idle"):
        d.engine.start(d.now)


@pytest.mark.parametrize(
    "bad",
    [
        {"isn": SEQ_MOD},
        {"peer_isn": -1},
        {"priming_ttl": 64},
        {"priming_ttl": 0},
        {"ttl": 256},
        {"slot": 2},
        {"window": 70000},
        {"options": TcpOptions(wscale=15)},
        {"peer_options": TcpOptions(mss=0)},
        {"initial_rto": 3.0},
        {"backoff": 0.5},
        {"deadline": 0},
        {"syn_delay": -1},
        {"ack_repeats": -1},
        {"peer": config_a().local},
    ],
)
def test_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        config_a(**bad)


# --- negotiated options and the Connected event -------------------------------------------------------------

FULL = TcpOptions(1460, 7, True, (1, 0))


@pytest.mark.parametrize(
    ("own", "peer", "ipv6", "want"),
    [
        (FULL, TcpOptions(1400, 9, True, (2, 0)), False, Negotiated(1400, 9, 7, True, True)),
        (FULL, TcpOptions(1400, None, True, (2, 0)), False, Negotiated(1400, None, None, True, True)),
        (FULL, TcpOptions(1500, 0, False, None), False, Negotiated(1460, 0, 7, False, False)),
        (
            TcpOptions(1460, 14, True, None),
            TcpOptions(9000, 0, True, (2, 0)),
            False,
            Negotiated(1460, 0, 14, True, False),
        ),
        (FULL, TcpOptions(), False, Negotiated(536, None, None, False, False)),
        (TcpOptions(), TcpOptions(), True, Negotiated(1220, None, None, False, False)),
    ],
)
def test_negotiation(own: TcpOptions, peer: TcpOptions, ipv6: bool, want: Negotiated) -> None:
    assert negotiate(own, peer, ipv6) == want
    mirrored = negotiate(peer, own, ipv6)
    assert (mirrored.mss, mirrored.snd_wscale, mirrored.rcv_wscale) == (
        want.mss,
        want.rcv_wscale,
        want.snd_wscale,
    )
    assert (mirrored.sack, mirrored.timestamps) == (want.sack, want.timestamps)


def test_options_from_peer_info() -> None:
    info = PeerInfo(nonce=b"12345678", mss=1400, wscale=9, sack=True, timestamps=True)
    assert options_from_peer_info(info) == TcpOptions(1400, 9, True, (0, 0))
    assert options_from_peer_info(PeerInfo(nonce=b"12345678")) == TcpOptions()


def test_connected_after_the_peers_synack() -> None:
    d = engine_in(St.SYN_SENT)  # started at 100.0
    d.feed(peer_segment(d.engine.config, "syn-ack", window=30000), after=0.1)
    (ack,) = d.sent[-1:]
    assert (ack.seq, ack.ack, ack.window) == (A_ISN + 1, B_ISN + 1, 65535 >> 7)
    assert ack.options == TcpOptions(timestamp=(5150, 777))
    (c,) = d.of_type(Connected)
    assert c == Connected(
        local=d.engine.config.local,
        remote=d.engine.config.peer,
        snd_nxt=A_ISN + 1,
        rcv_nxt=B_ISN + 1,
        snd_wl1=B_ISN,
        snd_wnd=30000,  # a SYN's window is never scaled (RFC 7323 2.2)
        max_window=30000,
        rcv_wnd=65535,
        rcv_wup=B_ISN + 1,
        mss=1400,
        snd_wscale=9,
        rcv_wscale=7,
        sack=True,
        timestamps=(5150, 777),
        elapsed=c.elapsed,
    )
    assert c.elapsed == pytest.approx(0.15)


def test_connected_after_the_peers_ack_scales_its_window() -> None:
    d = engine_in(St.SYN_RECEIVED)
    d.feed(peer_segment(d.engine.config, "ack", window=512), after=0.05)
    (c,) = d.of_type(Connected)
    assert (c.snd_wnd, c.max_window, c.snd_wl1) == (512 << 9, 512 << 9, B_ISN + 1)


def test_connected_without_timestamps_or_window_scaling() -> None:
    d = engine_in(St.SYN_SENT, peer_options=TcpOptions(mss=1200))
    d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.1)
    (c,) = d.of_type(Connected)
    assert (c.mss, c.snd_wscale, c.rcv_wscale, c.sack, c.timestamps) == (1200, None, None, False, None)
    assert d.sent[-1].options == TcpOptions() and d.sent[-1].window == 65535


def test_sequence_numbers_wrap() -> None:
    top = SEQ_MOD - 1
    d = engine_in(St.IDLE, isn=top, peer_isn=top)
    d.engine.start(d.now)
    assert d.collect()[0].seq == top - 1
    d.tick()
    d.feed(peer_segment(d.engine.config, "syn-ack"), after=0.1)
    (c,) = d.of_type(Connected)
    assert (c.snd_nxt, c.rcv_nxt) == (0, 0)


def test_event_records_are_json() -> None:
    pump = Pump(profile_a="eim-apdf-rst", profile_b="eim-apdf-rst", skew=0.2).run()
    records = [event_record(e) for host in "ab" for _, e in pump.events[host]]
    text = "\n".join(json.dumps(r) for r in records)
    assert '"event": "Connected"' in text and '"origin": "syn-answer"' in text
    connected = next(r for r in records if r["event"] == "Connected")
    assert connected["local"] == "10.0.1.2:40000"


def test_segment_kinds() -> None:
    seg = peer_segment(config_a(), "syn")
    assert [
        segment_kind(seg.with_(flags=f)) for f in (SYN, SA, ACK | Flags.PSH, RST | ACK, Flags.FIN | ACK)
    ] == [
        K.SYN,
        K.SYN_ACK,
        K.ACK,
        K.RST,
        K.OTHER,
    ]


# --- pair and pump: two engines through the NAT model -------------------------------------------------------


def assert_agree(pump: Pump) -> tuple[Connected, Connected]:
    a, b = pump.connected("a"), pump.connected("b")
    assert a is not None and b is not None, f"a: {pump.failed('a')}\nb: {pump.failed('b')}\n{pump.explain()}"
    assert (a.snd_nxt, a.rcv_nxt, b.snd_nxt, b.rcv_nxt) == (A_ISN + 1, B_ISN + 1, B_ISN + 1, A_ISN + 1)
    assert (a.snd_nxt, a.rcv_nxt) == (b.rcv_nxt, b.snd_nxt)
    assert a.mss == b.mss == 1400
    assert (
        (a.snd_wscale, a.rcv_wscale) == (b.rcv_wscale, b.snd_wscale) == (B_OPTIONS.wscale, A_OPTIONS.wscale)
    )
    assert a.sack == b.sack is True
    for me, peer in ((a, b), (b, a)):
        assert me.snd_wnd <= peer.rcv_wnd < me.snd_wnd + (1 << (peer.rcv_wscale or 0))
        assert me.timestamps is not None and peer.timestamps is not None
    # each side's remote is the other's public mapping, as its own NAT made it
    assert pump.entry("nat-a") is not None and pump.entry("nat-b") is not None
    assert (pump.entry("nat-a").public, pump.entry("nat-b").public) == (b.remote, a.remote)  # type: ignore[union-attr]
    assert pump.entry("nat-a").state is pump.entry("nat-b").state is CtState.ESTABLISHED  # type: ignore[union-attr]
    return a, b


ONE_WAY = 5 * 0.005  # host to host over two_nats(2), 5 ms a link
GRID = [
    (profile, skew, hops)
    for profile in ("eim-apdf", "eim-apdf-rst")
    for skew in (0.0, 0.01, -0.01, ONE_WAY, -ONE_WAY)
    for hops in (1, 2, 3)
]


@pytest.mark.parametrize(("profile", "skew", "hops"), GRID)
def test_pair_connects(profile: str, skew: float, hops: int) -> None:
    pump = Pump(hops=hops, profile_a=profile, profile_b=profile, skew=skew).run()
    assert_agree(pump)


def test_mixed_profiles_and_uneven_links_connect() -> None:
    pump = Pump(
        profile_a="eim-apdf", profile_b="eim-apdf-rst", owd=[0.001, 0.02, 0.03, 0.01, 0.0005], skew=0.03
    )
    assert_agree(pump.run())


def test_priming_is_what_beats_rst_nats() -> None:
    """b starts 40 ms late, more than the one-way delay (25 ms): a's real SYN would meet b's NAT unopened."""
    primed = Pump(profile_a="eim-apdf-rst", profile_b="eim-apdf-rst", skew=0.04).run()
    assert_agree(primed)
    assert not [i for _, node, i in primed.answers if isinstance(i, Segment)]  # no NAT ever answered RST

    plain = Pump(
        profile_a="eim-apdf-rst",
        profile_b="eim-apdf-rst",
        skew=0.04,
        a={"priming_ttl": None},
        b={"priming_ttl": None},
    ).run()
    assert plain.connected("a") is None and plain.connected("b") is None
    for host in "ab":
        failed = plain.failed(host)
        assert failed is not None and "answered our SYN with RST" in failed.reason
    nat_resets = {node for _, node, i in plain.answers if isinstance(i, Segment) and i.rst}
    assert nat_resets == {"nat-a", "nat-b"}  # FACTS.md: each first SYN meets the other NAT unopened
    assert plain.entry("nat-a") is None and plain.entry("nat-b") is None  # and the RSTs killed both mappings


def test_late_peer_beyond_syn_delay_recovers_through_rst_and_reopen() -> None:
    pump = Pump(profile_a="eim-apdf-rst", profile_b="eim-apdf-rst", skew=0.2).run()
    assert_agree(pump)
    assert pump.engines["a"].resets["syn-answer"] >= 1
    assert any(p.reopened for p in pump.of_type("a", Primed))


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-apdf-rst"])
def test_twenty_percent_loss_is_beaten_by_retransmission(profile: str) -> None:
    """Every packet crossing the core (the r1 -- r2 link) is lost with probability 0.2."""
    retransmitted = lost = 0
    for seed in range(25):
        pump = Pump(profile_a=profile, profile_b=profile, loss=[0, 0, 0.2, 0, 0], seed=seed, skew=0.003).run()
        assert_agree(pump)
        sends = [e for host in "ab" for kind in (SynSent, SynAckSent) for e in pump.of_type(host, kind)]
        retransmitted += any(e.transmission > 1 for e in sends)
        lost += sum("lost on link" in line for line in pump.trace)
    assert lost >= 20 and retransmitted >= 3  # the loss did bite


def forged_burst(pump: Pump, rng: random.Random) -> list[Segment]:
    """Blind forgeries at b's public endpoint: from the attacker's own address and spoofed as a's public
    endpoint, with random numbers (the ISNs are sealed: a blind attacker cannot do better)."""
    a_public = pump.engines["b"].config.peer
    b_public = Endpoint(pump.nats["nat-b"].public_ip, B_PORT)
    me = Endpoint("203.0.113.66", 4444)
    r = rng.getrandbits
    return [
        Segment(me, b_public, r(32), r(32), SA),
        Segment(me, b_public, r(32), 0, RST),
        Segment(a_public, b_public, r(32), r(32), SA),
        Segment(a_public, b_public, r(32), 0, RST),
        Segment(a_public, b_public, r(32), r(32), RST | ACK),
        Segment(a_public, b_public, r(32), 0, SYN),
        Segment(a_public, b_public, r(32), r(32), ACK),
    ]


FORGED_WINDOW = 1234  # marks the attacker's segments


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-apdf-rst"])
@pytest.mark.parametrize("seed", range(4))
def test_forged_segments_neither_break_nor_connect(profile: str, seed: int) -> None:
    """Bursts of forgeries at b's public endpoint: one before anything, then right behind half the genuine
    packets arriving from the core (an attacker who sees the core's timing but not the numbers)."""
    rng = random.Random(seed)
    pump = Pump(profile_a=profile, profile_b=profile, skew=0.01 * (seed - 2), seed=seed)

    def burst(p: Pump) -> None:
        for seg in forged_burst(p, rng):
            p.inject("nat-b", +1, seg.with_(window=FORGED_WINDOW))

    def attack(p: Pump, node: str, item: object) -> None:
        if not isinstance(item, Segment) or item.window == FORGED_WINDOW:
            return
        if node == "nat-b" and item.dst.host == p.nats["nat-b"].public_ip and rng.random() < 0.5:
            burst(p)

    burst(pump)
    pump.taps.append(attack)
    assert_agree(pump.run())
    assert sum(pump.engines["b"].ignored.values()) > 0  # forgeries reached b and were refused there


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-apdf-rst"])
def test_spoofed_syn_poisoning_conntrack_is_healed_by_the_reopen(profile: str) -> None:
    """A spoofed SYN from a's public endpoint reaching nat-b before a's first segment makes conntrack take
    its (wrong) sequence number for a's side; a's genuine segments would then be "SEQ over the upper bound",
    INVALID. The forged SYN passes nat-b to b, which ignores it and reopens its entry at once: the poison is
    gone before a's SYN arrives, and no retransmission is needed."""
    pump = Pump(profile_a=profile, profile_b=profile)
    poisoned: list[Segment] = []

    def poison(p: Pump, node: str, item: object) -> None:
        if node == "nat-b" and isinstance(item, Segment) and item.src.host == LAN_B and not poisoned:
            a_public = p.engines["b"].config.peer
            forged = Segment(a_public, Endpoint(p.nats["nat-b"].public_ip, B_PORT), A_ISN + 2**31, flags=SYN)
            poisoned.append(forged)
            p.inject("nat-b", +1, forged)

    pump.taps.append(poison)
    a, b = assert_agree(pump.run())
    assert pump.engines["b"].poison_reopens == 1 and pump.engines["b"].ignored
    assert not any(
        line.split()[1] == "nat-b" and "SEQ is over the upper bound" in line for line in pump.trace
    )
    assert max(a.elapsed, b.elapsed) < pump.engines["a"].config.initial_rto  # no retransmission needed


@pytest.mark.parametrize("owd", [0.05, 0.1])
@pytest.mark.parametrize("skew", [0.0, 0.02, -0.02])
def test_slow_paths_never_reopen_after_connecting(owd: float, skew: float) -> None:
    """Round trips of 0.5 and 1 s, longer than the initial RTO: the peers' SYN-ACK retransmissions cross
    the final ACKs, and the duplicates must not make anyone reopen an entry that is already right."""
    pump = Pump(owd=owd, skew=skew).run()
    assert_agree(pump)
    for host in "ab":
        connected_at = next(t for t, e in pump.events[host] if isinstance(e, Connected))
        assert not [e for t, e in pump.events[host] if isinstance(e, Primed) and t > connected_at]
        assert pump.engines[host].poison_reopens == 0
    assert {getattr(pump.entry(nat), "state", None) for nat in ("nat-a", "nat-b")} == {CtState.ESTABLISHED}


def test_priming_icmp_reaches_the_host() -> None:
    pump = Pump(hops=2).run()
    (icmp_a,) = pump.of_type("a", IcmpReceived)
    assert (icmp_a.kind, icmp_a.router) == (IcmpKind.TIME_EXCEEDED, pump.router_ip["r1"])


def test_peer_that_never_starts() -> None:
    pump = Pump(profile_a="eim-apdf-rst", profile_b="eim-apdf-rst")
    pump.start_at["b"] = 1e9
    pump.run(until=20.0)
    failed = pump.failed("a")
    assert failed is not None and "answered our SYN with RST" in failed.reason


def test_engine_needs_nothing_but_its_config() -> None:
    cfg = PunchConfig(Endpoint("10.0.0.2", 1), Endpoint("192.0.2.1", 2), isn=1, peer_isn=2)
    engine = PunchEngine(cfg)
    assert engine.get_timer() is None and engine.next_event() is None and engine.segments_to_send(0.0) == []
