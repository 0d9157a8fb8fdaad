"""The docker-compose lab end to end: a private dockerd, the locally built image, one topology up, the NAT
self-test and a punch inside it, and the host left exactly as it was.

The test starts its own dockerd (``--iptables=false --ip-forward=false --bridge=none``, data, exec root,
pidfile and socket in a temp dir), so it never touches a system docker nor the host's firewall or
forwarding; it skips, saying why, only where that dockerd cannot start. The image comes from
``scripts/lab-image`` (debootstrap once, then a cached tarball under /var/cache/rawpunch). Every network
of the compose files is ``internal``; the test traffic stays between the topology's containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import docker
import pytest

from rawpunch.lab.compose import FAMILIES, ComposeLab, compose_command, family_path, family_topology
from rawpunch.lab.nsproc import pids_in_netns
from rawpunch.lab.scenario import RAWPUNCH, start_server
from rawpunch.lab.selftest import run_selftest
from rawpunch.lab.topology import Link, Node, Topology

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
FAMILY = "eim-apdf"
DOCKERD_START_S = 60.0
DOCKERD_STOP_S = 30.0
IMAGE_BUILD_S = 900.0
PUNCH_TIMEOUT_S = 90.0


def _host_state(marker: str) -> dict[str, Any]:
    """What the compose lab must not change on the host (interfaces, firewall, sysctls, mounts, processes)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    # Other test workers may run their own dockerd meanwhile: only bridges this one made, and veths that
    # belong to no bridge, are attributable here.
    orphans = {
        line.split(":")[1].strip().split("@")[0]
        for line in links.splitlines()
        if line.split(":")[1].strip().startswith("veth") and " master " not in line
    }
    firewall = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    rules = sorted(line for line in firewall.splitlines() if line and not line.startswith(("#", ":")))
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if marker in line]
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    procs.append(entry.name)
    sysctls = {
        key: Path("/proc/sys", key).read_text().strip()
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables")
        if Path("/proc/sys", key).exists()
    }
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    return {
        "links": names,
        "orphan_veths": orphans,
        "iptables": rules,
        "mounts": mounts,
        "procs": procs,
        "sysctls": sysctls,
    }


#: What dockerd creates outside its data and exec roots whatever its flags say (20.10: a trust key, and the
#: plugin discovery directory); the fixture removes whichever of them did not exist before.
DOCKERD_SIDE_FILES = (Path("/etc/docker/key.json"), Path("/run/docker/plugins"), Path("/run/docker"))


def _remove_side_files(existed: set[Path]) -> None:
    for path in DOCKERD_SIDE_FILES:
        if path in existed or not path.exists():
            continue
        with contextlib.suppress(OSError):  # a directory another dockerd still uses is not empty: kept
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


@dataclass
class Dockerd:
    proc: subprocess.Popen[bytes]
    workdir: Path
    host: str  # DOCKER_HOST
    bridges: set[str] = field(default_factory=set)  # host bridges of the networks it made

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}


def _start_dockerd(workdir: Path) -> Dockerd:
    sock = workdir / "docker.sock"
    log = (workdir / "dockerd.log").open("wb")
    # containerd namespaces must match [A-Za-z0-9]+([._-][A-Za-z0-9]+)*; mkdtemp's names may hold "_".
    tag = "".join(c for c in workdir.name if c.isalnum())
    argv = [
        "dockerd",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        "--userland-proxy=false",
        f"--data-root={workdir / 'data'}",
        f"--exec-root={workdir / 'exec'}",
        f"--pidfile={workdir / 'dockerd.pid'}",
        f"--host=unix://{sock}",
        f"--containerd-namespace=rawpunch-{tag}",
        f"--containerd-plugins-namespace=rawpunch-{tag}-plugins",
    ]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    dockerd = Dockerd(proc, workdir, f"unix://{sock}")
    deadline = time.monotonic() + DOCKERD_START_S
    while proc.poll() is None and time.monotonic() < deadline:
        if sock.exists():
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=dockerd.host, timeout=10)
                try:
                    if client.ping():
                        return dockerd
                finally:
                    client.close()
        time.sleep(0.2)  # dockerd has no readiness signal but its API
    _stop_dockerd(dockerd)
    tail = (workdir / "dockerd.log").read_text(errors="replace")[-2000:]
    pytest.skip(f"dockerd cannot start here (exit {proc.returncode}):\n{tail}")


def _remove_everything(dockerd: Dockerd) -> None:
    """Containers and networks go before dockerd stops: a network's bridge outlives a stopped daemon."""
    client = docker.DockerClient(base_url=dockerd.host, timeout=60)
    try:
        for container in client.containers.list(all=True):
            container.remove(force=True)
        client.networks.prune()
    finally:
        client.close()


