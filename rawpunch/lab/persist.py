"""Persistent labs: ``rawpunch lab up`` leaves a lab running after the command returns; ``lab down`` ends it.

A ``Lab`` lives exactly as long as the process that built it (netns.py tears it down on exit and on
SIGTERM/SIGHUP), and the registry judges a lab dead when that owner is gone. So ``lab up`` does not build the
lab itself: it starts a *supervisor*, ``python -m rawpunch.lab.persist SPEC``, in a new session (no
controlling terminal, so closing the terminal does not hang it up). The supervisor builds the lab under the
lab's name as run id, starts ``rawpunch server`` in the core if asked, adds a description of the lab to its
registry record (``info``), says ``ready`` on stdout and then sleeps until a signal. Everything else follows
from the existing machinery:

* it owns the userspace NAT and impairment daemons, which therefore run as long as the lab;
* SIGTERM (``lab down``) makes the Lab's guard tear everything down, then the supervisor exits;
* SIGKILL leaves a record whose owner is dead, which ``rawpunch lab clean`` / ``rawpunch cleanup`` remove
  like any killed run's.

The start handshake: ``lab up`` reads the supervisor's stdout for the ``ready`` line (bounded wait) and keeps
its stderr in a temporary file, whose last line is the reason when the build fails. Once ready, the supervisor
points its stdout and stderr at /dev/null: ``lab up`` exits, and a write into a pipe nobody reads would fail.

``lab down`` signals the supervisor through a pidfd (``pidfd_open(2)``: unlike a pid, it cannot come to name
another process) and waits on it for the exit, bounded; a supervisor that does not finish is SIGKILLed and its
leftovers are removed as ``lab clean`` would.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from rawpunch.lab.labspec import KIND, LabSpec, describe
from rawpunch.lab.netns import Lab, netns_name
from rawpunch.lab.nsproc import kill_netns_processes, list_netns, remove_netns, require_root
from rawpunch.lab.registry import RunRecord, read_record, read_records, remove_record, write_record

READY = "ready"
#: A lab with userspace NATs and impairment takes a few seconds to build; far longer on a loaded machine.
READY_TIMEOUT_S = 300.0
#: The supervisor's teardown: stop processes (1 s grace), undo rules, remove namespaces.
STOP_TIMEOUT_S = 60.0


class LabError(Exception):
    """A ``lab up/down/run/shell`` request that cannot be done; the message says why and what to do."""


# --- queries ------------------------------------------------------------------------------------------------


def lab_namespaces(name: str) -> list[str]:
    """The existing namespaces of lab *name* (``rp-<name>-*``; names have no '-', so the prefix is exact)."""
    return list_netns(netns_name(name, ""))


def running_labs() -> list[RunRecord]:
    """Records of the labs ``lab up`` started, alive or dead (a dead one awaits ``lab down``)."""
    records, _ = read_records()
    return [r for r in records if r.info.get("kind") == KIND]


def supervisor_state(record: RunRecord) -> str:
    alive = "running" if record.owner_alive() else "DEAD: remove with `rawpunch lab down`"
    return f"supervisor pid {record.owner_pid}, {alive}"


def node_netns(name: str, node: str) -> str:
    """The namespace of *node* in the live lab *name*; LabError naming the choices otherwise."""
    record = read_record(name)
    if record is None or not record.owner_alive():
        raise LabError(f"no running lab named {name!r}{_known_labs()}")
    ns = netns_name(name, node)
    if ns not in record.namespaces:
        nodes = ", ".join(n.removeprefix(netns_name(name, "")) for n in record.namespaces)
        raise LabError(f"lab {name} has no node {node!r} (nodes: {nodes})")
    return ns


def _known_labs() -> str:
    names = [r.run_id for r in running_labs()]
    return f" (labs: {', '.join(names)})" if names else " (`rawpunch lab up` starts one)"


# --- up -----------------------------------------------------------------------------------------------------


def check_free(name: str) -> None:
    record = read_record(name)
    if record is not None and record.owner_alive():
        raise LabError(
            f"lab name {name!r} is in use (owner pid {record.owner_pid}); pick another --name"
            + (f" or run `rawpunch lab down {name}`" if record.info.get("kind") == KIND else "")
        )
    if record is not None or lab_namespaces(name):
        raise LabError(
            f"lab name {name!r} is held by leftovers of a dead run; `rawpunch lab clean` removes them"
        )


def start(spec: LabSpec, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Start a supervisor for *spec* and return the lab's description once it is up; LabError if it is not."""
    require_root("rawpunch lab up")
    check_free(spec.name)
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rawpunch.lab.persist", spec.to_json()],
            cwd="/",  # a long-lived process must not keep the caller's directory busy
            env=_env_importing_rawpunch(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            with proc.stdout:
                line = _read_line(proc.stdout, timeout)
        except BaseException:  # Ctrl-C or a bug here: do not leave a half-started lab behind
            _terminate(proc)
            raise
        if not line.startswith(READY + " "):
            _terminate(proc)
            errors.seek(0)
            said = [ln for ln in errors.read().splitlines() if ln.strip()]
            reason = said[-1] if said else (line.strip() or f"no answer within {timeout:g} s")
            raise LabError(f"lab {spec.name} did not come up: {reason}")
    info: dict[str, Any] = json.loads(line[len(READY) + 1 :])
    return info


def _env_importing_rawpunch() -> dict[str, str]:
    """This environment, plus the directory this rawpunch is imported from (the supervisor runs in /)."""
    source = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{path}" if path else source}


def _read_line(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def _terminate(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the supervisor tears its lab down), SIGKILL if that takes too long."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- down ---------------------------------------------------------------------------------------------------


def stop(name: str, timeout: float = STOP_TIMEOUT_S) -> str:
    """Stop lab *name* and wait until its namespaces and record are gone; returns what was done."""
    require_root("rawpunch lab down")
    namespaces = lab_namespaces(name)  # before the record: see clean.py
    record = read_record(name)
    if record is None and not namespaces:
        raise LabError(f"no lab named {name!r}{_known_labs()}")
    if record is not None and record.info.get("kind") != KIND:
        raise LabError(
            f"lab {name} was not started by `rawpunch lab up` (owner pid {record.owner_pid}); "
            "stop its program, or `rawpunch lab clean` if that died"
        )
    done = f"lab {name} is down"
    if record is not None and record.owner_alive():
        if not _stop_owner(record, timeout):
            done += f" (its supervisor did not finish within {timeout:g} s and was killed)"
    else:
        done += " (its supervisor was already gone; removed what it left)"
    _remove_leftovers(name)
    return done


def _stop_owner(record: RunRecord, timeout: float) -> bool:
    """SIGTERM the supervisor and wait for its exit; SIGKILL after *timeout*. True if it ended by itself."""
    try:
        pidfd = os.pidfd_open(record.owner_pid)
    except ProcessLookupError:
        return True
    try:
        if not record.owner_alive():  # the pid was reused between reading the record and opening the pidfd
            return True
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if select.select([pidfd], [], [], timeout)[0]:
            return True
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], timeout)
        return False
    finally:
        os.close(pidfd)


