"""The firewall guard: everything the punch installs in the host's netfilter, and its removal on every path.

Why each rule exists
--------------------
The punch sends its SYN, SYN-ACK and ACK as crafted segments from a raw socket (rawio.py), so the host's TCP
stack has no socket for the punch 4-tuple (local port, peer's public endpoint) until the splice
(splice.py). Left alone, the kernel would answer every segment the peer sends with a RST (RFC 9293 section
3.10.7.1: a segment for a CLOSED connection gets a reset), and that RST would pass the peer's NAT and tear
down the peer's half-made connection. Three rules prevent that, all in chains of the run's own:

* **INPUT: NFQUEUE for the punch 4-tuple** (``-p tcp -s PEER --sport PEERPORT --dport LOCALPORT``). The
  peer's segments go to a userspace queue instead of the TCP stack: the engine consumes them (the NFQUEUE
  reader gives the verdict DROP), and the kernel, never seeing them, never answers. Every NFQUEUE rule has
  ``--queue-bypass``: if no process is bound to the queue (the engine crashed, or has not bound it yet)
  the packets continue through the ruleset instead of being dropped, so a dead engine cannot blackhole a
  flow. Consequence: bind the reader *before* applying the guard.
* **OUTPUT: drop RSTs from the punch port to the peer.** A belt to the braces above, for the segments the
  queue cannot hold back: one that reaches the stack while the queue is bypassed or full, and, above all,
  the splice. Turning TCP_REPAIR off sends a window probe (an ACK); if the peer's kernel has no socket for
  the 4-tuple yet, it answers with a RST whose SEQ is the probe's ACK, i.e. exactly our RCV.NXT -- the one
  RST that RFC 5961 section 3.2 says must reset the connection. So each side keeps its RST-drop until
  *both* sides are spliced, and the peer's probe is consumed by our still-active queue.
* **INPUT: ICMP errors about the punch go to the queue, and time-exceeded is dropped.** A priming SYN sent
  with a low TTL opens the own NAT's mapping and expires in the core; the router's ICMP time-exceeded comes
  back through the NAT (which rewrites the embedded header back to the private address). Delivered to the
  stack, a hard ICMP error aborts a socket in SYN_SENT (RFC 1122 4.2.3.9 lets stacks do so; Linux does).
  The engine wants these errors (which hop expired the SYN; a NAT that refuses with ICMP unreachable), so
  time-exceeded and unreachable are queued like the segments, and a DROP behind the queue rule catches
  time-exceeded when nobody is bound. The rules are scoped with ``u32`` to ICMP whose embedded packet is TCP
  from the punch port to the peer's endpoint, so unrelated ICMP (path-MTU discovery!) is untouched; the
  DROP stays after ``stop_capture`` (a late expiry of the priming SYN), the queue rules do not.

Once both ends are spliced the queue rule must go first (``stop_capture``; otherwise the new socket would
never receive anything), then the whole guard (``remove``; a permanent RST-drop would stop the socket from
ever resetting its connection).

How the rules are managed
-------------------------
* Own chains ``RAWPUNCH-<run>-IN`` / ``-OUT`` in the filter table, hooked at the top of INPUT and OUTPUT by
  one jump rule each, so nothing else in the host's rules can be touched and a listing shows what belongs
  to which run. Every rule, the jumps included, carries ``-m comment --comment "rawpunch <run> ..."``.
* Applied and removed atomically with ``iptables-restore --noflush --wait``: one transaction creates the
  chains, fills them and hooks them, or nothing happens; noflush leaves every other chain alone. Removal is
  computed from ``iptables-save`` output (the jump rules exactly as the kernel holds them), so it also
  works on half-applied or foreign-process state.
* The backend: iptables-nft and iptables-legacy keep separate rulesets, and a host uses one of them. The
  guard uses the one whose ``*-save`` shows rules (nft when neither does, or both); sweeps look in both.
* Removal runs on ``__exit__`` (normal end and exceptions), from SIGINT/SIGTERM/SIGHUP handlers that then
  chain to the handlers they replaced, and at exit. A SIGKILLed owner cannot clean up: each guard writes
  ``/run/rawpunch/fw/<run>.json`` (owner pid + start time, network namespace, backend) *before* its rules
  exist, and ``sweep_leftovers()`` -- run at every guard's start and by ``rawpunch cleanup`` through
  ``cleanup_all()`` -- removes chains of runs whose owner is gone while leaving live runs alone.

The rule text comes from pure functions (``render_apply``, ``render_removal``, ...), tested without root.
Only IPv4 is supported (ip6tables would need the same set).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from types import TracebackType
from typing import Literal

from rawpunch.exitguard import SignalGuard
from rawpunch.lab.nsproc import RUN_DIR, proc_start_time, process_alive, run_in_netns
from rawpunch.proto.codec import Endpoint

log = logging.getLogger(__name__)

Backend = Literal["nft", "legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "legacy")
FW_DIR = RUN_DIR / "fw"
COMMENT_TAG = "rawpunch"
CHAIN_PREFIX = "RAWPUNCH-"
#: iptables chain names: at most 28 characters (XT_EXTENSION_MAXNAMELEN 29 with the NUL).
MAX_CHAIN_LEN = 28
SETUP_HINT = "install iptables: sudo scripts/setup"
_RUN_ID = re.compile(r"^[0-9a-z]{1,12}$")
_CHAIN = re.compile(rf"^{CHAIN_PREFIX}(?P<run>[0-9a-z]{{1,12}})-(?P<hook>IN|OUT)$")
Hook = Literal["IN", "OUT"]
_HOOKS: tuple[tuple[str, Hook], ...] = (("INPUT", "IN"), ("OUTPUT", "OUT"))
_TIMEOUT_S = 20.0


class FirewallError(RuntimeError):
    """A firewall operation failed; the message says what and how to fix it."""


class FirewallNeedsRootError(FirewallError, PermissionError):
    """Raised when not running as root."""


# --- pure rule text ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PunchFlow:
    """The 4-tuple the guard protects: our *local_port* (on *local_host* if given) and the peer's public
    endpoint, plus the NFQUEUE number the engine's reader is bound to.

    *peer* None: the early, port-scoped guard, installed before the peer is known so that no
    iptables-restore is left between meeting the peer and the priming SYN. Its rules match the local port
    only (any remote endpoint); its reader hands the punch 4-tuple to the engine and gives every other
    packet straight back to the kernel (``SegmentQueue.claim``), so the kernel still never sees a segment
    of the punch and everything else on that port (the TCP discovery) is untouched.
    """

    local_port: int
    peer: Endpoint | None
    queue_num: int
    local_host: str | None = None
    crafted_rst_ttl: int | None = None
    """RSTs with at most this TTL pass: the engine's own low-TTL "reopen" RSTs, which expire in the
    core and never reach the peer. The kernel's RSTs leave with the default TTL (64) and are dropped."""
    kernel_sockets: bool = False
    """The kernel's own sockets make the handshake (``rawpunch.strategy.kernel``): no capture; the
    time-exceeded drop and a RST drop, both for TCP from the local port to any port of the peer's host."""
    all_ports: bool = False
    """Port exhaustion (``rawpunch.strategy.exhaustion``): crafted flows from tens of thousands of local
    ports to the peer's host. Every rule matches the peer's host and no port: TCP from it is queued (the
    reader claims the SYNs to our flows and gives the rest to the kernel), our kernel's RSTs to it are
    dropped (the crafted low-TTL RSTs that release the flows' NAT entries pass), and so is time-exceeded
    about TCP to it (the flows' low-TTL SYNs expire in the core)."""

    def __post_init__(self) -> None:
        ports = [("local port", self.local_port)]
        if self.peer is not None:
            ports.append(("peer port", self.peer.port))
        elif self.kernel_sockets or self.all_ports:
            raise ValueError("a kernel-socket or all-ports guard needs the peer's address")
        if self.kernel_sockets and self.all_ports:
            raise ValueError("kernel_sockets and all_ports exclude each other")
        for what, port in ports:
            if not 1 <= port <= 0xFFFF:
                raise ValueError(f"{what} {port} is not in 1..65535")
        if not 0 <= self.queue_num <= 0xFFFF:
            raise ValueError(f"NFQUEUE number {self.queue_num} is not in 0..65535")
        for host in (None if self.peer is None else self.peer.host, self.local_host):
            if host is not None and not isinstance(ip_address(host), IPv4Address):
                raise ValueError(f"{host}: the firewall guard supports IPv4 only")


