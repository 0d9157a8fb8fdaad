"""Benchmark of the punch: time from both-registered to connected, and bulk throughput of the punched socket.

Run as root: ``scripts/bench-punch [--quick]``. Goals from the issue: the punch within 10 ms of the floor of
1.5 server RTT + 1.5 peer RTT, and the punched socket's bulk throughput at least 0.99 of a plain kernel TCP
connection over the same NATs.

The lab is ``two_nats(hops=2)`` with the same NAT profile on both sides; ``rawpunch server`` runs in the
``server`` node, and one agent process (this module, ``--agent NAME``) in each of ``a`` and ``b`` punches on
command, so interpreter start-up is never timed. Everything stays inside the lab's namespaces, and the lab
with every process in it is gone on every exit path.

time to connect
    N punches (``--strategy crafted-handshake``), each with a fresh session secret. Per peer, the
    ``connected`` event's ``elapsed_ms`` (from the server's both-registered instant, placed on the peer's
    clock by the PEER message's PAIRED_US and half the RTT, to the authenticated socket) and ``phases_ms``;
    per punch the later of the two peers. The agent also timestamps every event
    as it arrives, which splits the time into: paired -> GO (firewall guard applied, READY/GO round trip,
    the server's GO delay), GO -> engine connected (priming SYN, ``syn_delay``, SYN/SYN-ACK/ACK), and engine
    connected -> ``connected`` (TCP_REPAIR splice, waiting for the peer's splice, removing the capture rule,
    the HMAC challenge both ways).
the floor
    Median ICMP echo RTT from ``a`` to the server, and from ``a`` to the public address of b's NAT, which
    forwards echo requests to ``b`` for the benchmark: the peer path itself, through both NATs, answered
    by b's kernel. Floor = 1.5 x server RTT + 1.5 x peer RTT.
throughput
    R rounds, each a punch (not timed) and then the same number of bytes from ``a`` to ``b`` over (1)
    the freshly punched socket and (2) the baseline, in alternating order. The baseline is a plain kernel
    TCP connection from ``a`` (``connect()``) to nat-b's public address, port ``BASELINE_PORT``, which
    nat-b forwards to ``b`` (DNAT and FORWARD accept rules added for the benchmark): exactly the path of
    the punched flow, through both NATs' MASQUERADE and conntrack. Both use the same sender and receiver code
    (``sendall`` of a 1 MiB buffer, ``recv_into``); the sender's clock runs from the first byte to the
    receiver's one-byte acknowledgment of EOF. Reported: the median of each, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import queue
import re
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from rawpunch.bench.record import RECORD, Machine, append_section, machine

TARGET_OVER_FLOOR_MS = 10.0
TARGET_RATIO = 0.99
BASELINE_PORT = 45_000
CHUNK = 1 << 20
SLOW_AUTH_MS = 500.0  # an authenticate phase this long waited for the peer's splice probe in vain
EVENT_TIMEOUT = 60.0
TCP_INFO = struct.Struct("8B24I")  # through tcpi_rcv_space; see linux/tcp.h


class BenchError(Exception):
    """The benchmark could not measure what it set out to (the message says what went wrong)."""


# --- the agent: runs inside a lab node ---------------------------------------------------------------------


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _tcp_info(sock: socket.socket) -> dict[str, int]:
    fields = TCP_INFO.unpack(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size))
    u32 = fields[8:]
    # u32 order: rto ato snd_mss rcv_mss unacked sacked lost retrans fackets last_data_sent last_ack_sent
    # last_data_recv last_ack_recv pmtu rcv_ssthresh rtt rttvar snd_ssthresh snd_cwnd advmss reordering
    # rcv_rtt rcv_space total_retrans
    return {
        "options": fields[5],
        "snd_wscale": fields[6] & 0x0F,
        "rcv_wscale": fields[6] >> 4,
        "snd_mss": u32[2],
        "rcv_ssthresh": u32[14],
        "rtt_us": u32[15],
        "snd_cwnd": u32[18],
        "rcv_space": u32[22],
        "total_retrans": u32[23],
    }


class Agent:
    """One peer: punches on command and moves bulk data over the punched socket or a plain connection."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.buffer = memoryview(os.urandom(CHUNK))

    def run(self) -> None:
        _emit({"event": "ready", "node": self.name})
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                _emit(getattr(self, f"op_{cmd['op']}")(cmd))
            except Exception as exc:
                _emit({"event": "error", "op": cmd["op"], "error": f"{type(exc).__name__}: {exc}"})

    def op_punch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from rawpunch.proto.codec import Endpoint  # noqa: PLC0415 - the orchestrator never needs these
        from rawpunch.punch.session import PunchSettings, punch  # noqa: PLC0415

        seen: list[tuple[float, dict[str, Any]]] = []
        settings = PunchSettings(
            Endpoint.parse(cmd["server"]),
            cmd["secret"],
            peer_timeout=30.0,
            strategy="crafted-handshake",  # the goal is the crafted punch; auto adds discoveries
            on_event=lambda record: seen.append((time.monotonic(), record)),
        )
        try:
            result = asyncio.run(punch(settings))
        except Exception as exc:
            return {"event": "failed", "error": f"{type(exc).__name__}: {exc}"}
        self.sock = result.sock
        at = {record["event"]: t for t, record in reversed(seen)}  # first occurrence of each
        by_name = {record["event"]: record for _, record in reversed(seen)}
        connected = by_name["connected"]
        engine = by_name["Connected"]
        return {
            "event": "punched",
            "elapsed_ms": connected["elapsed_ms"],
            "phases_ms": connected["phases_ms"],
            "paired_to_go_ms": (at["go"] - at["peer"]) * 1000,
            "go_to_engine_ms": float(engine["elapsed"]) * 1000,
            "engine_to_connected_ms": (at["connected"] - at["Connected"]) * 1000,
            "syn_transmissions": sum(1 for _, r in seen if r["event"] == "SynSent"),
            "priming_ttl": connected.get("priming_ttl"),
            # Every event's time since the PEER event (first occurrence), for reading where time goes.
            "timeline_ms": [(r["event"], round((t - at["peer"]) * 1000, 2)) for t, r in seen],
        }

    def op_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return {"event": "closed"}

    def op_listen(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.listener is None:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("0.0.0.0", int(cmd["port"])))
            self.listener.listen(4)
        return {"event": "listening"}

    def op_recv(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["source"] == "punched":
            sock, self.sock = self.sock, None
        else:
            assert self.listener is not None, "listen first"
            sock = self.listener.accept()[0]
        assert sock is not None, "no punched socket"
        buf = bytearray(CHUNK)
        count, first = 0, 0.0
        with sock:
            while n := sock.recv_into(buf):
                if not count:
                    first = time.monotonic()
                count += n
            seconds = time.monotonic() - first
            info = _tcp_info(sock)
            sock.sendall(b"k")
            return {"event": "received", "bytes": count, "seconds": seconds, "tcp_info": info}

    def op_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["target"] == "punched":
            sock, self.sock = self.sock, None
        else:
            host, port = cmd["target"].rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.settimeout(None)
        assert sock is not None, "no punched socket"
        total, chunks = int(cmd["bytes"]), int(cmd["bytes"]) // CHUNK
        with sock:
            started = time.monotonic()
            for _ in range(chunks):
                sock.sendall(self.buffer)
            sock.shutdown(socket.SHUT_WR)
            ack = sock.recv(1)
            seconds = time.monotonic() - started
            info = _tcp_info(sock)
        return {
            "event": "sent",
            "bytes": chunks * CHUNK,
            "asked": total,
            "seconds": seconds,
            "ack": ack == b"k",
            "tcp_info": info,
        }


# --- the orchestrator --------------------------------------------------------------------------------------


class AgentProc:
    """An agent process in a lab node, spoken to in JSON lines."""

    def __init__(self, lab: Any, node: str) -> None:
        self.node = node
        self.proc: subprocess.Popen[str] = lab.node(node).popen(
            [sys.executable, "-m", "rawpunch.bench.punch", "--agent", node],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line.rstrip())
            del self.stderr[:-40]

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, *events: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                record = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if record is None:
                raise BenchError(f"agent in {self.node} exited:\n" + "\n".join(self.stderr))
            if record["event"] in events:
                return record
            if record["event"] == "error":
                raise BenchError(f"agent in {self.node}: {record['op']}: {record['error']}")
        raise BenchError(f"agent in {self.node}: no {'/'.join(events)} within {timeout:g} s")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class PunchRun:
    elapsed_ms: list[float] = field(default_factory=list)  # per punch, the later peer
    per_peer: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"a": [], "b": []})
    failures: list[str] = field(default_factory=list)


