"""The firewall guard's rule text, without root: comments, --queue-bypass, chain names, rendering, removal.

The u32 expression is checked by evaluating it (a small interpreter for the subset the guard uses) against
real ICMP errors built with scapy, with and without IP options, so the offsets are right before any kernel
sees them; the lab tests then check the kernel agrees.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, IPerror, TCPerror

from rawpunch.proto.codec import Endpoint
from rawpunch.punch import firewall as fw
from rawpunch.punch.firewall import PunchFlow

RUN = "abc123"
FLOW = PunchFlow(40000, Endpoint("198.51.100.9", 40001), 21072)
FLOW_LOCAL = PunchFlow(40000, Endpoint("198.51.100.9", 40001), 21072, local_host="10.0.1.2")

flows = st.builds(
    PunchFlow,
    local_port=st.integers(1, 65535),
    peer=st.one_of(
        st.none(),  # the early guard
        st.builds(Endpoint, host=st.ip_addresses(v=4).map(str), port=st.integers(1, 65535)),
    ),
    queue_num=st.integers(0, 65535),
    local_host=st.one_of(st.none(), st.ip_addresses(v=4).map(str)),
)
run_ids = st.from_regex(r"[0-9a-z]{1,12}", fullmatch=True)


def appended(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("-A ", "-I "))]


# --- every rule: comment, bypass, chain names ---------------------------------------------------------------


@given(run_ids, flows)
def test_every_rule_has_the_run_comment_and_every_queue_bypasses(run_id: str, flow: PunchFlow) -> None:
    for text in (fw.render_apply(run_id, flow), fw.render_stop_capture(run_id, flow)):
        rules = appended(text)
        assert rules
        for rule in rules:
            assert re.search(rf'-m comment --comment "rawpunch {run_id} [^"]+"', rule), rule
            if "NFQUEUE" in rule:
                assert rule.endswith(f"-j NFQUEUE --queue-num {flow.queue_num} --queue-bypass"), rule


@given(run_ids)
def test_chain_names_are_valid_iptables_names(run_id: str) -> None:
    for name in fw.chain_names(run_id):
        assert len(name) <= fw.MAX_CHAIN_LEN
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name)
        assert name.startswith(f"RAWPUNCH-{run_id}-")


def test_longest_chain_name_fits() -> None:
    assert max(len(n) for n in fw.chain_names("z" * 12)) == len("RAWPUNCH-zzzzzzzzzzzz-OUT") <= 28


@pytest.mark.parametrize("bad", ["", "ABC", "a b", "a-b", "x" * 13, 'a"b', "../x"])
def test_bad_run_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        fw.chain_names(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_port": 0}, "local port 0"),
        ({"local_port": 65536}, "local port 65536"),
        ({"peer": Endpoint("198.51.100.9", 0)}, "peer port 0"),
        ({"queue_num": 65536}, "NFQUEUE number"),
        ({"peer": Endpoint("2001:db8::1", 1)}, "IPv4 only"),
        ({"local_host": "2001:db8::2"}, "IPv4 only"),
    ],
)
def test_flow_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"local_port": 40000, "peer": Endpoint("198.51.100.9", 40001), "queue_num": 1}
    with pytest.raises(ValueError, match=message):
        PunchFlow(**{**args, **kwargs})  # type: ignore[arg-type]


# --- what each rule says -----------------------------------------------------------------------------------


def test_apply_creates_chains_fills_them_and_hooks_them_at_the_top() -> None:
    lines = fw.render_apply(RUN, FLOW).splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert lines[1:3] == [":RAWPUNCH-abc123-IN - [0:0]", ":RAWPUNCH-abc123-OUT - [0:0]"]
    hooks = [line for line in lines if line.startswith("-I ")]
    assert hooks == [
        '-I INPUT 1 -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-IN',
        '-I OUTPUT 1 -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-OUT',
    ]
    # Only our chains are written to: the builtins get nothing but the two jumps.
    assert {line.split()[1] for line in lines if line.startswith("-A ")} == {
        "RAWPUNCH-abc123-IN",
        "RAWPUNCH-abc123-OUT",
    }


def test_capture_rule_matches_the_peer_to_our_port() -> None:
    assert fw.capture_rule(RUN, FLOW) == (
        "-A RAWPUNCH-abc123-IN -s 198.51.100.9/32 -p tcp -m tcp --sport 40001 --dport 40000 "
        '-m comment --comment "rawpunch abc123 capture punch segments" '
        "-j NFQUEUE --queue-num 21072 --queue-bypass"
    )
    assert " -d 10.0.1.2/32 " in fw.capture_rule(RUN, FLOW_LOCAL)


def test_rst_rule_drops_only_our_resets_to_the_peer() -> None:
    assert fw.rst_rule(RUN, FLOW) == (
        "-A RAWPUNCH-abc123-OUT -d 198.51.100.9/32 -p tcp -m tcp --sport 40000 --dport 40001 "
        "--tcp-flags RST RST "
        '-m comment --comment "rawpunch abc123 no RST to the peer before both ends are spliced" -j DROP'
    )
    assert "-A RAWPUNCH-abc123-OUT -s 10.0.1.2/32 -d 198.51.100.9/32 " in fw.rst_rule(RUN, FLOW_LOCAL)


EARLY = PunchFlow(40000, None, 21072)


def test_early_guard_is_scoped_to_the_local_port() -> None:
    """Before the peer is known: any remote endpoint; the queue's reader claims the 4-tuple later."""
    assert fw.capture_rule(RUN, EARLY) == (
        "-A RAWPUNCH-abc123-IN -p tcp -m tcp --dport 40000 "
        '-m comment --comment "rawpunch abc123 capture punch segments" '
        "-j NFQUEUE --queue-num 21072 --queue-bypass"
    )
    assert fw.rst_rule(RUN, PunchFlow(40000, None, 1, crafted_rst_ttl=3)) == (
        "-A RAWPUNCH-abc123-OUT -p tcp -m tcp --sport 40000 --tcp-flags RST RST -m ttl --ttl-gt 3 "
        '-m comment --comment "rawpunch abc123 no RST to the peer before both ends are spliced" -j DROP'
    )
    expr = fw.icmp_u32(EARLY)
    assert u32_matches(expr, icmp_error(11, 40000, 40001, "198.51.100.9"))
    assert u32_matches(expr, icmp_error(3, 40000, 9, "203.0.113.7"))  # any remote endpoint
    assert not u32_matches(expr, icmp_error(11, 40002, 40001, "198.51.100.9"))  # another local port
    with pytest.raises(ValueError, match="needs the peer"):
        PunchFlow(40000, None, 1, kernel_sockets=True)