def new_run_id() -> str:
    """8 hex digits: unique enough for concurrent punches on one machine."""
    return secrets.token_hex(4)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use 1-12 of [0-9a-z] (it becomes part of chain names)")
    return run_id


def chain_name(run_id: str, hook: Hook) -> str:
    name = f"{CHAIN_PREFIX}{check_run_id(run_id)}-{hook}"
    assert len(name) <= MAX_CHAIN_LEN
    return name


def chain_names(run_id: str) -> tuple[str, str]:
    """(input chain, output chain) of a run."""
    return chain_name(run_id, "IN"), chain_name(run_id, "OUT")


def _comment(run_id: str, what: str) -> str:
    if '"' in what:
        raise ValueError(f"iptables comment must not contain a double quote: {what!r}")
    return f'-m comment --comment "{COMMENT_TAG} {run_id} {what}"'


def capture_rule(run_id: str, flow: PunchFlow) -> str:
    """NFQUEUE the peer's segments for the punch 4-tuple (with --queue-bypass, always); without a peer,
    every segment to the local port (the reader claims the 4-tuple's and accepts the rest)."""
    dst = f" -d {flow.local_host}/32" if flow.local_host else ""
    src = "" if flow.peer is None else f" -s {flow.peer.host}/32"
    sport = "" if flow.peer is None else f"--sport {flow.peer.port} "
    ports = "" if flow.all_ports else f"-m tcp {sport}--dport {flow.local_port} "
    return (
        f"-A {chain_name(run_id, 'IN')}{src}{dst} -p tcp "
        f"{ports}"
        f"{_comment(run_id, 'capture punch segments')} "
        f"-j NFQUEUE --queue-num {flow.queue_num} --queue-bypass"
    )


