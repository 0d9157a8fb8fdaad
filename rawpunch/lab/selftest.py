"""The NAT self-test: check from two vantage hosts in the core that a lab NAT behaves as its profile claims.

A profile is only worth its label if the box behaves that way, so the self-test measures each ground-truth
axis from outside, the way NAT classification (RFC 4787 sections 4-6, RFC 5382) defines it, with a host
behind the NAT(s) and ``probe1`` / ``probe2`` (two public addresses on the middle router, ``two_nats(...,
probes=True)``):

* **nat**: does the probe see the host's own address or another one?
* **mapping** (RFC 4787 section 4.1): the host connects from one local port to probe1:7000, probe1:7001 and
  probe2:7000; the public endpoints the probes see are all equal (EIM), equal for the same address only
  (ADM) or all different (APDM).
* **allocation** (section 4.2.1): four new mappings from four local ports: public port = local port
  (port-preserving), consecutive public ports (sequential), anything else (random).
* **filtering** (section 5): through a fresh mapping that only ever talked to probe1:7000, probe1 sends a SYN
  from another port and probe2 one from its address; which of them reaches the host: both (EIF), probe1's
  only (ADF), neither (APDF).
* **unsolicited_syn** (RFC 5382 REQ-4): probe1 sends a SYN to a public port no mapping holds (1023: below
  every allocator's range, above nothing a LAN host binds here): it reaches the host (``forward``: no NAT),
  or probe1 gets a RST, an ICMP port unreachable, or nothing (``drop``).
* **hairpin** (RFC 4787 REQ-9, RFC 5382 REQ-8): the host sends a SYN to its own public endpoint; it comes
  back to it from the NAT's public address (REQ-8a: external source), from its private one
  (``internal-source``), or not at all.

Nothing waits for time to pass. Whether something *did not* arrive is decided by a barrier: after the
probe packets, a byte makes a round trip over an established connection that crosses the same NAT, and the
packet capture (raw sockets, read without blocking) is looked at only when that byte is back. A NAT handles a
path's packets in order (netfilter in the softirq that receives them, the userspace NAT from one FIFO
queue), so whatever the probe packets caused has happened by then. The crafted probe SYNs come from raw
sockets; the agents that send and capture run as small processes in the nodes (``python -m
rawpunch.lab.selftest agent ...``: JSON lines on stdin/stdout, stdlib only).

``classify_*`` are pure functions of the observations, tested without root.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from rawpunch.lab.profiles import NatProfile, compose_chain, get_profile
from rawpunch.lab.topology import PROBES

if TYPE_CHECKING:
    from rawpunch.lab.netns import Lab

#: Ports of the probes' listeners: the host connects to them to open mappings.
LISTEN_PORTS = {"probe1": (7000, 7001), "probe2": (7000,)}
#: Local ports of the host for each measurement (all in 40000-59999: no allocator's range starts there,
#: Linux's ephemeral ports are never handed out meanwhile because every socket binds explicitly).
MAPPING_PORT = 41000
ALLOCATION_PORTS = (42001, 42002, 42003, 42004)
FILTER_PORT = 43000
HAIRPIN_PORT = 44000
#: Source ports of the probes' crafted SYNs, and the public port no mapping holds.
FILTER_PROBE_PORT = 7100
UNSOLICITED_PROBE_PORT = 7200
UNMAPPED_PORT = 1023
#: Bounds on things that should be instantaneous in a lab; exceeding one is an error, not a finding.
CONNECT_TIMEOUT_S = 5.0
BARRIER_TIMEOUT_S = 5.0
RPC_TIMEOUT_S = 15.0
_BARRIER = {
    "host": (b"H", b"h", b"P", b"p"),
    "probe": (b"P", b"p", b"H", b"h"),
}  # send, await, answer-to, answer


class SelfTestError(RuntimeError):
    """The self-test could not measure (an agent failed, a connection did not open): not a NAT finding."""


# --- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One behaviour: what the profile claims, what was observed, and the observations behind it."""

    name: str
    claimed: object
    observed: object
    evidence: str

    @property
    def ok(self) -> bool:
        return self.claimed == self.observed