@dataclass
class Transfer:
    kind: str  # "punched" or "plain"
    bytes: int
    seconds: float
    retrans: int
    info: dict[str, int]
    receiver: dict[str, int]

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


@dataclass
class Results:
    profile: str
    run_id: str
    server_rtt_ms: list[float]
    peer_rtt_ms: list[float]
    punches: PunchRun
    transfers: list[Transfer]
    transfer_bytes: int

    @property
    def floor_ms(self) -> float:
        return 1.5 * statistics.median(self.server_rtt_ms) + 1.5 * statistics.median(self.peer_rtt_ms)


def _ping(lab: Any, node: str, target: str, count: int) -> list[float]:
    """ICMP echo RTTs in ms (after a warm-up: neighbour resolution is not part of an RTT)."""
    lab.node(node).run(["ping", "-n", "-q", "-c", "3", "-i", "0.01", target], check=False)
    out = lab.node(node).run(["ping", "-n", "-c", str(count), "-i", "0.01", target], check=False)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out.stdout)]
    if len(rtts) < count // 2:
        raise BenchError(
            f"ping {target} from {node}: {len(rtts)} of {count} answered\n{out.stdout}{out.stderr}"
        )
    return rtts


def _punch(peers: dict[str, AgentProc], server: str) -> dict[str, dict[str, Any]]:
    command = {"op": "punch", "server": server, "secret": secrets.token_hex(16)}
    for agent in peers.values():
        agent.send(command)
    return {n: agent.expect("punched", "failed") for n, agent in peers.items()}


