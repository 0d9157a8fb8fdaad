"""Build a Topology out of Linux network namespaces, run things in its nodes, and always tear it down.

One namespace per node, ``rp-<run id>-<node>``, veth pairs created directly between the two namespaces
(nothing is ever created in, or routed through, the host's namespace), addresses, routes, sysctls, then the
NAT profiles' iptables rules applied atomically with ``iptables-restore`` inside each NAT's namespace, and
the core routers' impairments.

Some nodes run a daemon the lab starts and stops: the userspace NAT of a ``backend="userspace"`` profile
(usernat.py) and the NFQUEUE impairment of a router where netem is missing (impair.py). Each is started
with ``LabNode.popen`` and must print ``ready`` (its queue is bound) before the rules that feed its queue are
applied; its stderr goes to a log file the lab keeps (``Lab.daemon_log``).

Teardown runs on every exit path: ``__exit__`` (normal end, exception, Ctrl-C), a SIGTERM/SIGHUP handler and
an atexit hook in the owner process. It stops the processes the lab started, undoes the NAT rules, SIGKILLs
whatever else is still inside the lab's namespaces (found by namespace inode, see nsproc) and removes the
namespaces and the run's registry record. A SIGKILLed owner cannot clean up: ``rawpunch lab clean``
(clean.clean_labs) finds such runs through the registry.

Forked children (``call``, pyroute2's helpers) inherit the handlers; teardown only ever runs in the process
that built the lab.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import IPRoute

from rawpunch.exitguard import SignalGuard
from rawpunch.lab import impair
from rawpunch.lab.nsproc import (
    LAB_PREFIX,
    NETNS_DIR,
    create_netns,
    kill_netns_processes,
    remove_netns,
    require_root,
    run_in_netns,
)
from rawpunch.lab.profiles import get_profile
from rawpunch.lab.registry import new_record, record_path, remove_record, write_record
from rawpunch.lab.router import node_sysctls, usernat_args
from rawpunch.lab.topology import Topology

T = TypeVar("T")
log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-z]{1,12}$")
#: How long a process the lab started gets between SIGTERM and SIGKILL at teardown.
STOP_GRACE_S = 1.0
#: How long a daemon (userspace NAT, impairment) may take to bind its queue and say ``ready``.
DAEMON_START_S = 20.0
READY_LINE = "ready"


def new_run_id() -> str:
    """A short random hex id; unique enough for concurrent runs on one machine (32 bits)."""
    return secrets.token_hex(4)


def netns_name(run_id: str, node: str) -> str:
    return f"{LAB_PREFIX}{run_id}-{node}"


def _apply_sysctls(settings: dict[str, str]) -> None:
    """Runs inside the namespace: /proc/sys/net belongs to the namespace of the process that opens it."""
    for key, value in settings.items():
        path = Path("/proc/sys") / key
        if key.startswith("net/ipv6/") and not path.exists():
            continue  # kernel without IPv6: nothing to disable
        path.write_text(value)


class LabNode:
    """A handle on one node of a running lab: run commands, start processes and call Python inside it."""

    def __init__(self, lab: Lab, name: str) -> None:
        topo = lab.topology
        node = topo.node(name)
        self.lab = lab
        self.name = name
        self.role = node.role
        self.netns = lab.netns_name(name)
        self.address: IPv4Address = topo.address(name)
        self.public_address: IPv4Address | None = topo.public_address(name) if node.role == "nat" else None

    def __repr__(self) -> str:
        return f"LabNode({self.name!r}, netns={self.netns!r}, address={self.address})"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not a string")
        self.lab.require_running()
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the node and wait; text output is captured. With check, stderr is in the error."""
        try:
            return subprocess.run(
                self._argv(argv), capture_output=True, text=True, check=check, timeout=timeout, input=input
            )
        except subprocess.CalledProcessError as e:
            e.add_note(f"in {self.name} ({self.netns}); stderr: {(e.stderr or '').strip()}")
            raise

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the node. The lab terminates it (and its process group) at teardown.

        It gets its own session unless start_new_session is given, so teardown can stop its children too.
        """
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), **kwargs)
        self.lab.track(proc, own_group=bool(kwargs["start_new_session"]))
        return proc

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run ``fn(*args)`` in a forked child inside the node; return its result or re-raise its exception.

        Result and exception must be picklable. On timeout the child is killed and TimeoutError raised.
        """
        self.lab.require_running()
        return run_in_netns(self.netns, fn, args, timeout)


