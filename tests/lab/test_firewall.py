"""The firewall guard in the lab: its rules, their removal on every exit path, the sweep, and what they do.

Needs root (marked ``root``). Every iptables command runs inside a lab namespace (the nf_tables ruleset is
per network namespace), except ``cleanup_all()``, which only reads the root namespace's rules and then
enters the lab namespace of the dead run. Each test builds its own lab with a random run id, so ``-n 2`` is
safe; the one test that kills guards with SIGKILL is also the only one that calls ``cleanup_all()``, so no
other test's leftovers are swept from under it.

Observing "the kernel did not answer": the prober sends, after the segment under test, a *sentinel* SYN to
a closed, unguarded port of the same host, and collects until the sentinel's RST arrives. The veth pair
delivers in order and the kernel answers in order, so a RST to the first SYN would have arrived before the
sentinel's: absence is proved without waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twosided import run_two_sided

from rawpunch.lab.netns import Lab, LabNode
from rawpunch.lab.topology import two_hosts, two_nats
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import firewall
from rawpunch.punch.firewall import FW_DIR, FirewallGuard, PunchFlow
from rawpunch.punch.rawio import IcmpError, RawSender, SegmentQueue, from_peer, parse_ip
from rawpunch.punch.segment import Flags, Segment

pytestmark = pytest.mark.root

T = TypeVar("T")
LabFactory = Callable[..., Lab]

A_PORT, B_PORT, SENTINEL_PORT = 40000, 40001, 9  # nothing listens on 9 (discard)
#: a and b on one link: enough for the guard, and fast.
PAIR = two_hosts()
A_HOST, B_HOST = "10.0.9.1", "10.0.9.2"
DEADLINE_S = 5.0

CHILD = """
import sys, time
from rawpunch.proto.codec import Endpoint
from rawpunch.punch.firewall import FirewallGuard, PunchFlow
port, peer = int(sys.argv[1]), sys.argv[2]
guard = FirewallGuard(PunchFlow(port, Endpoint(peer, port + 1), 7), sweep=sys.argv[3] == "sweep")
guard.apply()
print("ready", guard.run_id, flush=True)
try:
    while True:
        time.sleep(60)
except KeyboardInterrupt:
    sys.exit(130)
"""


# --- helpers (module level: call() runs them in a forked child) ---------------------------------------------


def run_pair(lab: Lab, fn_a: Callable[..., Any], fn_b: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """Run ``fn_a(sync, *args)`` in node a and ``fn_b(sync, *args)`` in node b at the same time.

    One forked child in a's namespace, with a second thread that moved itself into b's (setns is per
    thread): the sides share a ``threading.Barrier`` for their handshakes, and sockets never cross a process.
    """
    return lab.node("a").call(_pair, lab.netns_name("b"), fn_a, fn_b, args, timeout=30.0)


def _pair(
    ns_b: str, fn_a: Callable[..., Any], fn_b: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Any, Any]:
    return run_two_sided(ns_b, lambda sync: fn_a(sync, *args), lambda sync: fn_b(sync, *args))


class TcpSniffer:
    """Every TCP segment delivered to this namespace (a raw IPPROTO_TCP socket gets a copy of each)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)

    def until(self, stop: Callable[[Segment], bool], timeout: float = DEADLINE_S) -> list[Segment]:
        """Segments received up to and including the first for which *stop* is true."""
        seen: list[Segment] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError(f"no matching segment within {timeout} s; saw {[str(s) for s in seen]}")
            seg = parse_ip(self.sock.recv(65535))
            seen.append(seg)
            if stop(seg):
                return seen

    def close(self) -> None:
        self.sock.close()


def syn(src: Endpoint, dst: Endpoint, seq: int = 1000, ttl: int = 64) -> Segment:
    return Segment(src, dst, seq=seq, flags=Flags.SYN, ttl=ttl)


def probe(tx: RawSender, sniff: TcpSniffer, to: Endpoint, src_port: int = B_PORT) -> list[Segment]:
    """SYN to *to*, then the sentinel SYN; what came back from *to* before the sentinel's RST."""
    me = Endpoint(B_HOST, src_port)
    tx.send(syn(me, to))
    tx.send(syn(Endpoint(B_HOST, src_port + 1), Endpoint(to.host, SENTINEL_PORT)))
    seen = sniff.until(lambda s: s.src.port == SENTINEL_PORT and s.rst)
    return [s for s in seen if s.src == to]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def tcp_counters() -> dict[str, int]:
    """This namespace's TCP MIB (RFC 4022): InSegs = segments the stack got, OutRsts = RSTs it sent."""
    lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()]
    names, values = (line for line in lines if line[0] == "Tcp:")
    return {name: int(value) for name, value in zip(names[1:], values[1:], strict=True)}