def _forward_baseline_port(lab: Any) -> None:
    """nat-b forwards BASELINE_PORT and ICMP echo requests on its public address to b: the plain
    connection's way in, and a ping that measures the peer path itself."""
    b = lab.node("b").address
    tag = '-m comment --comment "rawpunch-bench baseline"'
    tcp = f"-p tcp --dport {BASELINE_PORT}"
    echo = "-p icmp --icmp-type echo-request"
    text = "\n".join(
        [
            "*nat",
            *(f"-A PREROUTING -i wan {m} {tag} -j DNAT --to-destination {b}" for m in (tcp, echo)),
            "COMMIT",
            "*filter",
            *(
                f"-I FORWARD 1 -i wan -o lan -d {b} {m} -m conntrack --ctstate NEW {tag} -j ACCEPT"
                for m in (tcp, echo)
            ),
            "COMMIT",
            "",
        ]
    )
    lab.node("nat-b").run(["iptables-restore", "--noflush", "-w"], input=text)


def _transfer(peers: dict[str, AgentProc], kind: str, target: str, nbytes: int) -> Transfer:
    a, b = peers["a"], peers["b"]
    if kind == "plain":
        b.send({"op": "listen", "port": BASELINE_PORT})
        b.expect("listening")
    b.send({"op": "recv", "source": "punched" if kind == "punched" else "listen"})
    a.send({"op": "send", "target": "punched" if kind == "punched" else target, "bytes": nbytes})
    sent = a.expect("sent")
    got = b.expect("received")
    if not sent["ack"] or got["bytes"] != sent["bytes"]:
        raise BenchError(f"{kind} transfer: sent {sent['bytes']} bytes, {got['bytes']} arrived")
    info = sent["tcp_info"]
    return Transfer(kind, sent["bytes"], sent["seconds"], info["total_retrans"], info, got["tcp_info"])