@dataclass(frozen=True)
class SelfTestResult:
    profile: str
    host: str
    chain: tuple[str, ...]
    axes: tuple[Axis, ...]

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.axes)

    @property
    def disagreements(self) -> list[str]:
        """The names of the axes where the NAT does not behave as claimed."""
        return [a.name for a in self.axes if not a.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "host": self.host,
            "chain": list(self.chain),
            "ok": self.ok,
            "disagreements": self.disagreements,
            "axes": {
                a.name: {"claimed": a.claimed, "observed": a.observed, "evidence": a.evidence}
                for a in self.axes
            },
        }

    def __str__(self) -> str:
        lines = [f"self-test of {self.profile} ({' -> '.join(self.chain) or 'no NAT node'}): "
                 + ("OK" if self.ok else f"DISAGREES on {', '.join(self.disagreements)}")]  # fmt: skip
        for a in self.axes:
            mark = "ok " if a.ok else "BAD"
            lines.append(
                f"  {mark} {a.name:16} claimed {a.claimed!s:28} observed {a.observed!s:28} {a.evidence}"
            )
        return "\n".join(lines)


# --- pure classification ------------------------------------------------------------------------------------


def classify_mapping(same_port: str, other_port: str, other_address: str) -> str:
    """Public endpoints seen for one local endpoint by probe1:7000, probe1:7001 and probe2:7000."""
    if same_port == other_port == other_address:
        return "endpoint-independent"
    if same_port == other_port:
        return "address-dependent"
    if other_address not in (same_port, other_port):
        return "address-and-port-dependent"
    return "inconsistent"


def classify_allocation(local_ports: list[int], public_ports: list[int]) -> str:
    """Public ports of new mappings made from *local_ports*, in order."""
    if public_ports == local_ports:
        return "port-preserving"
    if all(b - a == 1 for a, b in itertools.pairwise(public_ports)):
        return "sequential"
    return "random"


def classify_filtering(same_address_passed: bool, other_address_passed: bool) -> str:
    """Which unsolicited SYNs through a mapping reached the host: from another port of the address the
    mapping talked to, and from another address."""
    if same_address_passed and other_address_passed:
        return "endpoint-independent"
    if same_address_passed:
        return "address-dependent"
    if not other_address_passed:
        return "address-and-port-dependent"
    return "inconsistent"


def classify_unsolicited(reached_host: bool, reactions: list[dict[str, Any]]) -> str:
    """What became of a SYN to an unmapped public port, from the probe's captured answers."""
    if reached_host:
        return "forward"
    if any(r["kind"] == "tcp" and "R" in r["flags"] for r in reactions):
        return "rst"
    if any(r["kind"] == "icmp" and r["type"] == 3 for r in reactions):
        return "icmp"
    if reactions:
        return "unexpected"
    return "drop"


def classify_hairpin(sources: list[tuple[str, int]], public_ip: str, private_ip: str) -> bool | str:
    """Where the host's SYN to its own public endpoint came back from (sources of the SYNs it got)."""
    hosts = {host for host, _ in sources}
    if public_ip in hosts:
        return True
    if private_ip in hosts:
        return "internal-source"
    return False


# --- the agents (run in the lab's nodes) --------------------------------------------------------------------