class Lab:
    """A topology built in network namespaces; a context manager that always tears it down.

    >>> with Lab(two_nats()) as lab:                                      # doctest: +SKIP
    ...     lab.node("a").run(["ping", "-c1", str(lab.node("server").address)])
    """

    def __init__(self, topology: Topology, run_id: str | None = None) -> None:
        if run_id is None:
            run_id = new_run_id()
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run id {run_id!r}: use 1-12 of [0-9a-z] (it becomes part of namespace names)")
        self.topology = topology
        self.run_id = run_id
        self.namespaces: dict[str, str] = {n.name: netns_name(run_id, n.name) for n in topology.nodes}
        self._state = "new"  # new -> building -> running -> closed
        self._owner_pid = os.getpid()  # set again by build(): only the builder tears down
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []
        self._nats_configured: list[str] = []
        self._impaired: list[tuple[str, str]] = []  # (router, "netem" | "userspace")
        self._daemon_logs: dict[str, Any] = {}  # node -> log file of its daemon

    def __repr__(self) -> str:
        return f"Lab(run_id={self.run_id!r}, nodes={list(self.namespaces)}, state={self._state})"

    # --- context manager ---------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as teardown_error:
            # Do not mask the body's exception; attach the teardown failure to it instead.
            exc.add_note(f"lab {self.run_id} teardown also failed: {teardown_error}")

    # --- access ------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._state == "running"

    def require_running(self) -> None:
        if self._state not in ("building", "running"):
            raise RuntimeError(f"lab {self.run_id} is {self._state}, not running")

    def netns_name(self, node: str) -> str:
        try:
            return self.namespaces[node]
        except KeyError:
            raise KeyError(
                f"no node {node!r} in lab {self.run_id} (nodes: {', '.join(self.namespaces)})"
            ) from None

    def node(self, name: str) -> LabNode:
        self.netns_name(name)
        return LabNode(self, name)

    @property
    def nodes(self) -> tuple[LabNode, ...]:
        return tuple(LabNode(self, n) for n in self.namespaces)

    @property
    def impairments(self) -> dict[str, str]:
        """The routers that impair traffic and how: ``"netem"`` or ``"userspace"``."""
        return dict(self._impaired)

    def track(self, proc: subprocess.Popen[Any], own_group: bool) -> None:
        """Make teardown stop *proc* (and its process group when it leads one)."""
        self._procs.append((proc, own_group))

    # --- build -------------------------------------------------------------------------------------------

    def build(self) -> None:
        """Create namespaces, links, addresses, routes, sysctls and NAT rules. On any failure, tear down."""
        require_root("rawpunch lab")
        if self._state != "new":
            raise RuntimeError(f"lab {self.run_id} was already built ({self._state})")
        taken = [ns for ns in self.namespaces.values() if (NETNS_DIR / ns).exists()]
        if taken or record_path(self.run_id).exists():
            raise FileExistsError(
                f"lab run id {self.run_id} is in use (namespaces: {taken or 'registry only'})"
            )
        self._state = "building"
        self._owner_pid = os.getpid()
        _register_live(self)
        try:
            # The record comes first: from here on, a SIGKILL leaves something clean_labs can find.
            write_record(new_record(self.run_id, tuple(self.namespaces.values())))
            for ns in self.namespaces.values():
                create_netns(ns)
            for node in self.topology.nodes:
                settings = node_sysctls(node.role, get_profile(node.profile) if node.profile else None)
                run_in_netns(self.namespaces[node.name], _apply_sysctls, (settings,), 10.0)
            self._build_network()
            for node in self.topology.nodes:
                if node.role == "nat":
                    self._configure_nat(node.name)
                elif node.impairment is not None and node.impairment.active:
                    self._configure_impairment(node.name, node.impairment)
        except BaseException:
            self.close()
            raise
        self._state = "running"

    def _build_network(self) -> None:
        iprs: dict[str, Any] = {}
        try:
            for node, ns in self.namespaces.items():
                iprs[node] = IPRoute(netns=ns, flags=0)  # flags=0: never create a namespace implicitly
            for node in self.namespaces:
                _link_up(iprs[node], "lo")
            for link in self.topology.links:
                # The peer is created straight inside b's namespace: no interface ever exists in the host's.
                iprs[link.a].link(
                    "add",
                    ifname=link.a_ifname,
                    kind="veth",
                    peer={"ifname": link.b_ifname, "net_ns_fd": self.namespaces[link.b]},
                )
            for node in self.namespaces:
                for iface in self.topology.interfaces(node):
                    ipr = iprs[node]
                    index = ipr.link_lookup(ifname=iface.ifname)[0]
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(iface.address.ip),
                        prefixlen=iface.address.network.prefixlen,
                    )
                    ipr.link("set", index=index, state="up")
            for node in self.namespaces:
                for route in self.topology.routes(node):
                    iprs[node].route("add", dst=str(route.dest), gateway=str(route.gateway))
        finally:
            for ipr in iprs.values():
                ipr.close()

    def _configure_nat(self, name: str) -> None:
        profile = get_profile(self.topology.node(name).profile or "")
        if profile.backend == "userspace":
            public, lan = self.topology.public_address(name), self.topology.address(name)
            self._start_daemon(name, "rawpunch.lab.usernat", usernat_args(profile, public, lan))
        self._nats_configured.append(name)
        self.node(name).run(["iptables-restore", "-w"], input=profile.iptables_restore(lan="lan", wan="wan"))

    def _configure_impairment(self, name: str, imp: impair.Impairment) -> None:
        """netem on every interface of the router where the kernel has it, else the userspace queue."""
        if imp.backend != "userspace" and self._try_netem(name, imp):
            return
        if imp.backend == "netem":
            raise RuntimeError(f"lab {self.run_id}: {name}: netem is not available in this kernel")
        self._start_daemon(
            name, "rawpunch.lab.impair", ["--queue", str(impair.IMPAIR_QUEUE), *imp.process_args()]
        )
        self._impaired.append((name, "userspace"))
        self.node(name).run(["iptables-restore", "-w"], input=impair.iptables_restore(imp))

    def _try_netem(self, name: str, imp: impair.Impairment) -> bool:
        """netem on each of the router's interfaces; False (nothing installed) if the kernel lacks it."""
        ifnames = [i.ifname for i in self.topology.interfaces(name)]
        for index, ifname in enumerate(ifnames):
            argv = ["tc", "qdisc", "replace", "dev", ifname, "root", "netem", *imp.netem_args()]
            result = self.node(name).run(argv, check=index > 0)
            if result.returncode != 0:
                log.info(
                    "lab %s: %s: no netem (%s); userspace impairment",
                    self.run_id,
                    name,
                    result.stderr.strip(),
                )
                return False
            if index == 0:
                self._impaired.append((name, "netem"))
        return True

    def _start_daemon(self, name: str, module: str, args: list[str]) -> subprocess.Popen[str]:
        """``python -m module args`` in node *name*; returns once it said ``ready`` (its queue is bound)."""
        logfile = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed at teardown, read by daemon_log
        self._daemon_logs[name] = logfile
        proc = self.node(name).popen(
            [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=logfile, text=True
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], DAEMON_START_S)
        line = proc.stdout.readline().strip() if ready else ""
        if line != READY_LINE:
            raise RuntimeError(
                f"lab {self.run_id}: {module} did not start in {name} within {DAEMON_START_S:g} s "
                f"(said {line!r}):\n{self.daemon_log(name)}"
            )
        return proc

    def daemon_log(self, name: str) -> str:
        """What the daemon of node *name* (userspace NAT or impairment) wrote to stderr so far."""
        logfile = self._daemon_logs.get(name)
        if logfile is None or logfile.closed:
            return ""
        logfile.flush()
        logfile.seek(0)
        text: str = logfile.read()
        return text

    # --- teardown ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Tear everything down; idempotent, and safe to re-enter from a signal handler.

        Raises RuntimeError if a namespace survived (then its registry record is kept for clean_labs).
        """
        if self._state == "closed" or os.getpid() != self._owner_pid:
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._stop_processes()
        self._undo_nat_rules()
        self._undo_impairments()
        for logfile in self._daemon_logs.values():
            logfile.close()
        namespaces = [ns for ns in self.namespaces.values() if (NETNS_DIR / ns).exists()]
        try:
            kill_netns_processes(namespaces)
        except TimeoutError as e:
            log.error("lab %s: %s", self.run_id, e)
        for ns in namespaces:
            try:
                remove_netns(ns)
            except OSError as e:
                log.error("lab %s: cannot remove namespace %s: %s", self.run_id, ns, e)
        survivors = [ns for ns in self.namespaces.values() if (NETNS_DIR / ns).exists()]
        if not survivors:
            remove_record(self.run_id)
        self._state = "closed"
        _unregister_live(self)
        if survivors:
            raise RuntimeError(f"lab {self.run_id}: namespaces survived teardown: {', '.join(survivors)}")

    def _stop_processes(self) -> None:
        procs, self._procs = self._procs, []
        for proc, own_group in procs:
            _signal_proc(proc, own_group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S  # one grace period for all, not one each
        for proc, own_group in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                _signal_proc(proc, own_group, signal.SIGKILL)
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def _undo_impairments(self) -> None:
        impaired, self._impaired = self._impaired, []
        for name, backend in impaired:
            if backend == "netem":
                for iface in self.topology.interfaces(name):
                    self._undo(name, ["tc", "qdisc", "del", "dev", iface.ifname, "root"], None)
            else:
                self._undo(name, ["iptables-restore", "-w"], impair.iptables_undo())

    def _undo(self, name: str, argv: list[str], text: str | None) -> None:
        """Run an undo command in node *name* if its namespace still exists; failures are logged."""
        if not (NETNS_DIR / self.namespaces[name]).exists():
            return
        undo = subprocess.run(
            ["ip", "netns", "exec", self.namespaces[name], *argv],
            input=text,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if undo.returncode != 0:
            log.warning("lab %s: undo %s on %s failed: %s", self.run_id, argv[0], name, _why(undo))

    def _undo_nat_rules(self) -> None:
        # mininet style: a NAT removes what it installed, even though removing the namespace would drop it
        # too.
        nats, self._nats_configured = self._nats_configured, []
        for name in nats:
            profile = get_profile(self.topology.node(name).profile or "")
            self._undo(name, ["iptables-restore", "-w"], profile.iptables_undo())


def _why(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command's own words, or how it ended: a Ctrl-C reaches the whole process group, and an
    interrupted undo has nothing on stderr."""
    if done.stderr.strip():
        return str(done.stderr.strip())
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name} (the namespace goes with the lab anyway)"
    return f"exit status {done.returncode}"