def measure(profile: str, punches: int, rounds: int, transfer_mib: int, pings: int) -> Results:
    from rawpunch.lab.netns import Lab  # noqa: PLC0415 - pyroute2 is imported only here
    from rawpunch.lab.scenario import start_server  # noqa: PLC0415
    from rawpunch.lab.topology import two_nats  # noqa: PLC0415

    say = functools.partial(print, flush=True)
    nbytes = transfer_mib * CHUNK
    with Lab(two_nats(hops=2, profile_a=profile, profile_b=profile)) as lab:
        server = start_server(lab)
        _forward_baseline_port(lab)
        peers = {n: AgentProc(lab, n) for n in ("a", "b")}
        try:
            for agent in peers.values():
                agent.expect("ready")
            nat_b = str(lab.node("nat-b").public_address)
            say(f"RTTs: {pings} pings from a to the server and to b (through both NATs) ...")
            server_rtt = _ping(lab, "a", str(server.endpoint.host), pings)
            peer_rtt = _ping(lab, "a", nat_b, pings)
            say(f"{punches} punches ({profile}) ...")
            run = PunchRun()
            for i in range(punches):
                outcome = _punch(peers, str(server.endpoint))
                for agent in peers.values():
                    agent.send({"op": "close"})
                    agent.expect("closed")
                failed = {n: o["error"] for n, o in outcome.items() if o["event"] == "failed"}
                if failed:
                    run.failures.append(f"punch {i}: {failed}")
                    continue
                for n, o in outcome.items():
                    run.per_peer[n].append(o)
                run.elapsed_ms.append(max(o["elapsed_ms"] for o in outcome.values()))
            say(f"throughput: {rounds} rounds of {transfer_mib} MiB a -> b, punched and plain ...")
            transfers: list[Transfer] = []
            for r in range(rounds):
                # The punch comes first, so that neither transfer directly follows it more often.
                outcome = _punch(peers, str(server.endpoint))
                failed = {n: o["error"] for n, o in outcome.items() if o["event"] == "failed"}
                if failed:
                    raise BenchError(f"punch for the throughput round failed: {failed}")
                for kind in ("punched", "plain") if r % 2 == 0 else ("plain", "punched"):
                    transfers.append(_transfer(peers, kind, f"{nat_b}:{BASELINE_PORT}", nbytes))
                    say(f"  {kind}: {transfers[-1].rate / 1e6:,.0f} MB/s")
        finally:
            for agent in peers.values():
                agent.close()
        return Results(profile, lab.run_id, server_rtt, peer_rtt, run, transfers, nbytes)


# --- report ------------------------------------------------------------------------------------------------


def _spread(values: Sequence[float], unit: str, digits: int = 1) -> str:
    v = sorted(values)
    p90 = v[min(len(v) - 1, round(0.9 * (len(v) - 1)))]
    return (
        f"median {statistics.median(v):.{digits}f} {unit} (min {v[0]:.{digits}f}, p90 {p90:.{digits}f}, "
        f"max {v[-1]:.{digits}f}; n={len(v)})"
    )


