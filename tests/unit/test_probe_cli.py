"""``rawpunch probe`` and ``rawpunch server --alt-address`` on the command line: the errors a user meets
before any packet is sent."""

from __future__ import annotations

import asyncio
import os

import pytest

from rawpunch import cli
from rawpunch.rendezvous.server import (
    PROBE_MAX_HELD,
    PROBE_MAX_HELD_PER_SOURCE,
    RendezvousServer,
    ServerStartError,
)


def test_probe_without_root_says_so_and_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["probe", "--server", "192.0.2.1:3478"]) == cli.EXIT_NOT_ROOT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rawpunch probe: needs root: it captures SYNs and sends crafted ones (run with sudo)"]


def test_probe_refuses_an_unbounded_timer_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["probe", "--server", "192.0.2.1:3478", "--timers", "--timer-limit", "7200"]) == 2
    assert "--timer-limit must be between" in capsys.readouterr().err


def test_the_help_says_which_parts_need_root(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["server", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--alt-address IP" in text and "ROOT ONLY" in text
    with pytest.raises(SystemExit):
        cli.main(["probe", "--help"])
    assert "Needs root" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("host", "alt", "message"),
    [
        ("0.0.0.0", "127.0.0.2", "--listen with this machine's main address"),
        ("127.0.0.1", "127.0.0.1", "a different second address"),
    ],
)
def test_a_server_probe_part_without_two_concrete_addresses_is_refused(
    host: str, alt: str, message: str
) -> None:
    async def start() -> None:
        async with RendezvousServer(host, 0, alt_address=alt):
            pass

    with pytest.raises(ServerStartError, match=message):
        asyncio.run(start())


@pytest.mark.parametrize("port", ["0", "65536", "x"])
def test_a_bad_probe_port_is_one_line_naming_the_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["server", "--listen", "192.0.2.1:3478", "--alt-address", "192.0.2.2", "--probe-port", port])
    assert exit_info.value.code == 2
    assert f"--probe-port: {port!r} is not a port number from 1 to 65535" in capsys.readouterr().err


def test_held_probe_connections_are_capped_per_address_and_in_all() -> None:
    """A held connection keeps a TCP slot for up to PROBE_HOLD: no address, nor many, may take them all."""
    server = RendezvousServer("192.0.2.1", 3478, alt_address="192.0.2.2")
    assert server.may_hold("198.51.100.1")
    server._held["198.51.100.1"] = PROBE_MAX_HELD_PER_SOURCE
    assert not server.may_hold("198.51.100.1") and server.may_hold("198.51.100.2")
    server._held["198.51.100.3"] = PROBE_MAX_HELD - PROBE_MAX_HELD_PER_SOURCE - 1  # one below the cap in all
    assert server.may_hold("198.51.100.2")
    server._held["198.51.100.3"] += 1
    assert not server.may_hold("198.51.100.2")