def test_icmp_rules_queue_both_errors_then_drop_time_exceeded() -> None:
    rules = [r for r in appended(fw.render_apply(RUN, FLOW)) if "-p icmp" in r]
    assert [re.search(r"--icmp-type (\d+)", r).group(1) for r in rules] == ["11", "3", "11"]  # type: ignore[union-attr]
    assert [r.rsplit(" -j ", 1)[1].split()[0] for r in rules] == ["NFQUEUE", "NFQUEUE", "DROP"]
    assert all(f"--u32 {fw.icmp_u32(FLOW)} " in r for r in rules)


def test_u32_renders_address_and_ports_in_hex() -> None:
    assert fw.icmp_u32(FLOW) == (
        "0>>22&0x3C@16>>16&0xFF=0x6"
        "&&0>>22&0x3C@24=0xC6336409"  # 198.51.100.9
        "&&0>>22&0x3C@8>>22&0x3C@8=0x9C409C41"  # 40000 << 16 | 40001
    )
    assert fw.icmp_u32(FLOW_LOCAL).endswith("&&0>>22&0x3C@20=0x0A000102")  # 10.0.1.2


def test_stop_capture_keeps_only_the_time_exceeded_drop() -> None:
    text = fw.render_stop_capture(RUN, FLOW)
    assert ":RAWPUNCH-abc123-IN - [0:0]" in text  # declaring it under --noflush flushes it
    assert appended(text) == [fw.icmp_drop_rule(RUN, FLOW)]
    assert "OUT" not in text