def counted(before: dict[str, int], *names: str) -> tuple[int, ...]:
    after = tcp_counters()
    return tuple(after[n] - before[n] for n in names)


def node_rules(node: LabNode) -> str:
    return node.run(["iptables-save"]).stdout


def run_lines(saved: str, run_id: str) -> list[str]:
    return [line for line in saved.splitlines() if run_id in line]


def read_line(stream: Any, timeout: float = 10.0) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout} s")
    line: str = stream.readline()
    return line


def start_child(node: LabNode, port: int, sweep: bool = False) -> tuple[subprocess.Popen[str], str]:
    """A process in *node* holding a guard; returned once the guard is applied, with its run id."""
    proc = node.popen(
        [sys.executable, "-c", CHILD, str(port), B_HOST, "sweep" if sweep else "no-sweep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(proc.stdout)
    assert line.startswith("ready "), (
        f"guard child did not start: {line!r} {proc.stderr and proc.stderr.read()}"
    )
    return proc, line.split()[1]


def exit_status(proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
    """Wait for *proc*; if it does not end, fail with what it is doing (state, signals, stderr)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        ps = subprocess.run(
            ["ps", "-o", "pid,stat,wchan:30,cmd", "--ppid", str(proc.pid), "-p", str(proc.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        status = [
            line
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if "Sig" in line or "Pnd" in line
        ]
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(
            f"guard child {proc.pid} did not exit:\n{ps}\n{status}\nstderr:\n{err}"
        ) from None


def record(run_id: str) -> Path:
    return FW_DIR / f"{run_id}.json"


# --- rules and their removal -------------------------------------------------------------------------------


def hold_guard(peer: str) -> tuple[str, str, bool, str, bool]:
    guard = FirewallGuard(PunchFlow(A_PORT, Endpoint(peer, B_PORT), 17, local_host=A_HOST))
    with guard:
        during, recorded = firewall.save("nft"), record(guard.run_id).exists()
    return guard.run_id, during, recorded, firewall.save("nft"), record(guard.run_id).exists()


def test_rules_have_comments_bypass_and_go_on_exit(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    run_id, during, recorded, after, recorded_after = lab.node("a").call(hold_guard, B_HOST)

    assert recorded and not recorded_after
    ours = run_lines(during, run_id)
    rules = [line for line in ours if line.startswith("-A ")]
    assert len(rules) == 7, ours  # 2 jumps, 2 ICMP queues, ICMP drop, segment queue, RST drop
    for rule in rules:
        assert f'-m comment --comment "rawpunch {run_id} ' in rule, rule
        if "NFQUEUE" in rule:
            assert rule.endswith("--queue-num 17 --queue-bypass"), rule
    chains = {line.split()[1] for line in during.splitlines() if line.startswith("-A ")}
    assert {f"RAWPUNCH-{run_id}-IN", f"RAWPUNCH-{run_id}-OUT"} <= chains
    # The jumps are the first rules of INPUT and OUTPUT.
    for builtin, suffix in (("INPUT", "IN"), ("OUTPUT", "OUT")):
        first = next(line for line in during.splitlines() if line.startswith(f"-A {builtin} "))
        assert first.endswith(f"-j RAWPUNCH-{run_id}-{suffix}"), first
    assert "rawpunch" not in after.lower()


def guard_then_raise(peer: str) -> tuple[str, str]:
    guard = FirewallGuard(PunchFlow(A_PORT, Endpoint(peer, B_PORT), 17))
    try:
        with guard:
            raise RuntimeError("the punch failed")
    except RuntimeError:
        return guard.run_id, firewall.save("nft")


def test_rules_go_on_exception(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    run_id, after = lab.node("a").call(guard_then_raise, B_HOST)
    assert "rawpunch" not in after.lower()
    assert not record(run_id).exists()


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130), (signal.SIGHUP, -signal.SIGHUP)],
)
def test_rules_go_when_the_owner_is_signalled(
    lab_factory: LabFactory, sig: signal.Signals, status: int
) -> None:
    lab = lab_factory(PAIR)
    node = lab.node("a")
    proc, run_id = start_child(node, A_PORT)
    assert run_lines(node_rules(node), run_id)
    assert record(run_id).exists()

    proc.send_signal(sig)
    # The handler removes the rules, then chains to the previous handler: default death, or KeyboardInterrupt.
    try:
        code = exit_status(proc)
    except AssertionError as e:
        e.add_note(f"rules now: {run_lines(node_rules(node), run_id)}; record: {record(run_id).exists()}")
        raise
    assert code == status
    assert not run_lines(node_rules(node), run_id)
    assert not record(run_id).exists()


@pytest.mark.usefixtures("exclusive_cleanup")
def test_sigkill_leftovers_are_swept_and_live_guards_kept(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    node = lab.node("a")
    live, live_id = start_child(node, 42000)

    def kill(port: int) -> str:
        proc, run_id = start_child(node, port)
        proc.kill()
        proc.wait(timeout=10)
        assert run_lines(node_rules(node), run_id), "SIGKILL cannot clean up: the chains must still be there"
        assert record(run_id).exists()
        return run_id

    # 1. sweep_leftovers() in the namespace.
    dead = kill(41000)
    removed = node.call(firewall.sweep_leftovers)
    assert sorted(removed) == sorted(
        [f"nft:RAWPUNCH-{dead}-IN", f"nft:RAWPUNCH-{dead}-OUT", str(record(dead))]
    )
    # 2. cleanup_all() from the root namespace enters the dead run's namespace.
    dead2 = kill(41010)
    removed = firewall.cleanup_all()
    assert f"nft:RAWPUNCH-{dead2}-IN" in removed and str(record(dead2)) in removed
    # 3. A new guard sweeps at start.
    dead3 = kill(41020)
    newcomer, newcomer_id = start_child(node, 43000, sweep=True)
    newcomer.terminate()
    assert exit_status(newcomer) == -signal.SIGTERM

    saved = node_rules(node)
    for run_id in (dead, dead2, dead3, newcomer_id):
        assert not run_lines(saved, run_id), run_id
        assert not record(run_id).exists()
    assert len(run_lines(saved, live_id)) == 9, "the live guard's chains and rules were touched"
    assert record(live_id).exists()
    live.terminate()
    assert exit_status(live) == -signal.SIGTERM
    assert "rawpunch" not in node_rules(node).lower()


# --- what the rules do -------------------------------------------------------------------------------------


def capture_side(sync: threading.Barrier, peer: str) -> tuple[list[Segment], tuple[int, ...], str]:
    """The engine's way: the queue attached to an asyncio loop (barrier waits run in an executor)."""
    return asyncio.run(_capture(sync, peer))


async def _capture(sync: threading.Barrier, peer: str) -> tuple[list[Segment], tuple[int, ...], str]:
    loop = asyncio.get_running_loop()
    got: list[Segment] = []
    arrived = asyncio.Event()

    def on_segment(seg: Segment) -> None:
        got.append(seg)
        arrived.set()

    async def barrier() -> None:
        await loop.run_in_executor(None, sync.wait)

    with SegmentQueue(on_segment) as queue:
        queue.attach(loop)
        flow = PunchFlow(A_PORT, Endpoint(peer, B_PORT), queue.queue_num, local_host=A_HOST)
        await barrier()  # 1: b saw the kernel's RST without a guard
        with FirewallGuard(flow):
            before = tcp_counters()
            await barrier()  # 2: guard up
            await asyncio.wait_for(arrived.wait(), DEADLINE_S)
            await barrier()  # 3: the SYN was taken (and dropped) by the queue
            await barrier()  # 4: b has its sentinel's RST
            kernel = counted(before, "InSegs", "OutRsts")
        saved = firewall.save("nft")
    return got, kernel, saved


def probe_side(sync: threading.Barrier, peer: str) -> tuple[list[Segment], list[Segment]]:
    target = Endpoint(A_HOST, A_PORT)
    sniff, tx = TcpSniffer(), RawSender()
    try:
        without_guard = probe(tx, sniff, target)
        sync.wait()  # 1
        sync.wait()  # 2
        tx.send(syn(Endpoint(B_HOST, B_PORT), target))
        sync.wait()  # 3
        tx.send(syn(Endpoint(B_HOST, B_PORT + 1), Endpoint(A_HOST, SENTINEL_PORT)))
        seen = sniff.until(lambda s: s.src.port == SENTINEL_PORT and s.rst)
        sync.wait()  # 4
        return without_guard, [s for s in seen if s.src == target]
    finally:
        sniff.close()
        tx.close()


def test_queue_takes_the_punch_syn_and_the_kernel_never_sees_it(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    (got, kernel, saved), (without_guard, with_guard) = run_pair(lab, capture_side, probe_side, B_HOST)

    assert [s.flags for s in without_guard] == [Flags.RST | Flags.ACK], "baseline: a closed port answers RST"
    assert [(s.src, s.dst, s.flags, s.seq) for s in got] == [
        (Endpoint(B_HOST, B_PORT), Endpoint(A_HOST, A_PORT), Flags.SYN, 1000)
    ]
    assert with_guard == [], f"the kernel answered a queued SYN: {[str(s) for s in with_guard]}"
    # The TCP stack received only the sentinel and reset only it: the queued SYN never reached it.
    assert kernel == (1, 1)
    assert "rawpunch" not in saved.lower()


def early_guard_side(sync: threading.Barrier, peer: str) -> list[Segment]:
    return asyncio.run(_early_guard(sync, peer))


async def _early_guard(sync: threading.Barrier, peer: str) -> list[Segment]:
    """The port-scoped guard of a punch that has not met its peer yet, with a listener on the port: the
    queue claims the peer's segments only; everything else must reach the listener."""
    loop = asyncio.get_running_loop()
    got: list[Segment] = []
    with SegmentQueue(got.append) as queue, socket.create_server((A_HOST, A_PORT)):
        queue.claim = lambda data: from_peer(data, Endpoint(peer, B_PORT))
        queue.attach(loop)
        with FirewallGuard(PunchFlow(A_PORT, None, queue.queue_num, local_host=A_HOST)):
            await loop.run_in_executor(None, sync.wait)  # 1: guard up
            await loop.run_in_executor(None, sync.wait)  # 2: b has probed from the peer's port and another
    return got


def early_probe_side(sync: threading.Barrier, peer: str) -> tuple[list[Segment], list[Segment]]:
    sniff, tx = TcpSniffer(), RawSender()
    try:
        sync.wait()  # 1
        target, elsewhere = Endpoint(A_HOST, A_PORT), Endpoint(B_HOST, B_PORT + 2)
        tx.send(syn(Endpoint(B_HOST, B_PORT), target))
        tx.send(syn(elsewhere, target))
        # Both SYNs pass the queue in order, so an answer to the peer's would come before the one that
        # ends the wait (a sentinel's RST, straight from the kernel, could overtake both).
        seen = sniff.until(lambda s: s.src == target and s.dst == elsewhere and s.syn)
        from_the_peer = [s for s in seen if s.src == target and s.dst.port == B_PORT]
        from_elsewhere = [s for s in seen if s.src == target and s.dst == elsewhere]
        sync.wait()  # 2
        return from_the_peer, from_elsewhere
    finally:
        sniff.close()
        tx.close()


def test_early_guard_claims_the_peer_and_gives_the_rest_to_the_kernel(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    got, (from_the_peer, from_elsewhere) = run_pair(lab, early_guard_side, early_probe_side, B_HOST)
    assert [(s.src, s.flags) for s in got] == [(Endpoint(B_HOST, B_PORT), Flags.SYN)]
    assert from_the_peer == [], f"the listener answered the claimed SYN: {[str(s) for s in from_the_peer]}"
    assert [s.flags for s in from_elsewhere] == [Flags.SYN | Flags.ACK], [str(s) for s in from_elsewhere]
    assert "rawpunch" not in node_rules(lab.node("a")).lower()


def hold_side(sync: threading.Barrier, peer: str) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
    return asyncio.run(_hold(sync, peer))


async def _hold(sync: threading.Barrier, peer: str) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
    """Data that comes before our socket exists waits in the queue, and reaches the kernel when told."""
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    arrived = asyncio.Event()

    def on_segment(seg: Segment) -> None:
        seen.append(seg.payload)
        arrived.set()

    with SegmentQueue(on_segment) as queue:
        queue.hold = lambda seg: bool(seg.payload)
        queue.attach(loop)
        with FirewallGuard(PunchFlow(A_PORT, Endpoint(peer, B_PORT), queue.queue_num, local_host=A_HOST)):
            before = tcp_counters()
            await loop.run_in_executor(None, sync.wait)  # 1: guard up; b sends its data and a bare ACK
            await asyncio.wait_for(arrived.wait(), DEADLINE_S)
            while len(seen) < 2:  # the ACK, behind the data in the queue
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), DEADLINE_S)
            while_held = counted(before, "InSegs")
            queue.pass_to_kernel()
            deadline = time.monotonic() + DEADLINE_S
            while counted(before, "InSegs") == while_held and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            after = counted(before, "InSegs", "OutRsts")
            await loop.run_in_executor(None, sync.wait)  # 2
    return seen, while_held, after


def hold_probe_side(sync: threading.Barrier, peer: str) -> None:
    tx = RawSender()
    try:
        sync.wait()  # 1
        data = Segment(Endpoint(B_HOST, B_PORT), Endpoint(A_HOST, A_PORT), seq=1001, ack=7, flags=Flags.ACK)
        tx.send(data.with_(payload=b"challenge", flags=Flags.ACK | Flags.PSH))
        tx.send(data.with_(seq=1010))  # a bare ACK: not held, dropped
        sync.wait()  # 2
    finally:
        tx.close()


def test_held_data_reaches_the_kernel_only_when_passed_on(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    (seen, while_held, after), _ = run_pair(lab, hold_side, hold_probe_side, B_HOST)
    assert seen == [b"challenge", b""]
    assert while_held == (0,), "the kernel got a segment the queue held or dropped"
    # Passed on, the data met no socket: the stack answered with a RST, which the guard kept in.
    assert after == (1, 1)
    assert "rawpunch" not in node_rules(lab.node("a")).lower()


def bypass_side(sync: threading.Barrier, peer: str) -> tuple[tuple[int, ...], str]:
    queue = SegmentQueue(lambda seg: None)
    with FirewallGuard(PunchFlow(A_PORT, Endpoint(peer, B_PORT), queue.queue_num)) as guard:
        queue.close()  # nobody listens on the queue now
        before = tcp_counters()
        sync.wait()  # 1: b probes the closed port
        sync.wait()  # 2: b has its sentinel's RST
        kernel = counted(before, "InSegs", "OutRsts")
        with socket.create_server((A_HOST, A_PORT)):  # now the kernel answers SYN-ACK
            sync.wait()  # 3: b probes the listening port
            sync.wait()  # 4: b got its answer
        assert guard.capturing
    return kernel, firewall.save("nft")


def bypass_probe_side(sync: threading.Barrier, peer: str) -> tuple[list[Segment], list[Segment]]:
    sniff, tx = TcpSniffer(), RawSender()
    try:
        sync.wait()  # 1
        closed = probe(tx, sniff, Endpoint(A_HOST, A_PORT))
        sync.wait()  # 2
        sync.wait()  # 3
        listening = probe(tx, sniff, Endpoint(A_HOST, A_PORT))
        sync.wait()  # 4
        return closed, listening
    finally:
        sniff.close()
        tx.close()


def test_queue_bypass_passes_segments_when_nobody_listens(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    (kernel, saved), (closed, listening) = run_pair(lab, bypass_side, bypass_probe_side, B_HOST)
    # Closed port: the SYN passed the unbound queue to the stack, which reset it (SYN and sentinel: 2 each),
    # and the guard's RST-drop kept that RST from the peer.
    assert kernel == (2, 2)
    assert closed == [], [str(s) for s in closed]
    # Listening port: the stack got the SYN and answered.
    assert [s.flags for s in listening] == [Flags.SYN | Flags.ACK], [str(s) for s in listening]
    assert "rawpunch" not in saved.lower()


def legacy_backend(peer: str) -> dict[str, Any]:
    # A host whose rules live in iptables-legacy (an older Docker, say): the guard must follow them there.
    subprocess.run(
        ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"], check=True
    )
    out: dict[str, Any] = {"detected": firewall.detect_backend()}
    flow = PunchFlow(A_PORT, Endpoint(peer, B_PORT), 17)
    with FirewallGuard(flow) as guard:
        out["run"], out["backend"] = guard.run_id, guard.backend
        out["legacy"], out["nft"] = firewall.save("legacy"), firewall.save("nft")
    out["legacy_after"] = firewall.save("legacy")
    # A dead run's leftover in legacy (no record: its owner is gone), and a live run's chains in nft.
    firewall.restore("legacy", firewall.render_apply("dead0", flow))
    with FirewallGuard(flow, backend="nft", sweep=False) as live:
        out["swept"] = firewall.sweep_leftovers()
        out["live_kept"] = bool(run_lines(firewall.save("nft"), live.run_id))
    out["finally"] = firewall.save("legacy") + firewall.save("nft")
    return out


def test_guard_follows_the_legacy_backend_and_sweeps_both(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    out = lab.node("a").call(legacy_backend, B_HOST)
    assert out["detected"] == out["backend"] == "legacy"
    assert len(run_lines(out["legacy"], out["run"])) == 9
    assert not run_lines(out["nft"], out["run"])
    assert not run_lines(out["legacy_after"], out["run"])
    assert sorted(out["swept"]) == ["legacy:RAWPUNCH-dead0-IN", "legacy:RAWPUNCH-dead0-OUT"]
    assert out["live_kept"]
    assert "rawpunch" not in out["finally"].lower()


# --- ICMP about the priming SYN, through a real NAT and core ---------------------------------------------


def icmp_seen_by_stack(sock: socket.socket) -> list[tuple[int, int]]:
    """(ICMP type, quoted source port) of each ICMP error the raw socket has (the kernel's view)."""
    out = []
    while select.select([sock], [], [], 0)[0]:
        data = sock.recv(65535)
        ihl = (data[0] & 0x0F) * 4
        inner = ihl + 8
        inner_ihl = (data[inner] & 0x0F) * 4
        out.append((data[ihl], int.from_bytes(data[inner + inner_ihl : inner + inner_ihl + 2], "big")))
    return out


def expire(
    tx: RawSender, stack: socket.socket, queue: SegmentQueue, me: str, peer: Endpoint
) -> list[tuple[int, int]]:
    """TTL-2 SYNs from the punch port and a sentinel port; ICMP that reached the stack, up to the sentinel."""
    tx.send(syn(Endpoint(me, A_PORT), peer, ttl=2))
    tx.send(syn(Endpoint(me, A_PORT + 2), peer, ttl=2))
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + DEADLINE_S
    while (11, A_PORT + 2) not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no time-exceeded for the sentinel; saw {seen}")
        select.select([stack.fileno(), queue.fileno()], [], [], remaining)
        queue.process()
        seen += icmp_seen_by_stack(stack)
    return seen


def icmp_side(me: str, peer_host: str) -> tuple[list[IcmpError], list[list[tuple[int, int]]]]:
    peer = Endpoint(peer_host, B_PORT)
    icmps: list[IcmpError] = []
    stack = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    views = []
    with SegmentQueue(lambda seg: None, on_icmp=icmps.append) as queue, RawSender() as tx:
        with FirewallGuard(PunchFlow(A_PORT, peer, queue.queue_num, local_host=me)) as guard:
            views.append(expire(tx, stack, queue, me, peer))
            wait_for(lambda: queue.process() >= 0 and len(icmps) == 1, "the queued time-exceeded")
            guard.stop_capture()
            views.append(expire(tx, stack, queue, me, peer))
        views.append(expire(tx, stack, queue, me, peer))
    stack.close()
    return icmps, views


def test_icmp_about_the_punch_goes_to_the_engine_not_the_stack(lab_factory: LabFactory) -> None:
    lab = lab_factory(two_nats(hops=2))
    topo = lab.topology
    me = str(topo.address("a"))
    icmps, (guarded, after_stop, unguarded) = lab.node("a").call(
        icmp_side, me, str(topo.public_address("nat-b"))
    )
    r1_towards_nat_a = next(str(i.address.ip) for i in topo.interfaces("r1") if i.peer == "nat-a")

    assert len(icmps) == 1
    (err,) = icmps
    assert (err.type, err.router) == (11, r1_towards_nat_a)
    # nat-a translated the quoted header back to our private endpoint.
    assert err.quoted.src == Endpoint(me, A_PORT)
    assert err.quoted.dst == Endpoint(str(topo.public_address("nat-b")), B_PORT)
    assert (err.quoted.seq, err.quoted.flags) == (1000, Flags.SYN)

    punch = (11, A_PORT)
    assert punch not in guarded, "queued: the stack never saw it"
    assert punch not in after_stop, "after stop_capture the DROP still hides it"
    assert punch in unguarded, "without the guard the stack gets it (so the guard did the hiding)"