def _link_up(ipr: Any, ifname: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")


def _signal_proc(proc: subprocess.Popen[Any], own_group: bool, sig: signal.Signals) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if own_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


# --- process-wide teardown guard ----------------------------------------------------------------------------


@dataclass
class _GuardState:
    """Process-wide teardown state: the live labs, and the signal handlers the guard replaced."""

    live: list[Lab] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    atexit_registered: bool = False


_Guard = _GuardState()


_GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def created_run_ids() -> tuple[str, ...]:
    """Run ids of every lab this process has started building (for leak checks in test sessions)."""
    return tuple(_Guard.created)


def live_labs() -> tuple[Lab, ...]:
    return tuple(_Guard.live)


def _register_live(lab: Lab) -> None:
    _Guard.live.append(lab)
    _Guard.created.append(lab.run_id)
    if not _Guard.atexit_registered:
        atexit.register(teardown_all)
        _Guard.atexit_registered = True
    _SIGNAL_GUARD.install()


def _unregister_live(lab: Lab) -> None:
    with contextlib.suppress(ValueError):
        _Guard.live.remove(lab)
    if not _Guard.live:
        _SIGNAL_GUARD.remove()


def teardown_all() -> None:
    """Close every live lab of this process (atexit, signal handler)."""
    for lab in reversed(_Guard.live[:]):
        try:
            lab.close()
        except Exception as e:  # keep going: the other labs must go too
            log.error("teardown of lab %s failed: %s", lab.run_id, e)


_SIGNAL_GUARD = SignalGuard(_GUARDED_SIGNALS, teardown_all)