def _hex32(value: int) -> str:
    return f"0x{value:08X}"


def icmp_u32(flow: PunchFlow) -> str:
    """u32 test: the ICMP error embeds a TCP segment from our punch port to the peer's endpoint.

    Offsets: ``0>>22&0x3C`` is the outer IP header length; ``@`` moves there (the ICMP header); the
    embedded IP header starts 8 bytes further: its protocol byte is at +8+9, its destination at +8+16;
    ``8>>22&0x3C@`` adds the embedded header length, and the embedded TCP ports are the word at +8.
    """
    tests = ["0>>22&0x3C@16>>16&0xFF=0x6"]  # embedded protocol: TCP
    if (flow.peer is None or flow.kernel_sockets) and not flow.all_ports:  # any remote port: the local one
        tests.append(f"0>>22&0x3C@8>>22&0x3C@8>>16=0x{flow.local_port:X}")
    if flow.peer is not None:
        tests.insert(1, f"0>>22&0x3C@24={_hex32(int(IPv4Address(flow.peer.host)))}")  # destination: the peer
    if flow.peer is not None and not (flow.kernel_sockets or flow.all_ports):
        ports = flow.local_port << 16 | flow.peer.port
        tests.append(f"0>>22&0x3C@8>>22&0x3C@8={_hex32(ports)}")  # embedded ports: local -> peer
    if flow.local_host:
        tests.append(f"0>>22&0x3C@20={_hex32(int(IPv4Address(flow.local_host)))}")
    return "&&".join(tests)


