"""NAT profiles as data: the registry, the ground truth ``rawpunch lab list --json`` prints, the rules each
profile renders (netfilter or the userspace NAT's steering), double-NAT composition, and the self-test's
classifiers. No root."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace

import pytest

from rawpunch.lab import cli as lab_cli
from rawpunch.lab.profiles import (
    ALLOCATION_VALUES,
    COMMENT_TAG,
    FILTERING_VALUES,
    GROUND_TRUTH_KEYS,
    MAPPING_VALUES,
    NONPRESERVING_PORTS,
    PROFILES,
    UNSOLICITED_SYN_VALUES,
    USERNAT_MARK,
    USERNAT_QUEUE,
    NatProfile,
    compose,
    compose_chain,
    get_profile,
)
from rawpunch.lab.selftest import (
    classify_allocation,
    classify_filtering,
    classify_hairpin,
    classify_mapping,
    classify_unsolicited,
)
from rawpunch.punch.natmodel import Nat

EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
RENDERED = [name for name, p in PROFILES.items() if p.backend != "layers"]


def rules_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A ")]


def chain(text: str, table: str, name: str) -> list[str]:
    """The ``-A name`` rules of *table* in iptables-restore text."""
    block = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return [r for r in rules_of(block) if r.startswith(f"-A {name} ")]


# --- the registry -------------------------------------------------------------------------------------------


def test_the_issue_asks_for_these_profiles() -> None:
    assert len(PROFILES) >= 10
    by = {name: p for name, p in PROFILES.items()}
    assert not by["open"].nat and by["open"].filtering == EIM
    assert not by["firewall"].nat and by["firewall"].filtering == APDM
    assert (by["eim-eif"].mapping, by["eim-eif"].filtering) == (EIM, EIM)
    assert (by["eim-adf"].mapping, by["eim-adf"].filtering) == (EIM, ADM)
    reactions = {by[n].unsolicited_syn for n in ("eim-apdf", "eim-apdf-rst", "eim-apdf-icmp")}
    assert reactions == {"drop", "rst", "icmp"}
    assert (by["apdm-random"].mapping, by["apdm-random"].allocation) == (APDM, "random")
    assert (by["apdm-sequential"].mapping, by["apdm-sequential"].allocation) == (APDM, "sequential")
    assert {p.allocation for p in by.values() if p.mapping == EIM and p.nat} >= {"port-preserving", "random"}
    assert by["double-nat"].layers == ("eim-apdf", "eim-apdf-random")
    assert {p.hairpin for p in by.values()} == {True, False}
    assert any(p.mapping == ADM for p in by.values())


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_ground_truth_is_plain_data_with_valid_values(name: str) -> None:
    truth = PROFILES[name].ground_truth()
    assert json.loads(json.dumps(truth)) == truth
    assert truth["name"] == name
    assert truth["mapping"] in MAPPING_VALUES and truth["filtering"] in FILTERING_VALUES
    assert truth["allocation"] in ALLOCATION_VALUES and truth["unsolicited_syn"] in UNSOLICITED_SYN_VALUES
    assert all(isinstance(truth[k], bool) for k in ("hairpin", "nat", "port_overloading"))


def test_backends_are_where_netfilter_can_and_cannot() -> None:
    userspace = {name for name, p in PROFILES.items() if p.backend == "userspace"}
    # What netfilter cannot express: sequential allocation, ADM, EIF/ADF filtering.
    for name, p in PROFILES.items():
        needs_userspace = p.nat and (p.allocation == "sequential" or p.mapping == ADM or p.filtering != APDM)
        assert (name in userspace) == (needs_userspace and not p.layers), name
    assert not any(PROFILES[n].port_overloading for n in userspace)


def test_get_profile_names_the_known_ones() -> None:
    assert get_profile("eim-eif") is PROFILES["eim-eif"]
    with pytest.raises(ValueError, match=r"unknown NAT profile 'cone'.*eim-apdf"):
        get_profile("cone")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mapping": "full-cone"}, "mapping"),
        ({"unsolicited_syn": "reset"}, "unsolicited_syn"),
        ({"backend": "ebpf"}, "backend"),
        ({"nat": False, "allocation": "sequential"}, "without NAT"),
        ({"nat": False, "hairpin": True}, "hairpinning needs a NAT"),
        ({"unsolicited_syn": "forward"}, "forward"),
        ({"layers": ("a", "b")}, "layers"),
    ],
)
def test_inconsistent_ground_truth_is_refused(changes: dict[str, object], message: str) -> None:
    base = PROFILES["eim-apdf"]
    with pytest.raises(ValueError, match=message):
        replace(base, **changes)  # type: ignore[arg-type]


def test_port_overloading_only_with_port_preservation() -> None:
    assert PROFILES["eim-apdf"].port_overloading
    assert not replace(PROFILES["eim-apdf"], allocation="sequential").port_overloading
    assert not PROFILES["eim-eif"].port_overloading


# --- what rawpunch lab list prints --------------------------------------------------------------------------


def lab_args(command: str, **kwargs: object) -> argparse.Namespace:
    return argparse.Namespace(lab_command=command, **kwargs)


def test_lab_list_json_prints_every_profile_with_its_ground_truth(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_cli.run_lab(lab_args("list", json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) >= 10
    assert [d["name"] for d in data] == list(PROFILES)
    for entry in data:
        assert set(GROUND_TRUTH_KEYS) <= set(entry)
        assert entry == PROFILES[entry["name"]].ground_truth()


def test_lab_list_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_cli.run_lab(lab_args("list", json=False)) == 0
    out = capsys.readouterr().out
    for name, profile in PROFILES.items():
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert profile.unsolicited_syn in line and profile.backend in line


def test_lab_selftest_refuses_unknown_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert lab_cli.run_lab(lab_args("selftest", profiles=["cone"], json=False, record=None)) == 2
    assert "unknown profiles ['cone']" in capsys.readouterr().err


def test_lab_selftest_arguments() -> None:
    parser = argparse.ArgumentParser(prog="rawpunch")
    lab_cli.add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", "selftest", "eim-eif", "open", "--json", "--record", "/tmp/x"])
    assert (args.profiles, args.json, args.record) == (["eim-eif", "open"], True, "/tmp/x")


# --- rendering ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERED)
def test_every_rule_is_tagged_and_every_queue_bypassable(name: str) -> None:
    text = PROFILES[name].iptables_restore(lan="lan", wan="wan")
    for rule in rules_of(text):
        assert f'-m comment --comment "{COMMENT_TAG} {name}: ' in rule
        if "NFQUEUE" in rule:
            assert rule.endswith("--queue-bypass")


@pytest.mark.parametrize(
    "name", [n for n in RENDERED if PROFILES[n].backend == "netfilter" and PROFILES[n].nat]
)
def test_netfilter_nat_rules(name: str) -> None:
    profile = PROFILES[name]
    text = profile.iptables_restore()
    forward = chain(text, "filter", "FORWARD")
    # INVALID must be dropped before anything is accepted: it is never NATed and would leak a private source.
    assert "--ctstate INVALID " in forward[0] and forward[0].endswith("-j DROP")
    assert ":FORWARD DROP" in text
    masquerade = chain(text, "nat", "POSTROUTING")
    expected = {
        (EIM, "port-preserving"): "-j MASQUERADE",
        (EIM, "random"): f"-j MASQUERADE --to-ports {NONPRESERVING_PORTS[0]}-{NONPRESERVING_PORTS[1]}",
        (APDM, "random"): "-j MASQUERADE --random-fully",
    }[(profile.mapping, profile.allocation)]
    assert masquerade[0].startswith("-A POSTROUTING -o wan") and masquerade[0].endswith(expected)
    input_rules = chain(text, "filter", "INPUT")
    reaction = {
        "drop": ["-j DROP"],
        "rst": [],
        "icmp": ["-j REJECT --reject-with icmp-port-unreachable", "-j DROP"],
    }[profile.unsolicited_syn]
    assert len(input_rules) == len(reaction)
    for rule, target in zip(input_rules, reaction, strict=True):
        assert rule.startswith("-A INPUT -i wan") and rule.endswith(target)


def test_icmp_profile_never_answers_a_rst() -> None:
    reject = chain(PROFILES["eim-apdf-icmp"].iptables_restore(), "filter", "INPUT")[0]
    assert "! --tcp-flags RST RST" in reject


def test_routers_without_nat() -> None:
    assert rules_of(PROFILES["open"].iptables_restore()) == []
    firewall = PROFILES["firewall"].iptables_restore()
    assert "MASQUERADE" not in firewall and ":FORWARD DROP" in firewall
    assert "--ctstate INVALID" in chain(firewall, "filter", "FORWARD")[0]


@pytest.mark.parametrize("name", [n for n, p in PROFILES.items() if p.backend == "userspace"])
def test_userspace_steering(name: str) -> None:
    text = PROFILES[name].iptables_restore()
    prerouting = chain(text, "raw", "PREROUTING")
    # conntrack must never see TCP (notrack first), then everything TCP goes to the queue.
    assert prerouting[0].startswith("-A PREROUTING -p tcp") and prerouting[0].endswith("-j CT --notrack")
    assert f"-j NFQUEUE --queue-num {USERNAT_QUEUE} --queue-bypass" in prerouting[1]
    assert any("icmp-type destination-unreachable" in r for r in prerouting)
    forward = chain(text, "filter", "FORWARD")
    # Translated packets carry the mark; untranslated TCP (the program died: queue bypassed) never leaves.
    assert f"--mark {USERNAT_MARK:#x}" in forward[0] and forward[0].endswith("-j ACCEPT")
    assert forward[1].startswith("-A FORWARD -p tcp") and forward[1].endswith("-j DROP")
    assert chain(text, "nat", "POSTROUTING")[0].startswith("-A POSTROUTING -o wan ! -p tcp")


def test_undo_empties_every_table_it_may_have_used() -> None:
    undo = PROFILES["eim-eif"].iptables_undo()
    assert "-A " not in undo and ":FORWARD ACCEPT" in undo
    assert {line[1:] for line in undo.splitlines() if line.startswith("*")} == {"raw", "nat", "filter"}


def test_what_netfilter_cannot_render_is_refused() -> None:
    sequential = replace(PROFILES["apdm-sequential"], backend="netfilter")
    with pytest.raises(NotImplementedError, match="no netfilter rendering"):
        sequential.iptables_restore()
    eif = replace(PROFILES["eim-eif"], backend="netfilter")
    with pytest.raises(NotImplementedError, match="APDF"):
        eif.iptables_restore()
    with pytest.raises(NotImplementedError, match="double NAT"):
        PROFILES["double-nat"].iptables_restore()


def test_comments_cannot_break_out_of_quotes() -> None:
    with pytest.raises(ValueError, match="double quote"):
        replace(PROFILES["eim-apdf"], name='x" -j ACCEPT').iptables_restore()


# --- one model for the userspace NAT and the unit tests -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_model_takes_every_single_nat_profile(name: str) -> None:
    profile = PROFILES[name]
    if not profile.nat or profile.layers:
        with pytest.raises(NotImplementedError, match="not one NAT box"):
            Nat("198.51.100.1", "10.0.1.1", profile)
    else:
        assert Nat("198.51.100.1", "10.0.1.1", profile).profile is profile


# --- double NAT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "outer", "want"),
    [
        ("eim-apdf", "eim-apdf", (EIM, APDM, "port-preserving", "drop", False)),
        ("eim-apdf", "eim-apdf-random", (EIM, APDM, "random", "drop", False)),
        ("eim-apdf-random", "eim-apdf", (EIM, APDM, "random", "drop", False)),  # the outer keeps its choice
        ("eim-eif", "apdm-sequential", (APDM, APDM, "sequential", "rst", False)),
        ("adm-adf-sequential", "eim-eif", (ADM, ADM, "sequential", "drop", False)),
        (
            "eim-adf",
            "eim-eif",
            (EIM, ADM, "port-preserving", "drop", False),
        ),  # inner filter stops the hairpin
        ("eim-eif", "eim-eif", (EIM, EIM, "port-preserving", "drop", True)),
        ("eim-apdf-rst", "eim-apdf-icmp", (EIM, APDM, "port-preserving", "icmp", False)),
    ],
)
def test_composition(inner: str, outer: str, want: tuple[str, str, str, str, bool]) -> None:
    both = compose(PROFILES[inner], PROFILES[outer], "x", "x")
    assert (both.mapping, both.filtering, both.allocation, both.unsolicited_syn, both.hairpin) == want
    assert both.layers == (inner, outer) and both.backend == "layers"


def test_double_nat_profile_is_its_composition() -> None:
    double = PROFILES["double-nat"]
    derived = compose_chain([PROFILES[n] for n in double.layers])
    for key in GROUND_TRUTH_KEYS:
        assert getattr(double, key) == getattr(derived, key), key
    with pytest.raises(ValueError, match="translate"):
        compose(PROFILES["firewall"], PROFILES["eim-apdf"], "x", "x")


# --- the self-test's classifiers (natlab-style tables) ------------------------------------------------------

P1, P1B, P2 = "198.51.100.1:41000", "198.51.100.1:41001", "198.51.100.1:41002"


@pytest.mark.parametrize(
    ("seen", "want"),
    [
        ((P1, P1, P1), EIM),
        ((P1, P1, P2), ADM),
        ((P1, P1B, P2), APDM),
        ((P1, P2, P1), "inconsistent"),
    ],
)
def test_classify_mapping(seen: tuple[str, str, str], want: str) -> None:
    assert classify_mapping(*seen) == want


@pytest.mark.parametrize(
    ("public", "want"),
    [
        ([42001, 42002, 42003, 42004], "port-preserving"),
        ([1027, 1028, 1029, 1030], "sequential"),
        ([61656, 62582, 65020, 61980], "random"),
        ([1027, 1029, 1030, 1031], "random"),
    ],
)
def test_classify_allocation(public: list[int], want: str) -> None:
    assert classify_allocation([42001, 42002, 42003, 42004], public) == want


@pytest.mark.parametrize(
    ("same", "other", "want"),
    [(True, True, EIM), (True, False, ADM), (False, False, APDM), (False, True, "inconsistent")],
)
def test_classify_filtering(same: bool, other: bool, want: str) -> None:
    assert classify_filtering(same, other) == want


TCP_RST = {"kind": "tcp", "src": ["198.51.100.1", 1023], "dst": ["198.51.100.130", 7200], "flags": "AR"}
ICMP_UNREACH = {"kind": "icmp", "src": ["198.51.100.1", 0], "type": 3, "code": 3, "port": 7200}


@pytest.mark.parametrize(
    ("reached", "reactions", "want"),
    [
        (True, [TCP_RST], "forward"),  # no NAT: the host itself answered
        (False, [TCP_RST], "rst"),
        (False, [ICMP_UNREACH], "icmp"),
        (False, [], "drop"),
        (False, [{**TCP_RST, "flags": "SA"}], "unexpected"),
    ],
)
def test_classify_unsolicited(reached: bool, reactions: list[dict[str, object]], want: str) -> None:
    assert classify_unsolicited(reached, reactions) == want


@pytest.mark.parametrize(
    ("sources", "want"),
    [
        ([("198.51.100.1", 44000)], True),
        ([("10.0.1.2", 44000)], "internal-source"),
        ([], False),
    ],
)
def test_classify_hairpin(sources: list[tuple[str, int]], want: bool | str) -> None:
    assert classify_hairpin(sources, "198.51.100.1", "10.0.1.2") == want


def test_profile_names_are_boring() -> None:
    assert all(re.fullmatch(r"[a-z][a-z0-9-]+", name) for name in PROFILES)


def test_nat_profile_defaults_describe_linux() -> None:
    linux = NatProfile("x", "x", EIM, APDM, "port-preserving", "drop")  # type: ignore[arg-type]
    assert (linux.backend, linux.nat, linux.hairpin, linux.port_overloading) == (
        "netfilter",
        True,
        False,
        True,
    )
