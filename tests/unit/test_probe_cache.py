"""The probe-result cache: per-network key, lifetime, atomic file, and its JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rawpunch.probe import cache
from rawpunch.probe.result import NatBehaviour

BEHAVIOUR = NatBehaviour(
    mapping="endpoint-independent",
    filtering="address-dependent",
    allocation="sequential",
    allocation_delta=2,
    unsolicited_syn="rst",
    simultaneous_open=True,
    hops_to_nat=1,
    priming_ttl=2,
    hairpin=False,
    nat=True,
    extra={"rfc5382": [{"req": "REQ-1", "status": "pass"}]},
)
HOME, OFFICE = "192.168.1.1|192.168.1.20", "10.0.0.1|10.0.0.7"


def test_a_stored_result_comes_back_for_the_same_network_only(tmp_path: Path) -> None:
    path = cache.store(BEHAVIOUR, key=HOME, now=1000.0, directory=tmp_path)
    assert path == tmp_path / cache.FILENAME
    assert cache.load(key=HOME, now=1000.0 + 60, directory=tmp_path) == BEHAVIOUR
    assert cache.load(key=OFFICE, now=1000.0 + 60, directory=tmp_path) is None


@pytest.mark.parametrize(
    ("age", "found"), [(0.0, True), (cache.LIFETIME, True), (cache.LIFETIME + 1, False), (-5, False)]
)
def test_entries_expire(tmp_path: Path, age: float, found: bool) -> None:
    cache.store(BEHAVIOUR, key=HOME, now=1000.0, directory=tmp_path)
    assert (cache.load(key=HOME, now=1000.0 + age, directory=tmp_path) is not None) is found


def test_storing_keeps_other_fresh_networks_and_drops_expired_ones(tmp_path: Path) -> None:
    cache.store(BEHAVIOUR, key=HOME, now=1000.0, directory=tmp_path)
    cache.store(BEHAVIOUR, key=OFFICE, now=1000.0 + cache.LIFETIME + 1, directory=tmp_path)
    data = json.loads((tmp_path / cache.FILENAME).read_text())
    assert list(data) == [OFFICE]
    assert not [p for p in tmp_path.iterdir() if p.name != cache.FILENAME]  # no temporary file left


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[]",
        '{"192.168.1.1|192.168.1.20": {"stored": 1000}}',
        '{"192.168.1.1|192.168.1.20": {"stored": "yesterday"}, "x": {"stored": null}}',
    ],
)
def test_a_damaged_file_reads_as_no_result_and_is_replaced(tmp_path: Path, content: str) -> None:
    (tmp_path / cache.FILENAME).write_text(content)
    assert cache.load(key=HOME, now=1000.0, directory=tmp_path) is None
    cache.store(BEHAVIOUR, key=HOME, now=1000.0, directory=tmp_path)
    assert cache.load(key=HOME, now=1000.0, directory=tmp_path) == BEHAVIOUR


def test_the_environment_can_move_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAWPUNCH_CACHE_DIR", str(tmp_path))
    assert cache.cache_dirs() == [tmp_path]
    cache.store(BEHAVIOUR, key=HOME, now=1000.0)
    assert cache.load(key=HOME, now=1000.0) == BEHAVIOUR


def test_the_network_key_is_the_default_gateway() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert cache.default_gateway(table) == "10.0.1.1"
    assert cache.default_gateway(table.splitlines()[0]) is None


def test_unknown_json_keys_of_a_newer_rawpunch_are_ignored() -> None:
    data = {**BEHAVIOUR.to_json(), "something_new": 1}
    assert NatBehaviour.from_json(data) == BEHAVIOUR