def _stop_dockerd(dockerd: Dockerd) -> None:
    if dockerd.proc.poll() is None:
        dockerd.proc.send_signal(signal.SIGTERM)
        try:
            dockerd.proc.wait(timeout=DOCKERD_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(dockerd.proc.pid, signal.SIGKILL)
            dockerd.proc.wait()
    marker = str(dockerd.workdir)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mountpoint = line.split()[4]
        if mountpoint.startswith(marker):
            subprocess.run(["umount", "-l", mountpoint], check=False)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    if shutil.which("dockerd") is None:
        pytest.skip(
            "dockerd cannot start: it is not installed (apt-get install docker.io; scripts/setup does)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="rp-dockerd-"))  # short: the socket path must fit sun_path
    before = _host_state(str(workdir))
    side_files = {path for path in DOCKERD_SIDE_FILES if path.exists()}
    try:
        daemon = _start_dockerd(workdir)
    except BaseException:  # pytest.skip included: what the failed start made goes too
        shutil.rmtree(workdir, ignore_errors=True)
        _remove_side_files(side_files)
        raise
    try:
        yield daemon
    finally:
        try:
            _remove_everything(daemon)
        finally:
            _stop_dockerd(daemon)
            shutil.rmtree(workdir, ignore_errors=True)
            _remove_side_files(side_files)
    after = _host_state(str(workdir))
    leaked = {
        "bridges": sorted(daemon.bridges & after["links"]),
        "veths": sorted(after["orphan_veths"] - before["links"]),
        "iptables rules": sorted(set(after["iptables"]) ^ set(before["iptables"])),
        "mounts": after["mounts"],
        "processes": after["procs"],
        "sysctls": {k: v for k, v in after["sysctls"].items() if before["sysctls"].get(k) != v},
        "files": [str(p) for p in DOCKERD_SIDE_FILES if p.exists() and p not in side_files],
    }
    leaked = {k: v for k, v in leaked.items() if v}
    assert not leaked, f"the compose lab changed the host: {leaked}"


@pytest.fixture(scope="module")
def project(dockerd: Dockerd) -> str:
    """The image is in the private dockerd; returns a compose project name unique to this run."""
    try:
        compose_command()
    except RuntimeError as e:
        pytest.fail(str(e))  # installed by scripts/setup: missing is a setup bug, not a reason to skip
    image = subprocess.run(
        [str(ROOT / "scripts" / "lab-image")],
        env=dockerd.env,
        capture_output=True,
        text=True,
        timeout=IMAGE_BUILD_S,
        check=False,
    )
    assert image.returncode == 0, f"scripts/lab-image failed:\n{image.stderr}"
    return "rp" + "".join(c for c in dockerd.workdir.name.rsplit("-", 1)[-1].lower() if c.isalnum())


@contextlib.contextmanager
def _compose_lab(dockerd: Dockerd, project: str, family: str) -> Iterator[ComposeLab]:
    # One topology at a time: the families share their address plan, and docker refuses overlapping pools.
    env = {"DOCKER_HOST": dockerd.host}
    name = project + family.replace("-", "")
    with ComposeLab(family_topology(family), family_path(family), name, env=env) as lab:
        _note_bridges(dockerd, name)
        yield lab


def _note_bridges(dockerd: Dockerd, project: str) -> None:
    """Remember the host bridges of a project's networks, for the leak check (they must exist now)."""
    client = docker.DockerClient(base_url=dockerd.host, timeout=30)
    try:
        networks = client.networks.list(filters={"label": f"com.docker.compose.project={project}"})
    finally:
        client.close()
    bridges = {f"br-{net.id[:12]}" for net in networks}
    host_links = _host_state(str(dockerd.workdir))["links"]
    assert bridges and bridges <= host_links, (bridges, host_links)
    dockerd.bridges |= bridges


@pytest.fixture(scope="class")
def lab(dockerd: Dockerd, project: str) -> Iterator[ComposeLab]:
    """eim-apdf, up for one test class (and down before the next topology comes up)."""
    with _compose_lab(dockerd, project, FAMILY) as lab:
        yield lab


class TestOneTopology:
    """eim-apdf up once: its containers, its self-test and a punch through it."""

    def test_containers_are_the_topology(self, lab: ComposeLab) -> None:
        """Interfaces renamed and addressed as in the topology; routes are the topology's, nothing else."""
        topo = lab.topology
        for name in ("nat-a", "r1", "a"):
            shown = lab.node(name).run(["ip", "-o", "-4", "addr", "show"]).stdout
            have = {(line.split()[1].split("@")[0], line.split()[3]) for line in shown.splitlines()}
            want = {(i.ifname, str(i.address)) for i in topo.interfaces(name)}
            assert have - {("lo", "127.0.0.1/8")} == want, name
            routes = lab.node(name).run(["ip", "-4", "route", "show", "scope", "global"]).stdout.splitlines()
            assert len(routes) == len(topo.routes(name)), (name, routes)
        # No route to private space in the core: a's LAN is unreachable from r1 (as on the internet).
        r1 = lab.node("r1").run(["ip", "route", "get", "10.0.1.2"], check=False)
        assert r1.returncode != 0 and "unreachable" in r1.stderr

    def test_nat_selftest(self, lab: ComposeLab) -> None:
        result = run_selftest(lab, host="a")  # type: ignore[arg-type]  # ComposeLab has the Lab shape it uses
        print(result)
        assert result.profile == FAMILY
        assert result.ok, result

    def test_punch(self, lab: ComposeLab) -> None:
        punch_in(lab)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != FAMILY])
