"""``rawpunch probe`` and ``rawpunch server --alt-address`` on the command line: the errors a user meets
before any packet is sent."""

from __future__ import annotations

import asyncio
import os

import pytest

from rawpunch import cli
from rawpunch.rendezvous.server import RendezvousServer, ServerStartError


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