def _remove_leftovers(name: str) -> None:
    """What a supervisor that died (or was killed) left: processes in the namespaces, namespaces, record."""
    namespaces = lab_namespaces(name)
    kill_netns_processes(namespaces)
    for ns in namespaces:
        remove_netns(ns)
    survivors = lab_namespaces(name)
    if survivors:
        raise LabError(
            f"lab {name}: cannot remove namespaces {', '.join(survivors)}; try `rawpunch lab clean`"
        )
    remove_record(name)


# --- run, shell ---------------------------------------------------------------------------------------------


def exec_in_node(name: str, node: str, argv: list[str]) -> NoReturn:
    """Replace this process with *argv* in the node: the exit status, signals and terminal pass through."""
    require_root("rawpunch lab run")
    ns = node_netns(name, node)
    env = {**os.environ, "RAWPUNCH_LAB": name, "RAWPUNCH_NODE": node}
    os.execvpe("ip", ["ip", "netns", "exec", ns, *argv], env)


def exec_shell(name: str, node: str) -> NoReturn:
    """An interactive shell in the node whose prompt names lab and node (after the user's own ~/.bashrc)."""
    require_root("rawpunch lab shell")
    ns = node_netns(name, node)
    prompt = f"[lab {name}:{node}] \\w\\$ "
    env = {**os.environ, "RAWPUNCH_LAB": name, "RAWPUNCH_NODE": node, "PS1": prompt}
    bash = shutil.which("bash")
    if bash is None:
        os.execvpe("ip", ["ip", "netns", "exec", ns, "sh", "-i"], env)
    # The rc file comes through a pipe: nothing on disk to remove once this process has become the shell.
    rc = f"[ -f ~/.bashrc ] && . ~/.bashrc\nPS1='{prompt}'\n"
    read_fd, write_fd = os.pipe()
    os.write(write_fd, rc.encode())
    os.close(write_fd)
    os.set_inheritable(read_fd, True)
    os.execvpe("ip", ["ip", "netns", "exec", ns, bash, "--rcfile", f"/dev/fd/{read_fd}", "-i"], env)


# --- the supervisor -----------------------------------------------------------------------------------------


class _Stop(BaseException):
    """Raised by the supervisor's signal handler; BaseException so that no ``except Exception`` eats it."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def supervise(spec: LabSpec) -> int:
    """Build the lab, publish it, say ready, sleep until SIGTERM; the Lab tears down on every way out."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)  # the Lab's guard, installed by build(), runs first and chains here
    try:
        with Lab(spec.topology(), run_id=spec.name) as lab:
            server = None
            if spec.server:
                from rawpunch.lab.scenario import start_server  # noqa: PLC0415 - only with --server

                server = str(start_server(lab).endpoint)
            info = describe(spec, lab.topology, lab.namespaces, server)
            record = read_record(spec.name)
            if record is None:
                raise RuntimeError(f"the registry record of lab {spec.name} vanished")
            write_record(replace(record, info=info))
            print(READY, json.dumps(info), flush=True)
            _detach_stdio()
            while True:
                signal.pause()
    except _Stop:
        return 0
    except Exception as e:
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr, flush=True)
        return 1


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(
            "usage: python -m rawpunch.lab.persist SPEC_JSON (started by `rawpunch lab up`)", file=sys.stderr
        )
        return 2
    return supervise(LabSpec.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