def test_comment_refuses_quotes() -> None:
    with pytest.raises(ValueError, match="double quote"):
        fw._comment(RUN, 'say "hi"')


# --- u32 semantics, evaluated ------------------------------------------------------------------------------


def u32_matches(expression: str, packet: bytes) -> bool:
    """Evaluate the subset of xt_u32 the guard uses: ``loc[>>n|&m|@]... = value`` joined by ``&&``."""
    return all(_u32_test(test, packet) for test in expression.split("&&"))


def _u32_test(test: str, packet: bytes) -> bool:
    """``N`` reads the word at base+N; ``&M``, ``>>S`` transform it; ``@N`` adds it to base, reads at N."""
    location, value = test.split("=")
    tokens = re.findall(r"@|>>|&|0x[0-9A-Fa-f]+|\d+", location)
    base = 0

    def read(offset: int) -> int | None:
        if base + offset + 4 > len(packet):
            return None  # xt_u32: reading past the end is no match
        word: int = struct.unpack_from("!I", packet, base + offset)[0]
        return word

    word = read(int(tokens[0], 0))
    for op, number in zip(tokens[1::2], (int(t, 0) for t in tokens[2::2]), strict=True):
        if word is None:
            return False
        if op == "@":
            base += word
            word = read(number)
        elif op == ">>":
            word >>= number
        else:
            word &= number
    return word == int(value, 0)


def icmp_error(icmp_type: int, sport: int, dport: int, inner_dst: str, ip_options: bool = False) -> bytes:
    inner = IPerror(src="10.0.1.2", dst=inner_dst, ttl=1) / TCPerror(
        sport=sport, dport=dport, seq=7, flags="S"
    )
    outer = IP(src="198.51.100.2", dst="10.0.1.2", options=[b"\x01\x01\x01\x00"] if ip_options else [])
    return bytes(outer / ICMP(type=icmp_type, code=0) / inner)


@pytest.mark.parametrize("ip_options", [False, True])
def test_u32_matches_icmp_errors_about_the_punch_only(ip_options: bool) -> None:
    expr = fw.icmp_u32(FLOW_LOCAL)
    assert u32_matches(expr, icmp_error(11, 40000, 40001, "198.51.100.9", ip_options))
    assert u32_matches(expr, icmp_error(3, 40000, 40001, "198.51.100.9", ip_options))
    assert not u32_matches(expr, icmp_error(11, 40002, 40001, "198.51.100.9", ip_options))  # other local port
    assert not u32_matches(expr, icmp_error(11, 40000, 40009, "198.51.100.9", ip_options))  # other peer port
    assert not u32_matches(expr, icmp_error(11, 40000, 40001, "198.51.100.10", ip_options))  # other peer
    udp_like = bytes(
        IP(src="198.51.100.2", dst="10.0.1.2") / ICMP(type=11) / IPerror(dst="198.51.100.9", proto=17)
    )
    assert not u32_matches(expr, udp_like + struct.pack("!HH", 40000, 40001) + bytes(4))


# --- removal computed from iptables-save -------------------------------------------------------------------

SAVED = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j RAWPUNCH-abc123-IN
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RAWPUNCH-abc123-IN - [0:0]
:RAWPUNCH-abc123-OUT - [0:0]
:RAWPUNCH-ffff-IN - [0:0]
:ufw-before-input - [0:0]
-A INPUT -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-IN
-A INPUT -j RAWPUNCH-ffff-IN
-A INPUT -j ufw-before-input
-A OUTPUT -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-OUT
-A RAWPUNCH-abc123-IN -s 198.51.100.9/32 -p tcp -m tcp --dport 40000 -j NFQUEUE --queue-num 1 --queue-bypass
-A RAWPUNCH-abc123-OUT -j RAWPUNCH-abc123-IN
-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