def icmp_capture_rules(run_id: str, flow: PunchFlow) -> list[str]:
    """NFQUEUE ICMP time-exceeded and unreachable about the punch: the engine learns from them."""
    match = f"-m u32 --u32 {icmp_u32(flow)}"
    return [
        f"-A {chain_name(run_id, 'IN')} -p icmp -m icmp --icmp-type {icmp_type} {match} "
        f"{_comment(run_id, f'capture ICMP {name} about the punch')} "
        f"-j NFQUEUE --queue-num {flow.queue_num} --queue-bypass"
        for icmp_type, name in ((11, "time-exceeded"), (3, "unreachable"))
    ]


def icmp_drop_rule(run_id: str, flow: PunchFlow) -> str:
    """Drop ICMP time-exceeded about the punch that nobody queued (the priming SYN's expiry in the core)."""
    return (
        f"-A {chain_name(run_id, 'IN')} -p icmp -m icmp --icmp-type 11 -m u32 --u32 {icmp_u32(flow)} "
        f"{_comment(run_id, 'drop time-exceeded of the priming SYN')} -j DROP"
    )


def rst_rule(run_id: str, flow: PunchFlow) -> str:
    """Drop RSTs from the punch port to the peer's endpoint (the early guard: to anywhere; all ports: from
    any port to any port of the peer's host)."""
    src = f" -s {flow.local_host}/32" if flow.local_host else ""
    dst = "" if flow.peer is None else f" -d {flow.peer.host}/32"
    ports = [] if flow.all_ports else [f"--sport {flow.local_port}"]
    if flow.peer is not None and not flow.all_ports:
        ports.append(f"--dport {flow.peer.port}")
    ttl = f"-m ttl --ttl-gt {flow.crafted_rst_ttl} " if flow.crafted_rst_ttl else ""
    return (
        f"-A {chain_name(run_id, 'OUT')}{src}{dst} -p tcp -m tcp "
        f"{' '.join([*ports, '--tcp-flags RST RST'])} {ttl}"
        f"{_comment(run_id, 'no RST to the peer before both ends are spliced')} -j DROP"
    )


def kernel_rst_rule(run_id: str, flow: PunchFlow) -> str:
    """Kernel-socket strategies: drop RSTs from the punch port to any port of the peer's host.

    A peer's SYN that arrives before our socket towards its port exists (its guessed or predicted port,
    or a GO skew) would be answered by our kernel with a RST; through an endpoint-independent filter that
    RST reaches the peer and aborts its attempt (and closes its NAT's entry). Dropped, the SYN is simply
    retransmitted and finds our socket then (RFC 9293 section 3.10.7.1 is what the kernel does)."""
    src = f" -s {flow.local_host}/32" if flow.local_host else ""
    assert flow.peer is not None  # PunchFlow checks it
    return (
        f"-A {chain_name(run_id, 'OUT')}{src} -d {flow.peer.host}/32 -p tcp -m tcp "
        f"--sport {flow.local_port} --tcp-flags RST RST "
        f"{_comment(run_id, 'no RST to the peer host while kernel sockets punch')} -j DROP"
    )


def hook_rules(run_id: str) -> list[str]:
    """The jumps from INPUT/OUTPUT into the run's chains, inserted at the top."""
    return [
        f"-I {builtin} 1 {_comment(run_id, 'hook')} -j {chain_name(run_id, suffix)}"
        for builtin, suffix in _HOOKS
    ]