def test_every_family_passes_its_selftest(dockerd: Dockerd, project: str, family: str) -> None:
    """The other families in turn, each up only for its own test."""
    with _compose_lab(dockerd, project, family) as lab:
        result = run_selftest(lab, host="a")  # type: ignore[arg-type]
    print(result)
    assert result.ok, result


def _peer(lab: ComposeLab, node: str, server: str, secret: str) -> subprocess.Popen[bytes]:
    argv = [*RAWPUNCH, "peer", "--server", server, "--session", secret]
    return lab.node(node).popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def punch_in(lab: ComposeLab) -> None:
    """rendezvous server in the core container, ``rawpunch peer`` in both hosts, data both ways."""
    server = start_server(lab)  # type: ignore[arg-type]
    secret = os.urandom(12).hex()
    payloads = {"a": os.urandom(150_000), "b": os.urandom(120_000)}
    procs = {n: _peer(lab, n, str(server.endpoint), secret) for n in payloads}
    results: dict[str, tuple[bytes, bytes]] = {}

    def talk(n: str) -> None:
        try:
            results[n] = procs[n].communicate(payloads[n], timeout=PUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            procs[n].kill()
            out, err = procs[n].communicate()
            results[n] = (out, err + b"\n(killed at the deadline)")

    threads = [threading.Thread(target=talk, args=(n,)) for n in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, other in (("a", "b"), ("b", "a")):
        out, err = results[n]
        assert procs[n].returncode == 0, f"peer {n}: {err.decode(errors='replace')}\nserver: {server.log}"
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payloads[other]).hexdigest(), n
    print(f"punched in compose; {len(payloads['a'])} + {len(payloads['b'])} bytes", file=sys.stderr)


def _router_lab_topology() -> Topology:
    """x -- n -- y, with n a plain host whose two interfaces the router test renames to lan/wan."""
    nodes = (Node("x", "host"), Node("n", "host"), Node("y", "host"))
    lan, wan = IPv4Network("10.0.7.0/29"), IPv4Network("198.51.100.192/29")
    links = (
        Link("n", "x", lan, IPv4Address("10.0.7.1"), IPv4Address("10.0.7.2"), "eth0", "eth0"),
        Link("n", "y", wan, IPv4Address("198.51.100.193"), IPv4Address("198.51.100.194"), "eth1", "eth0"),
    )
    return Topology(nodes, links)


def _usernats(netns: str) -> list[int]:
    """Userspace NAT processes in *netns* (pgrep would see every namespace's: one pid namespace)."""
    found = []
    for pid in pids_in_netns([netns]).get(netns, []):
        with contextlib.suppress(OSError):
            if b"rawpunch.lab.usernat" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-eif"])
def test_router_applies_its_profile_and_undoes_it_on_sigterm(lab_factory: Any, profile: str) -> None:
    """What every compose NAT container runs, here in a namespace where the result can be inspected."""
    netns_lab = lab_factory(_router_lab_topology())
    node = netns_lab.node("n")
    argv = [sys.executable, "-m", "rawpunch.lab.router", "--iface", "wan=198.51.100.193/29"]
    argv += ["--iface", "lan=10.0.7.1/29", "--route", "default=198.51.100.194", "--profile", profile]
    router = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert router.stdout is not None
    ready, _, _ = select.select([router.stdout], [], [], 30)
    assert ready and router.stdout.readline().strip() == "ready", (
        router.stderr.read() if router.stderr else ""
    )
    links = node.run(["ip", "-o", "-4", "addr", "show"]).stdout
    assert " wan " in links and " lan " in links, links
    assert node.run(["ip", "route", "show", "default"]).stdout.startswith(
        "default via 198.51.100.194 dev wan"
    )
    assert f"rawpunch-lab {profile}" in node.run(["iptables-save"]).stdout
    assert bool(_usernats(node.netns)) == (profile == "eim-eif")
    router.send_signal(signal.SIGTERM)
    assert router.wait(timeout=30) == 0, router.stderr.read() if router.stderr else ""
    assert "rawpunch-lab" not in node.run(["iptables-save"]).stdout
    assert _usernats(node.netns) == []
