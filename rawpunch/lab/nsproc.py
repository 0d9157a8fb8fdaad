"""Namespace and process primitives shared by the lab builder and the cleaner.

A named network namespace is a bind mount of an nsfs inode at ``/run/netns/<name>`` (iproute2's convention,
which pyroute2 follows). A process is inside it when ``/proc/<pid>/ns/net`` has the same (device, inode):
that is how the lab finds every process left in its namespaces, whoever started it, before removing them.
Removing the mount alone would not free the namespace while a process still holds it: its veths and any
traffic generator would live on, detached and invisible to ``ip netns list``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
#: Every lab namespace is called ``rp-<run id>-<node>``.
LAB_PREFIX = "rp-"
RUN_DIR = Path("/run/rawpunch")
_CREATE_LOCK = RUN_DIR / "netns.lock"


def _pr_netns() -> ModuleType:
    # Imported on use: pyroute2 costs ~0.1 s, and the CLI imports this module for every command.
    from pyroute2 import netns  # noqa: PLC0415

    module: ModuleType = netns
    return module


class NeedsRootError(PermissionError):
    """Raised by lab actions that need root (namespaces, iptables)."""


def require_root(what: str) -> None:
    """Raise NeedsRootError("<what>: needs root (run with sudo)") unless running as root."""
    if os.geteuid() != 0:
        raise NeedsRootError(f"{what}: needs root (run with sudo)")


def list_netns(prefix: str = LAB_PREFIX) -> list[str]:
    """Named network namespaces whose name starts with *prefix*, sorted."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _ns_key(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # gone, or a process that exited meanwhile (zombies have no namespaces)
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes inside each of the named namespaces (never this process itself)."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        key = _ns_key(NETNS_DIR / name)
        if key is not None:
            wanted[key] = name
    result: dict[str, list[int]] = {}
    if not wanted:
        return result
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        key = _ns_key(f"/proc/{entry}/ns/net")
        if key in wanted:
            result.setdefault(wanted[key], []).append(int(entry))
    return result


def kill_netns_processes(names: Iterable[str], timeout: float = 3.0) -> list[int]:
    """SIGKILL every process inside the namespaces and wait (bounded) until none is left; return the pids."""
    names = list(names)
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for group in pids_in_netns(names).values() for pid in group]
        if not pids:
            return sorted(killed)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} survived SIGKILL in namespaces {names}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        # A killed process drops its namespaces when it exits, zombie or not: no reaping needed (and reaping
        # would steal exit statuses from subprocess.Popen objects of the caller).
        time.sleep(0.01)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on *path* (created if missing) across processes for the block."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _creation_lock() -> Iterator[None]:
    # The first namespace ever created makes /run/netns a shared mount; two processes doing that at once
    # (pytest-xdist) could stack bind mounts. A short exclusive lock serialises just the creation.
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(_CREATE_LOCK):
        yield


def create_netns(name: str) -> None:
    """Create the named namespace; fails if it exists."""
    if (NETNS_DIR / name).exists():
        raise FileExistsError(f"network namespace {name!r} already exists")
    with _creation_lock():
        _pr_netns().create(name)


def remove_netns(name: str) -> bool:
    """Unmount and unlink the named namespace; False when it did not exist."""
    if not (NETNS_DIR / name).exists():
        return False
    with contextlib.suppress(FileNotFoundError):
        _pr_netns().remove(name)
    return not (NETNS_DIR / name).exists()


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and on of /proc/<pid>/stat (proc(5)), or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot (field 22 of /proc/<pid>/stat), or None if it is gone.

    A pid alone does not identify a process (pids are reused); pid plus start time does.
    """
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def proc_exited(pid: int) -> bool:
    """*pid* is gone or a zombie (state Z or X, field 3): it runs nothing and cleans up nothing any more."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def process_alive(pid: int, start_time: int) -> bool:
    """The process that recorded (*pid*, *start_time*) still runs: same pid *and* start time (pids are
    reused), and not a zombie (pid 1 of a container or a minimal init may never reap it)."""
    return proc_start_time(pid) == start_time and not proc_exited(pid)


def run_in_netns(netns: str, fn: Callable[..., T], args: tuple[Any, ...], timeout: float) -> T:
    """Run ``fn(*args)`` in a forked child that entered *netns*; return its result or re-raise its exception.

    The result (or exception) travels back pickled, so it must be picklable; *fn* itself is not pickled (fork
    copies it). The child exits with os._exit: no atexit handlers, no lab teardown, no flushed parent buffers.
    """
    pr_netns = _pr_netns()  # import before forking, not in every child
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        _child(pr_netns, netns, fn, args, write_fd)
    os.close(write_fd)
    try:
        payload = _read_all(read_fd, pid, timeout, netns)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError(f"child in {netns} died without a result (wait status {status})")
    kind, value, child_tb = pickle.loads(payload)
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    exc: BaseException = value
    exc.add_note(f"raised in network namespace {netns}:\n{child_tb}")
    raise exc


def _child(
    pr_netns: ModuleType, netns: str, fn: Callable[..., Any], args: tuple[Any, ...], write_fd: int
) -> None:  # pragma: no cover
    # The parent's handlers (e.g. the lab's SIGTERM teardown) must not run in the child.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        pr_netns.setns(netns, flags=0)  # flags=0: never create a namespace that has vanished
        result: tuple[str, Any, str] = ("ok", fn(*args), "")
        data = pickle.dumps(result)
    except BaseException as e:
        tb = traceback.format_exc()
        # SystemExit/KeyboardInterrupt re-raised in the parent would end the parent: report, do not relay.
        relayed = e if isinstance(e, Exception) else RuntimeError(f"{type(e).__name__} {e}".strip())
        try:
            data = pickle.dumps(("err", relayed, tb))
        except Exception:
            unpicklable = RuntimeError(f"{type(e).__name__}: {e} (exception not picklable)")
            data = pickle.dumps(("err", unpicklable, tb))
    try:
        with open(write_fd, "wb") as out:
            out.write(data)
    finally:
        os._exit(0)


def _read_all(fd: int, pid: int, timeout: float, netns: str) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            raise TimeoutError(f"call in network namespace {netns} did not finish within {timeout} s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