def render_apply(run_id: str, flow: PunchFlow) -> str:
    """``iptables-restore --noflush`` input that creates, fills and hooks the run's chains in one commit."""
    in_chain, out_chain = chain_names(run_id)
    if flow.kernel_sockets:
        rules = [icmp_drop_rule(run_id, flow), kernel_rst_rule(run_id, flow)]
    elif flow.all_ports:
        rules = [icmp_drop_rule(run_id, flow), capture_rule(run_id, flow), rst_rule(run_id, flow)]
    else:
        rules = [
            *icmp_capture_rules(run_id, flow),
            icmp_drop_rule(run_id, flow),
            capture_rule(run_id, flow),
            rst_rule(run_id, flow),
        ]
    lines = [
        "*filter",
        f":{in_chain} - [0:0]",
        f":{out_chain} - [0:0]",
        *rules,
        *hook_rules(run_id),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def render_stop_capture(run_id: str, flow: PunchFlow) -> str:
    """Input that empties the run's INPUT chain except for the ICMP drop: the queue rules go, atomically.

    Declaring an existing chain under --noflush flushes it (both backends).
    """
    in_chain, _ = chain_names(run_id)
    return "\n".join(["*filter", f":{in_chain} - [0:0]", icmp_drop_rule(run_id, flow), "COMMIT"]) + "\n"


def _filter_section(saved: str) -> list[str]:
    lines: list[str] = []
    inside = False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line == "*filter"
        elif inside and line != "COMMIT":
            lines.append(line)
    return lines


def runs_in_save(saved: str) -> dict[str, list[str]]:
    """Run id -> the rawpunch chains of that run found in ``iptables-save`` output (filter table)."""
    runs: dict[str, list[str]] = {}
    for line in _filter_section(saved):
        if line.startswith(":"):
            name = line[1:].split()[0]
            match = _CHAIN.match(name)
            if match:
                runs.setdefault(match["run"], []).append(name)
    return runs


def render_removal(run_id: str, saved: str) -> str | None:
    """Input that removes every trace of *run_id* found in *saved*, or None if there is none.

    Rules elsewhere that jump to the run's chains are deleted by their exact saved text (``-A`` -> ``-D``),
    then the chains are flushed and deleted, all in one commit.
    """
    ours = set(runs_in_save(saved).get(check_run_id(run_id), []))
    jump = re.compile(r"\s-[jg]\s+(\S+)")
    deletes: list[str] = []
    for line in _filter_section(saved):
        if not line.startswith("-A "):
            continue
        chain = line.split()[1]
        target = jump.search(line)
        if chain not in ours and target and target.group(1) in ours:
            deletes.append("-D " + line[3:])
    if not ours and not deletes:
        return None
    chains = sorted(ours)
    body = [*deletes, *(f"-F {c}" for c in chains), *(f"-X {c}" for c in chains)]
    return "\n".join(["*filter", *body, "COMMIT"]) + "\n"


# --- running iptables -------------------------------------------------------------------------------------


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise FirewallNeedsRootError(f"{what}: needs root (run with sudo)")


def _tools(backend: Backend) -> tuple[str, str] | None:
    """(save, restore) commands of *backend*, or None when it is not installed."""
    save, restore = f"iptables-{backend}-save", f"iptables-{backend}-restore"
    if shutil.which(save) and shutil.which(restore):
        return save, restore
    if shutil.which("iptables-save") and shutil.which("iptables-restore"):
        # Only the generic names: they are one backend, which `iptables -V` names.
        version = subprocess.run(["iptables-save", "-V"], capture_output=True, text=True, check=False).stdout
        if ("nf_tables" in version) == (backend == "nft"):
            return "iptables-save", "iptables-restore"
    return None


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS if _tools(b) is not None]


def _require_tools(backend: Backend) -> tuple[str, str]:
    tools = _tools(backend)
    if tools is None:
        raise FirewallError(f"iptables ({backend} backend) not found: {SETUP_HINT}")
    return tools


def _legacy_tables_exist() -> bool:
    # Reading the list never loads modules, unlike iptables-legacy-save; per network namespace.
    try:
        return bool(Path("/proc/thread-self/net/ip_tables_names").read_text().strip())
    except OSError:
        return False


def save(backend: Backend) -> str:
    """``iptables-save`` output of *backend* in this thread's network namespace ('' if it has no tables)."""
    if backend == "legacy" and not _legacy_tables_exist():
        return ""
    cmd = _require_tools(backend)[0]
    done = subprocess.run([cmd], capture_output=True, text=True, check=False, timeout=_TIMEOUT_S)
    if done.returncode != 0:
        raise FirewallError(f"{cmd} failed: {done.stderr.strip()}")
    return done.stdout


def _has_rules(backend: Backend) -> bool:
    return any(line.startswith("-A ") for line in save(backend).splitlines())


