"""``rawpunch peer`` as a user runs it: netcat mode, --exec, --listen/--connect, and its errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from rawpunch.lab.netns import Lab
from rawpunch.lab.scenario import RAWPUNCH, punch_peers, start_server
from rawpunch.lab.topology import two_nats

pytestmark = pytest.mark.root


def test_stdio_to_exec_cat_echoes_back_through_the_punched_socket() -> None:
    """b hands the punched socket to `cat` (no copying in rawpunch): whatever a sends comes back."""
    payload = os.urandom(200_000)
    with Lab(two_nats(hops=2)) as lab:
        server = start_server(lab)
        secret = os.urandom(12).hex()
        b = lab.node("b").popen(
            [*RAWPUNCH, "peer", "--server", str(server.endpoint), "--session", secret, "--exec", "cat"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        runs = punch_peers(lab, server.endpoint, secret, {"a": payload}, timeout=60)
        _, b_err = b.communicate(timeout=30)
        assert runs["a"].returncode == 0, runs["a"].stderr
        assert b.returncode == 0, b_err.decode()
        assert runs["a"].received == payload
        connected = runs["a"].event("connected")
        assert connected is not None and connected["strategy"] == "crafted-handshake"


def _talk(port: int, message: bytes, deadline: float) -> bytes:
    """Runs in node a: connect to the --listen port (retrying until it is bound) and talk."""
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for a listener the peer process binds at start-up
    with sock:
        greeting = sock.recv(100)  # the echo server first says whom it saw
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := sock.recv(65536):
            echoed += chunk
    return greeting + b"|" + echoed


def test_listen_and_connect_carry_a_local_tcp_connection() -> None:
    with Lab(two_nats(hops=2)) as lab:
        server = start_server(lab)
        secret = os.urandom(12).hex()
        echo = lab.node("b").popen(
            [sys.executable, "-m", "rawpunch.lab.echo", "--host", "127.0.0.1", "--port", "7000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert echo.stdout is not None and echo.stdout.readline()  # listening
        base = [*RAWPUNCH, "peer", "--server", str(server.endpoint), "--session", secret]
        side_b = lab.node("b").popen([*base, "--connect", "127.0.0.1:7000"], stderr=subprocess.PIPE)
        side_a = lab.node("a").popen([*base, "--listen", "127.0.0.1:6000"], stderr=subprocess.PIPE)
        reply = lab.node("a").call(_talk, 6000, b"ping over the punch", time.monotonic() + 30, timeout=60)
        greeting, echoed = reply.split(b"|", 1)
        assert echoed == b"ping over the punch"
        assert greeting.startswith(b"127.0.0.1:")  # the service saw b's local relay connection
        for proc in (side_a, side_b):
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()


def test_peer_errors_are_one_line_with_documented_exit_codes() -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    run = subprocess.run(
        [*nobody, *RAWPUNCH, "peer", "--server", "127.0.0.1:1", "--session", "x" * 20],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert run.returncode == 3
    assert "needs root" in run.stderr and "sudo" in run.stderr
    run = subprocess.run(
        [*RAWPUNCH, "peer", "--server", "127.0.0.1:1"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "RAWPUNCH_SESSION"},
    )
    assert run.returncode == 2
    assert "no session secret" in run.stderr