def test_runs_in_save_finds_only_rawpunch_chains_of_the_filter_table() -> None:
    assert fw.runs_in_save(SAVED) == {
        "abc123": ["RAWPUNCH-abc123-IN", "RAWPUNCH-abc123-OUT"],
        "ffff": ["RAWPUNCH-ffff-IN"],
    }
    assert fw.runs_in_save("") == {}


def test_removal_deletes_exact_jumps_then_flushes_and_deletes_the_chains() -> None:
    assert fw.render_removal("abc123", SAVED) == (
        "*filter\n"
        '-D INPUT -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-IN\n'
        '-D OUTPUT -m comment --comment "rawpunch abc123 hook" -j RAWPUNCH-abc123-OUT\n'
        "-F RAWPUNCH-abc123-IN\n-F RAWPUNCH-abc123-OUT\n"
        "-X RAWPUNCH-abc123-IN\n-X RAWPUNCH-abc123-OUT\n"
        "COMMIT\n"
    )


def test_removal_leaves_other_runs_and_foreign_rules_alone() -> None:
    text = fw.render_removal("ffff", SAVED)
    assert text == "*filter\n-D INPUT -j RAWPUNCH-ffff-IN\n-F RAWPUNCH-ffff-IN\n-X RAWPUNCH-ffff-IN\nCOMMIT\n"
    assert fw.render_removal("beef", SAVED) is None


def test_removal_of_a_half_applied_run() -> None:
    # A jump whose chain listing was lost, or chains without jumps: whatever is there goes.
    only_chain = "*filter\n:INPUT ACCEPT [0:0]\n:RAWPUNCH-abc123-OUT - [0:0]\nCOMMIT\n"
    assert fw.render_removal("abc123", only_chain) == (
        "*filter\n-F RAWPUNCH-abc123-OUT\n-X RAWPUNCH-abc123-OUT\nCOMMIT\n"
    )


@given(run_ids, flows)
def test_removal_undoes_apply(run_id: str, flow: PunchFlow) -> None:
    # Simulate iptables-save after apply: the jumps appear as -A at the top of INPUT/OUTPUT.
    applied = (
        fw.render_apply(run_id, flow)
        .replace("-I INPUT 1 ", "-A INPUT ")
        .replace("-I OUTPUT 1 ", "-A OUTPUT ")
    )
    removal = fw.render_removal(run_id, applied)
    assert removal is not None
    deleted = {line[3:] for line in removal.splitlines() if line.startswith("-D ")}
    jumps = {line[3:] for line in applied.splitlines() if line.startswith(("-A INPUT", "-A OUTPUT"))}
    assert deleted == jumps
    assert {line.split()[1] for line in removal.splitlines() if line.startswith("-X ")} == set(
        fw.chain_names(run_id)
    )


# --- errors ------------------------------------------------------------------------------------------------


def test_errors_explain_missing_nfqueue_and_u32() -> None:
    nfq = fw._explain("iptables-restore", "Couldn't load target `NFQUEUE':No such file or directory", "")
    assert "NFQUEUE target is not supported" in nfq and "CONFIG_NETFILTER_XT_TARGET_NFQUEUE" in nfq
    u32 = fw._explain("iptables-restore", "Couldn't load match `u32':No such file or directory", "")
    assert "u32 match is not supported" in u32


def test_missing_iptables_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(fw.FirewallError, match=r"install iptables: sudo scripts/setup"):
        fw.detect_backend()


def test_guard_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    guard = fw.FirewallGuard(FLOW, run_id=RUN)
    with pytest.raises(fw.FirewallNeedsRootError, match="needs root"):
        guard.apply()
    assert not guard.active


def test_rst_rule_lets_the_engines_low_ttl_rst_through() -> None:
    flow = PunchFlow(40000, Endpoint("198.51.100.9", 40001), 7, crafted_rst_ttl=2)
    rule = fw.rst_rule("abc123", flow)
    assert "--tcp-flags RST RST -m ttl --ttl-gt 2 " in rule
    assert "--ttl-gt" not in fw.rst_rule("abc123", PunchFlow(40000, Endpoint("198.51.100.9", 40001), 7))