def detect_backend() -> Backend:
    """The backend that holds this namespace's rules: legacy only if it has rules and nft has none."""
    available = available_backends()
    if not available:
        raise FirewallError(f"iptables not found: {SETUP_HINT}")
    if available == ["legacy"]:
        return "legacy"
    if "legacy" in available and _has_rules("legacy") and not _has_rules("nft"):
        return "legacy"
    return "nft"


def restore(backend: Backend, text: str) -> None:
    """Apply *text* with ``iptables-restore --noflush --wait`` (one atomic commit per table)."""
    cmd = _require_tools(backend)[1]
    done = subprocess.run(
        [cmd, "--noflush", "--wait"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        timeout=_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise FirewallError(_explain(cmd, done.stderr.strip(), text))


def _explain(cmd: str, stderr: str, text: str) -> str:
    lowered = stderr.lower()
    if "nfqueue" in lowered or ("no chain/target/match" in lowered and "NFQUEUE" in text):
        return (
            f"{cmd}: the NFQUEUE target is not supported here (the kernel needs "
            f"CONFIG_NETFILTER_XT_TARGET_NFQUEUE and nfnetlink_queue): {stderr}"
        )
    if "u32" in lowered:
        return f"{cmd}: the u32 match is not supported here (CONFIG_NETFILTER_XT_MATCH_U32): {stderr}"
    if "permission denied" in lowered or "operation not permitted" in lowered:
        return f"{cmd}: needs root (CAP_NET_ADMIN): {stderr}"
    return f"{cmd} failed: {stderr}\ninput was:\n{text}"


def remove_run(backend: Backend, run_id: str) -> list[str]:
    """Remove the run's chains and jumps from *backend* in this namespace; return the chains removed."""
    saved = save(backend)
    text = render_removal(run_id, saved)
    if text is None:
        return []
    restore(backend, text)
    return runs_in_save(saved).get(run_id, [])


# --- run records ------------------------------------------------------------------------------------------


def netns_key() -> tuple[int, int]:
    """(device, inode) of this thread's network namespace."""
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class GuardRecord:
    """``/run/rawpunch/fw/<run>.json``: who owns a run's chains, where, and in which backend."""

    run_id: str
    owner_pid: int
    owner_start_time: int
    netns: tuple[int, int]
    backend: Backend
    chains: tuple[str, ...]
    flow: str
    created: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return FW_DIR / f"{self.run_id}.json"

    def owner_alive(self) -> bool:
        """True while the owner runs (``nsproc.process_alive``: same pid and start time, not a zombie)."""
        return process_alive(self.owner_pid, self.owner_start_time)


def write_record(record: GuardRecord) -> None:
    """Atomically (temp file + rename): a sweep never reads half a record."""
    FW_DIR.mkdir(parents=True, exist_ok=True)
    tmp = FW_DIR / f".{record.run_id}.json.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, record.path)


def read_records() -> list[GuardRecord]:
    """Every readable record; unreadable ones are logged and removed (they can protect nothing)."""
    records: list[GuardRecord] = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(FW_DIR.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                records.append(
                    GuardRecord(
                        run_id=check_run_id(str(data["run_id"])),
                        owner_pid=int(data["owner_pid"]),
                        owner_start_time=int(data["owner_start_time"]),
                        netns=(int(data["netns"][0]), int(data["netns"][1])),
                        backend="legacy" if data["backend"] == "legacy" else "nft",
                        chains=tuple(str(c) for c in data["chains"]),
                        flow=str(data["flow"]),
                        created=float(data["created"]),
                    )
                )
            except FileNotFoundError:
                continue  # removed by its owner while we listed
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("removing unreadable firewall record %s", path)
                path.unlink(missing_ok=True)
    return records


# --- sweeping ---------------------------------------------------------------------------------------------


#: Network namespaces this process has prepared (``prepare_host``): their backend; swept at that time.
_PREPARED: dict[tuple[int, int], Backend] = {}


def prepare_host() -> Backend:
    """A guard's start-up work, done ahead of time: check root and tools, detect the backend, and sweep
    the leftovers of dead runs. Each takes iptables-save calls (several ms); a punch does this while it
    registers, so that a guard applied later installs its rules with one iptables-restore and nothing
    else. Raises ``FirewallError`` (missing iptables, or not root) with what to do."""
    _require_root("rawpunch firewall guard")
    backend = detect_backend()
    _require_tools(backend)
    _sweep_logged()
    _PREPARED[netns_key()] = backend
    return backend


def _sweep_logged() -> None:
    for item in sweep_leftovers():
        log.info("removed leftover of a dead run: %s", item)


def sweep_leftovers() -> list[str]:
    """Remove, in this network namespace, the chains of runs whose owner process is gone.

    Looks in both backends. Chains are listed *before* records are read: a guard writes its record before
    its chains exist, so every chain seen belongs to a record that is already readable. Returns
    ``"<backend>:<chain>"`` for each chain removed and the path of each record removed.
    """
    _require_root("rawpunch firewall sweep")
    found = {backend: runs_in_save(save(backend)) for backend in available_backends()}
    records = read_records()
    alive = {r.run_id for r in records if r.owner_alive()}
    removed: list[str] = []
    for backend, runs in found.items():
        for run_id in runs:
            if run_id not in alive:
                removed += [f"{backend}:{chain}" for chain in remove_run(backend, run_id)]
    here = netns_key()
    for record in records:
        if record.run_id not in alive and record.netns == here:
            record.path.unlink(missing_ok=True)
            removed.append(str(record.path))
    return removed


def cleanup_all() -> list[str]:
    """``rawpunch cleanup``: sweep this namespace, then every other namespace a dead run's record names.

    A namespace is reached through a named netns (``/run/netns``) or any process inside it. A dead run whose
    namespace no longer exists took its rules with it: only its record is removed.
    """
    removed = sweep_leftovers()
    here = netns_key()
    dead = [r for r in read_records() if not r.owner_alive() and r.netns != here]
    for netns in dict.fromkeys(r.netns for r in dead):
        path = _netns_path(netns)
        if path is None:
            for record in (r for r in dead if r.netns == netns):
                record.path.unlink(missing_ok=True)
                removed.append(str(record.path))
            continue
        try:
            removed += run_in_netns(path, sweep_leftovers, (), _TIMEOUT_S)
        except (OSError, RuntimeError) as e:  # FirewallError is a RuntimeError
            log.warning("firewall sweep in network namespace %s failed: %s", path, e)
    return removed


def _netns_path(key: tuple[int, int]) -> str | None:
    """A path that opens the network namespace (device, inode): a named netns, or a process inside it."""
    candidates: Iterable[Path] = sorted(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else []
    for path in candidates:
        if _key(path) == key:
            return str(path)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            path = Path(f"/proc/{entry}/ns/net")
            if _key(path) == key:
                return str(path)
    return None


def _key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# --- the guard --------------------------------------------------------------------------------------------


class FirewallGuard:
    """The punch's rules for one flow, in the run's own chains; a context manager that always removes them.

    >>> flow = PunchFlow(40000, Endpoint("198.51.100.9", 40001), reader.queue_num)  # doctest: +SKIP
    >>> with FirewallGuard(flow):  # doctest: +SKIP
    ...     punch()
    """

    def __init__(
        self,
        flow: PunchFlow,
        *,
        run_id: str | None = None,
        backend: Backend | None = None,
        sweep: bool = True,
    ) -> None:
        self.flow = flow
        self.run_id = check_run_id(run_id) if run_id is not None else new_run_id()
        self.backend: Backend | None = backend
        self.sweep = sweep
        self._state = "new"  # new -> applied -> removed
        self._owner_pid = os.getpid()
        self._capturing = False

    def __repr__(self) -> str:
        return (
            f"FirewallGuard(run_id={self.run_id!r}, flow={self.flow}, backend={self.backend}, {self._state})"
        )

    @property
    def chains(self) -> tuple[str, str]:
        return chain_names(self.run_id)

    @property
    def active(self) -> bool:
        return self._state == "applied"

    @property
    def capturing(self) -> bool:
        """True while the NFQUEUE rule is in place."""
        return self.active and self._capturing

    def __enter__(self) -> FirewallGuard:
        self.apply()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.remove()
        except Exception as e:
            if exc is None:
                raise
            exc.add_note(f"firewall guard {self.run_id}: removal also failed: {e}")

    def apply(self) -> None:
        """Sweep dead runs' leftovers, record ownership, then install every rule in one commit."""
        self._prepare()
        self._own()
        self._install()

    async def apply_async(self) -> None:
        """``apply()`` with the subprocess work in threads, so it overlaps other waiting (READY/GO).

        Ownership is taken on the event loop's thread: signal handlers can only be installed from the
        main thread, and the loop normally runs there.
        """
        await asyncio.to_thread(self._prepare)
        self._own()
        await asyncio.to_thread(self._install)

    def _prepare(self) -> None:
        _require_root("rawpunch firewall guard")
        if self._state != "new":
            raise RuntimeError(f"firewall guard {self.run_id} was already applied ({self._state})")
        prepared = _PREPARED.get(netns_key())
        if self.backend is None:
            self.backend = prepared or detect_backend()
        _require_tools(self.backend)
        if self.sweep and prepared is None:
            _sweep_logged()

    def _own(self) -> None:
        assert self.backend is not None
        self._owner_pid = os.getpid()
        record = GuardRecord(
            run_id=self.run_id,
            owner_pid=self._owner_pid,
            owner_start_time=proc_start_time(self._owner_pid) or 0,
            netns=netns_key(),
            backend=self.backend,
            chains=self.chains,
            flow=f"{self.flow.local_host or '*'}:{self.flow.local_port} <-> {self.flow.peer or '*'}",
        )
        write_record(record)  # first: from here on a SIGKILL leaves something a sweep can find
        self._state = "applied"
        _register(self)

    def _install(self) -> None:
        assert self.backend is not None
        try:
            restore(self.backend, render_apply(self.run_id, self.flow))
        except BaseException:
            self.remove()
            raise
        self._capturing = True

    def stop_capture(self) -> None:
        """Remove only the NFQUEUE rule (after this side's splice: the socket must get its segments)."""
        if not self.capturing or os.getpid() != self._owner_pid:
            return
        assert self.backend is not None
        restore(self.backend, render_stop_capture(self.run_id, self.flow))
        self._capturing = False

    def remove(self) -> None:
        """Remove the chains, the jumps and the record; idempotent, safe from a signal handler.

        Only the process that applied the guard removes it (a forked child does nothing).
        """
        if self._state != "applied" or os.getpid() != self._owner_pid:
            return
        assert self.backend is not None
        try:
            remove_run(self.backend, self.run_id)
        finally:
            self._state = "removed"
            self._capturing = False
            _unregister(self)
        (FW_DIR / f"{self.run_id}.json").unlink(missing_ok=True)


# --- process-wide removal on signals and exit -------------------------------------------------------------


@dataclass
class _GuardState:
    live: list[FirewallGuard] = field(default_factory=list)
    atexit_registered: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


_State = _GuardState()
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def live_guards() -> tuple[FirewallGuard, ...]:
    return tuple(_State.live)


def remove_all() -> None:
    """Remove every live guard of this process (atexit, signal handlers)."""
    for guard in reversed(_State.live[:]):
        try:
            guard.remove()
        except Exception as e:  # keep going: the others must go too
            log.error("removing firewall guard %s failed: %s", guard.run_id, e)


def _register(guard: FirewallGuard) -> None:
    with _State.lock:
        _State.live.append(guard)
        if not _State.atexit_registered:
            atexit.register(remove_all)
            _State.atexit_registered = True
        _SIGNAL_GUARD.install()


def _unregister(guard: FirewallGuard) -> None:
    with _State.lock:
        with contextlib.suppress(ValueError):
            _State.live.remove(guard)
        if not _State.live:
            _SIGNAL_GUARD.remove()


_SIGNAL_GUARD = SignalGuard(_SIGNALS, remove_all)