def _med(rows: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def _phase_med(rows: Sequence[dict[str, Any]], phase: str) -> float:
    return statistics.median(float(r["phases_ms"].get(phase, 0.0)) for r in rows)


def report_lines(res: Results) -> list[str]:
    run, lines = res.punches, []
    srv, peer = statistics.median(res.server_rtt_ms), statistics.median(res.peer_rtt_ms)
    floor = res.floor_ms
    total = len(run.elapsed_ms) + len(run.failures)
    if run.elapsed_ms:
        med = statistics.median(run.elapsed_ms)
        met = med <= floor + TARGET_OVER_FLOOR_MS
        lines.append(
            f"- Time from both-registered to connected (the later peer's `connected.elapsed_ms`): "
            f"**{_spread(run.elapsed_ms, 'ms')}**; {len(run.elapsed_ms)} of {total} punches connected. "
            f"Floor 1.5 x {srv:.3f} + 1.5 x {peer:.3f} ms = **{floor:.2f} ms**; goal <= floor + "
            f"{TARGET_OVER_FLOOR_MS:g} ms: {'**met**' if met else f'**NOT met** (+{med - floor:.1f} ms)'}."
        )
        slow = {
            i
            for i in range(len(run.elapsed_ms))
            if max(float(run.per_peer[n][i]["phases_ms"].get("authenticate", 0.0)) for n in "ab")
            > SLOW_AUTH_MS
        }
        fast = [i for i in range(len(run.elapsed_ms)) if i not in slow]
        if slow:
            rest = (
                f"the other {len(fast)}: {_spread([run.elapsed_ms[i] for i in fast], 'ms')}"
                if fast
                else "none was fast"
            )
            lines.append(
                f"- {len(slow)} of {len(run.elapsed_ms)} punches spent over {SLOW_AUTH_MS:g} ms in the "
                "authenticate phase: a peer missed the other's splice probe (read in the same NFQUEUE batch "
                "as the segment that connected it, before the driver noticed it was connected), waited the "
                "full 1 s in `wait_peer_spliced` while its capture rule dropped the other's challenge, which "
                f"then crossed only as the other kernel's retransmission; {rest}."
            )
        chosen = fast or list(range(len(run.elapsed_ms)))
        rows = [run.per_peer[n][i] for n in "ab" for i in chosen]
        which = "the punches without that wait" if slow and fast else "all punches"
        to_go, to_engine = _med(rows, "paired_to_go_ms"), _med(rows, "go_to_engine_ms")
        to_connected = _med(rows, "engine_to_connected_ms")
        teardown = statistics.median(
            float(r["engine_to_connected_ms"])
            - float(r["phases_ms"].get("splice", 0.0))
            - float(r["phases_ms"].get("authenticate", 0.0))
            for r in rows
        )
        phases = ", ".join(
            f"{p} {_phase_med(rows, p):.1f}"
            for p in ("register", "discover", "exchange", "punch", "splice", "authenticate", "total")
        )
        lines.append(
            f"- Where the time goes (medians over both peers of {which}): paired -> GO {to_go:.1f} ms "
            "(firewall guard applied with iptables-restore, READY/GO round trip, server GO delay); GO -> "
            f"engine connected {to_engine:.1f} ms (priming SYN, `syn_delay` = server RTT / 4 clamped to "
            "1..50 ms, SYN/SYN-ACK/ACK); engine connected -> `connected` event "
            f"{to_connected:.1f} ms (splice, the peer's splice probe, HMAC challenge both ways; then "
            f"{teardown:.1f} ms removing the firewall guard, iptables-save + iptables-restore, after the "
            "socket was usable and so outside `elapsed_ms`). "
            f"`phases_ms` medians: {phases} (register, discover and exchange come before the pairing); SYN "
            f"transmissions per peer: median {_med(rows, 'syn_transmissions'):g}."
        )
    if run.failures:
        lines.append(f"- Failed punches: {'; '.join(run.failures)}")
    lines.append(
        f"- RTTs (ICMP echo from a, {len(res.server_rtt_ms)} each): server "
        f"{_spread(res.server_rtt_ms, 'ms', 3)}; b through both NATs (echo forwarded by nat-b) "
        f"{_spread(res.peer_rtt_ms, 'ms', 3)}."
    )
    punched = [t for t in res.transfers if t.kind == "punched"]
    plain = [t for t in res.transfers if t.kind == "plain"]
    if punched and plain:
        mp = statistics.median(t.rate for t in punched)
        mb = statistics.median(t.rate for t in plain)
        ratio = mp / mb
        met = ratio >= TARGET_RATIO
        lines.append(
            f"- Bulk throughput a -> b, {res.transfer_bytes >> 20} MiB per run, {len(punched)} runs each, "
            f"alternating: punched socket **{mp / 1e6:,.0f} MB/s** ({_range(punched)}); plain kernel TCP "
            f"over the same NATs **{mb / 1e6:,.0f} MB/s** ({_range(plain)}). Ratio of medians "
            f"**{ratio:.3f}**; goal >= {TARGET_RATIO}: {'**met**' if met else '**NOT met**'}."
        )
        pairs = [p.rate / q.rate for p, q in zip(punched, plain, strict=True)]  # same round
        lines.append(
            "- Per round (punched / plain, the two transfers of a round back to back, after its punch): "
            f"median {statistics.median(pairs):.3f}, min {min(pairs):.3f}, max {max(pairs):.3f}. The "
            "transfers are CPU-bound (sender, receiver and five forwarding namespaces share the machine's "
            f"{os.cpu_count()} cores), so any other load on the machine moves them."
        )
        lines.append(
            "- Baseline: `connect()` from a to nat-b's public address, port "
            f"{BASELINE_PORT}, forwarded by nat-b to b (DNAT + FORWARD accept added for the benchmark): the "
            "punched flow's own path through both MASQUERADE NATs and their conntrack. Same sender/receiver "
            "code for both. At the end of a run (medians), sender: punched "
            + _info_line(punched)
            + "; plain "
            + _info_line(plain)
            + ". Receiver rcv_ssthresh/rcv_space: punched "
            + _rcv_line(punched)
            + "; plain "
            + _rcv_line(plain)
            + "."
        )
    return lines


def _info_line(transfers: Sequence[Transfer]) -> str:
    infos = [t.info for t in transfers]
    mss = statistics.median(i["snd_mss"] for i in infos)
    cwnd = statistics.median(i["snd_cwnd"] for i in infos)
    retrans = statistics.median(i["total_retrans"] for i in infos)
    scale = f"{infos[0]['snd_wscale']}/{infos[0]['rcv_wscale']}"
    return (
        f"MSS {mss:g}, cwnd {cwnd:g}, retransmissions {retrans:g}, wscale snd/rcv {scale}, "
        f"tcpi_options {infos[0]['options']}"
    )


def _rcv_line(transfers: Sequence[Transfer]) -> str:
    ssthresh = statistics.median(t.receiver["rcv_ssthresh"] for t in transfers)
    space = statistics.median(t.receiver["rcv_space"] for t in transfers)
    return f"{ssthresh:,.0f}/{space:,.0f} B"


def _range(transfers: Sequence[Transfer]) -> str:
    rates = [t.rate / 1e6 for t in transfers]
    return f"min {min(rates):,.0f}, max {max(rates):,.0f}"


# --- machine and record ------------------------------------------------------------------------------------


_METHOD = (
    "- Method (`scripts/bench-punch`): `two_nats(hops=2)` lab, no added latency (this kernel has no netem), "
    "`rawpunch server` in `server`, one long-lived agent per peer node (interpreter start-up is not timed), "
    "each punch with a fresh session secret, strategy crafted-handshake. Time: the `connected` event's "
    "`elapsed_ms` (from the server's both-registered instant to the authenticated socket; the second peer's "
    "TCP discovery and the info exchange count), the later peer per punch, split by event "
    "arrival times. Floor: 1.5 x median ICMP RTT a -> server + 1.5 x median ICMP RTT a -> nat-b's public "
    "address, which forwards echo requests to b (the peer path). Throughput: see the baseline line."
)


def record(lines: list[str], quick: bool, host: Machine) -> None:
    """Append a dated section to BENCHMARKS.md (the file and its other sections stay as they are)."""
    append_section("Punch: ", host, quick, [_METHOD, *lines], "# Benchmarks\n")


# --- command line ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-punch",
        description="Benchmark the punch in a throwaway lab (time to connect against the RTT floor, bulk "
        "throughput against plain TCP over the same NATs) and append the results to BENCHMARKS.md. Root.",
    )
    p.add_argument("--quick", action="store_true", help="10 punches, 3 throughput rounds of 64 MiB")
    p.add_argument("--punches", type=int, help="punches timed (default 30, quick 10)")
    p.add_argument("--rounds", type=int, help="throughput rounds, each punched + plain (default 9, quick 3)")
    p.add_argument("--mib", type=int, help="MiB per transfer (default 1024, quick 64)")
    p.add_argument("--profile", default="eim-apdf", help="NAT profile of both NATs (default eim-apdf)")
    p.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--agent", metavar="NODE", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.agent:
        Agent(args.agent).run()
        return 0
    punches = args.punches or (10 if args.quick else 30)
    rounds = args.rounds or (3 if args.quick else 9)
    mib = args.mib or (64 if args.quick else 1024)
    if not (1 <= punches <= 500 and 1 <= rounds <= 50 and 1 <= mib <= 4096):
        p.error("--punches 1..500, --rounds 1..50, --mib 1..4096")
    if os.geteuid() != 0:
        print(
            "bench-punch: needs root (network namespaces, iptables): sudo scripts/bench-punch",
            file=sys.stderr,
        )
        return 3
    host = machine()  # the load average before the lab exists
    try:
        res = measure(args.profile, punches, rounds, mib, pings=50)
    except BenchError as exc:
        print(f"bench-punch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench-punch: interrupted; nothing recorded", file=sys.stderr)
        return 130
    lines = [f"- Lab {res.run_id}, NAT profile `{res.profile}` on both sides.", *report_lines(res)]
    print("\n".join(lines))
    if not args.no_record:
        record(lines, args.quick, host)
        print(f"appended to {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