def _syn(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    from rawpunch.lab.usernat import tcp_bytes  # noqa: PLC0415 - the agents' only non-stdlib need
    from rawpunch.proto.codec import Endpoint  # noqa: PLC0415
    from rawpunch.punch.segment import Flags, Segment  # noqa: PLC0415

    return tcp_bytes(Segment(Endpoint(*src), Endpoint(*dst), seq=0x5E1F7E57, flags=Flags.SYN))


def _parse_capture(data: bytes) -> dict[str, Any] | None:
    """A captured IPv4 packet: TCP (addresses, ports, flags) or an ICMP error quoting TCP."""
    if len(data) < 20:
        return None
    ihl = (data[0] & 0x0F) * 4
    src, dst = str(IPv4Address(data[12:16])), str(IPv4Address(data[16:20]))
    body = data[ihl:]
    if data[9] == 6 and len(body) >= 14:
        sport, dport = struct.unpack("!HH", body[:4])
        flags = "".join(c for bit, c in zip((2, 16, 4, 1), "SARF", strict=True) if body[13] & bit)
        return {"kind": "tcp", "src": [src, sport], "dst": [dst, dport], "flags": flags}
    if data[9] == 1 and len(body) >= 8 + 20:
        inner = body[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner[9] != 6 or len(inner) < inner_ihl + 4:
            return None
        sport, dport = struct.unpack("!HH", inner[inner_ihl : inner_ihl + 4])
        quoted_dst = [str(IPv4Address(inner[16:20])), dport]
        return {
            "kind": "icmp",
            "src": [src, 0],
            "type": body[0],
            "code": body[1],
            "port": sport,
            "quoted": quoted_dst,
        }
    return None


class _Agent:
    """Shared agent machinery: raw capture, crafted SYNs, barrier connections and the command loop."""

    role = "host"

    def __init__(self, address: str) -> None:
        self.address = address
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.captures = [self._raw(socket.IPPROTO_TCP), self._raw(socket.IPPROTO_ICMP)]
        self.captured: list[dict[str, Any]] = []
        self.conns: dict[str, socket.socket] = {}
        self.echoed: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    @staticmethod
    def _raw(proto: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        return sock

    def _drain(self) -> None:
        for sock in self.captures:
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                packet = _parse_capture(data)
                if packet is not None:
                    self.captured.append(packet)

    def _adopt(self, key: str, sock: socket.socket) -> None:
        """Serve barrier bytes on an established connection: answer the peer's, note the peer's answer."""
        _, wait, answer_to, answer = _BARRIER[self.role]
        event = threading.Event()
        with self.lock:
            self.conns[key], self.echoed[key] = sock, event

        def serve() -> None:
            with contextlib.suppress(OSError):
                while data := sock.recv(64):
                    if answer_to in data:
                        sock.sendall(answer)
                    if wait in data:
                        event.set()

        threading.Thread(target=serve, daemon=True).start()

    def op_syn(self, src_port: int, dst: list[Any]) -> dict[str, Any]:
        self.sender.sendto(_syn((self.address, src_port), (dst[0], int(dst[1]))), (dst[0], 0))
        return {}

    def op_barrier(self, conn: str) -> dict[str, Any]:
        send, *_ = _BARRIER[self.role]
        with self.lock:
            sock, event = self.conns[conn], self.echoed[conn]
        event.clear()
        sock.sendall(send)
        if not event.wait(BARRIER_TIMEOUT_S):
            raise TimeoutError(f"barrier on {conn}: no answer within {BARRIER_TIMEOUT_S} s")
        return {}

    def op_captured(self, port: int) -> dict[str, Any]:
        """Everything captured so far that was addressed to (or, for ICMP, quotes) our *port*."""
        self._drain()
        mine = [p for p in self.captured if (p["port"] if p["kind"] == "icmp" else p["dst"][1]) == port]
        return {"packets": mine}

    def loop(self) -> None:
        print(json.dumps({"ready": self.address}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            try:
                reply: dict[str, Any] = {"ok": getattr(self, f"op_{op}")(**request)}
            except Exception as e:
                reply = {"error": f"{op}: {type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)


class _HostAgent(_Agent):
    role = "host"

    def op_connect(self, local_port: int, remote: list[Any]) -> dict[str, Any]:
        """Connect from *local_port* to *remote* (a probe listener), keep it open, report the source the probe
        saw (its first line)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", local_port))
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect((remote[0], int(remote[1])))
        seen = b""
        while not seen.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError(f"{remote}: closed before saying what it saw")
            seen += chunk
        sock.settimeout(None)
        key = f"{local_port}>{remote[0]}:{remote[1]}"
        self._adopt(key, sock)
        return {"conn": key, "seen": seen.decode().strip()}


class _ProbeAgent(_Agent):
    role = "probe"

    def __init__(self, address: str, ports: list[int]) -> None:
        super().__init__(address)
        for port in ports:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((address, port))
            srv.listen(16)
            threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            conn, peer = srv.accept()
            key = f"{peer[0]}:{peer[1]}"
            self._adopt(key, conn)  # before the host can know the connection exists
            conn.sendall(f"{key}\n".encode())


def agent_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawpunch.lab.selftest agent")
    parser.add_argument("role", choices=("host", "probe"))
    parser.add_argument("--address", required=True, help="this node's address (source of crafted SYNs)")
    parser.add_argument("--listen", type=int, nargs="*", default=[], help="probe: ports to listen on")
    args = parser.parse_args(argv)
    agent = _ProbeAgent(args.address, args.listen) if args.role == "probe" else _HostAgent(args.address)
    agent.loop()
    return 0


# --- the controller -----------------------------------------------------------------------------------------


class AgentProcess:
    """An agent in a lab node, driven over its stdin/stdout (the lab stops it at teardown anyway)."""

    def __init__(self, lab: Lab, node: str, role: str, listen: tuple[int, ...] = ()) -> None:
        self.node = node
        self.address = str(lab.topology.address(node))
        argv = [sys.executable, "-m", "rawpunch.lab.selftest", "agent", role, "--address", self.address]
        if listen:
            argv += ["--listen", *map(str, listen)]
        self.proc = lab.node(node).popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._read()  # {"ready": ...}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], RPC_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise SelfTestError(f"agent in {self.node} is silent or gone:\n{self._stderr()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        return str(self.proc.stderr.read())

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise SelfTestError(f"agent in {self.node}: {reply['error']}")
        result: dict[str, Any] = reply["ok"]
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def _agents(lab: Lab, host: str, probes: tuple[str, str]) -> Iterator[dict[str, AgentProcess]]:
    started: dict[str, AgentProcess] = {}
    try:
        started[host] = AgentProcess(lab, host, "host")
        for probe in probes:
            started[probe] = AgentProcess(
                lab, probe, "probe", LISTEN_PORTS.get(probe, LISTEN_PORTS["probe2"])
            )
        yield started
    finally:
        for agent in started.values():
            agent.close()


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@dataclass
class _Run:
    """One self-test in progress: the agents, the addresses, and the axes measured so far."""

    host: AgentProcess
    probe1: AgentProcess
    probe2: AgentProcess
    claimed: NatProfile
    public_ip: str
    axes: list[Axis] = field(default_factory=list)

    def connect(self, local_port: int, probe: AgentProcess, port: int) -> tuple[str, tuple[str, int]]:
        reply = self.host.call("connect", local_port=local_port, remote=[probe.address, port])
        return reply["conn"], _endpoint(reply["seen"])

    def syns_to(self, port: int) -> list[tuple[str, int]]:
        packets = self.host.call("captured", port=port)["packets"]
        return [(p["src"][0], p["src"][1]) for p in packets if p["kind"] == "tcp" and p["flags"] == "S"]

    def add(self, name: str, observed: object, evidence: str) -> None:
        self.axes.append(Axis(name, getattr(self.claimed, name), observed, evidence))


def _measure_mapping(run: _Run) -> None:
    _, same_port = run.connect(MAPPING_PORT, run.probe1, 7000)
    _, other_port = run.connect(MAPPING_PORT, run.probe1, 7001)
    _, other_address = run.connect(MAPPING_PORT, run.probe2, 7000)
    seen = [f"{h}:{p}" for h, p in (same_port, other_port, other_address)]
    nat = same_port[0] != run.host.address
    run.add("nat", nat, f"probe1 saw {seen[0]} for {run.host.address}:{MAPPING_PORT}")
    run.add(
        "mapping",
        classify_mapping(*seen),
        f"seen by probe1:7000, probe1:7001, probe2:7000: {', '.join(seen)}",
    )


def _measure_allocation(run: _Run) -> None:
    ports = [run.connect(local, run.probe1, 7000)[1][1] for local in ALLOCATION_PORTS]
    local = list(ALLOCATION_PORTS)
    run.add("allocation", classify_allocation(local, ports), f"local ports {local} -> public ports {ports}")


def _measure_filtering(run: _Run) -> tuple[str, tuple[str, int]]:
    conn, public = run.connect(FILTER_PORT, run.probe1, 7000)
    for probe in (run.probe1, run.probe2):
        probe.call("syn", src_port=FILTER_PROBE_PORT, dst=list(public))
    run.host.call("barrier", conn=conn)
    sources = run.syns_to(FILTER_PORT)
    same = (run.probe1.address, FILTER_PROBE_PORT) in sources
    other = (run.probe2.address, FILTER_PROBE_PORT) in sources
    evidence = (
        f"mapping {public[0]}:{public[1]} (talked to probe1:7000); SYNs that reached the host: {sources}"
    )
    run.add("filtering", classify_filtering(same, other), evidence)
    return conn, public


def _measure_unsolicited(run: _Run, public: tuple[str, int]) -> None:
    target = [run.public_ip, UNMAPPED_PORT]
    run.probe1.call("syn", src_port=UNSOLICITED_PROBE_PORT, dst=target)
    run.probe1.call("barrier", conn=f"{public[0]}:{public[1]}")
    reactions = run.probe1.call("captured", port=UNSOLICITED_PROBE_PORT)["packets"]
    reached = (run.probe1.address, UNSOLICITED_PROBE_PORT) in run.syns_to(UNMAPPED_PORT)
    evidence = f"SYN to {target[0]}:{target[1]}: " + (
        "reached the host" if reached else f"probe1 got {reactions}"
    )
    run.add("unsolicited_syn", classify_unsolicited(reached, reactions), evidence)


def _measure_hairpin(run: _Run, conn: str, public: tuple[str, int]) -> None:
    run.host.call("syn", src_port=HAIRPIN_PORT, dst=list(public))
    run.host.call("barrier", conn=conn)
    sources = [
        s for s in run.syns_to(FILTER_PORT) if s[0] != run.probe1.address and s[0] != run.probe2.address
    ]
    observed = classify_hairpin(sources, run.public_ip, run.host.address)
    run.add(
        "hairpin",
        observed,
        f"SYN {run.host.address}:{HAIRPIN_PORT} -> {public[0]}:{public[1]} came back from {sources}",
    )


def run_selftest(
    lab: Lab,
    host: str = "a",
    probes: tuple[str, str] = (PROBES[0], PROBES[1]),
    claimed: NatProfile | None = None,
) -> SelfTestResult:
    """Measure the NAT(s) between *host* and the core of a running lab against *claimed* (by default the
    profile of the NAT in front of the host, or the composition of a double NAT's layers)."""
    topo = lab.topology
    missing = [p for p in probes if p not in lab.namespaces]
    if missing:
        raise ValueError(
            f"lab {lab.run_id} has no vantage hosts {missing}: build it with two_nats(..., probes=True)"
        )
    chain = topo.nat_chain(host)
    if claimed is None:
        if not chain:
            raise ValueError(f"{host} has no NAT node in front of it")
        claimed = compose_chain([get_profile(topo.node(n).profile or "") for n in chain])
    if len(chain) > 1:
        # A double NAT reports under the name of the profile that built it, if one matches.
        claimed = _registered_composite(claimed)
    with _agents(lab, host, probes) as agents:
        run = _Run(agents[host], agents[probes[0]], agents[probes[1]], claimed, str(topo.seen_address(host)))
        _measure_mapping(run)
        _measure_allocation(run)
        conn, public = _measure_filtering(run)
        _measure_unsolicited(run, public)
        if claimed.nat:
            _measure_hairpin(run, conn, public)
    return SelfTestResult(claimed.name, host, chain, tuple(run.axes))


def _registered_composite(claimed: NatProfile) -> NatProfile:
    from rawpunch.lab.profiles import PROFILES  # noqa: PLC0415

    for profile in PROFILES.values():
        if profile.layers == claimed.layers:
            return profile
    return claimed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        return agent_main(argv[1:])
    print(
        "usage: python -m rawpunch.lab.selftest agent {host,probe} --address IP [--listen PORT ...]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
