"""``rawpunch lab up|down|run|shell`` without root: argument parsing, spec validation, the lab description,
and the registry's record of a persistent lab (info round trip, zombie owners count as dead)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from rawpunch.cli import build_parser
from rawpunch.lab import registry
from rawpunch.lab.impair import Impairment
from rawpunch.lab.labspec import KIND, LabSpec, describe, format_lab
from rawpunch.lab.nsproc import proc_start_time
from rawpunch.lab.upcli import default_name, node_command, spec_from_args

EXAMPLE = shlex.split("lab up --name demo --nat-a eim-apdf --nat-b apdm-random --delay 20 --loss 1 --server")


def _spec(argv: list[str], taken: frozenset[str] = frozenset()) -> LabSpec:
    return spec_from_args(build_parser().parse_args(argv), set(taken))


def test_the_readme_example_becomes_a_spec_with_an_impaired_middle_router() -> None:
    spec = _spec(EXAMPLE)
    assert spec == LabSpec("demo", "eim-apdf", "apdm-random", 2, 20.0, 0.0, 1.0, server=True)
    assert spec.impairment() == Impairment(delay_ms=20, loss=0.01)
    topo = spec.topology()
    impaired = {n.name: n.impairment for n in topo.nodes if n.impairment is not None}
    assert impaired == {"r1": Impairment(delay_ms=20, loss=0.01)}
    assert topo.node("nat-b").profile == "apdm-random"


def test_defaults_are_the_demos_lab_with_a_clean_core() -> None:
    spec = _spec(["lab", "up"], frozenset({"lab1", "lab3"}))
    assert (spec.name, spec.nat_a, spec.nat_b, spec.hops, spec.server) == (
        "lab2",
        "eim-apdf",
        "eim-apdf",
        2,
        False,
    )
    assert spec.impairment() is None
    assert all(n.impairment is None for n in spec.topology().nodes)


@pytest.mark.parametrize(
    ("taken", "name"),
    [(set(), "lab1"), ({"lab1"}, "lab2"), ({"lab2", "x"}, "lab1"), ({"lab1", "lab2"}, "lab3")],
)
def test_default_name_is_the_first_free_lab_n(taken: set[str], name: str) -> None:
    assert default_name(taken) == name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Demo"], "--name 'Demo': use 1-12 lowercase letters and digits"),
        (["--name", "a-b"], "--name 'a-b'"),
        (["--name", "abcdefghijklm"], "--name 'abcdefghijklm'"),
        (["--nat-a", "full-cone"], "--nat-a 'full-cone': unknown NAT profile"),
        (["--nat-b", "nope"], "--nat-b 'nope': unknown NAT profile"),
        (["--hops", "0"], "--hops 0: give 1 to"),
        (["--delay", "-1"], "--delay -1: give 0 to"),
        (["--delay", "5", "--jitter", "6"], "--jitter 6: give 0 up to the --delay (5 ms)"),
        (["--jitter", "1"], "--jitter 1: give 0 up to the --delay (0 ms)"),
        (["--loss", "100"], "--loss 100: give a percentage from 0 to below 100"),
        (["--loss", "-0.5"], "--loss -0.5"),
    ],
)
def test_bad_up_options_name_the_option_and_the_fix(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        _spec(["lab", "up", *args])


def test_spec_travels_to_the_supervisor_as_json_unchanged() -> None:
    spec = _spec(EXAMPLE)
    assert LabSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["lab", "run", "demo", "a", "--", "ip", "-br", "addr"], ["ip", "-br", "addr"]),
        (["lab", "run", "demo", "a", "ip", "-br", "addr"], ["ip", "-br", "addr"]),
        (["lab", "run", "demo", "a", "--", "--version"], ["--version"]),
        (["lab", "run", "demo", "a", "--", "sh", "-c", "echo -- x"], ["sh", "-c", "echo -- x"]),
        (["lab", "run", "demo", "a", "--", "printf", "--"], ["printf", "--"]),
    ],
)
def test_run_keeps_the_command_and_its_options(argv: list[str], command: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.lab_command, args.name, args.node) == ("run", "demo", "a")
    assert node_command(args.command) == command


def test_down_needs_a_name_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["lab", "down", "demo"]).name == "demo"
    assert parser.parse_args(["lab", "down", "--all"]).all_labs
    for argv in (["lab", "down"], ["lab", "down", "demo", "--all"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
    assert "NAME" in capsys.readouterr().err


def test_run_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["lab", "run", "demo", "a", "--"])
    assert args.func(args) == 2
    assert "lab run NAME NODE -- CMD" in capsys.readouterr().err


def test_up_with_bad_options_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["lab", "up", "--name", "x", "--loss", "150"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err == "rawpunch lab up: --loss 150: give a percentage from 0 to below 100\n"


def test_description_lists_every_node_with_addresses_namespace_and_server() -> None:
    spec = _spec(EXAMPLE)
    topo = spec.topology()
    netns = {n.name: f"rp-demo-{n.name}" for n in topo.nodes}
    info = describe(spec, topo, netns, "203.0.113.10:3478")
    assert json.loads(json.dumps(info)) == info  # it goes into a JSON registry record
    assert info["kind"] == KIND and info["server"] == "203.0.113.10:3478"
    nodes = {n["name"]: n for n in info["nodes"]}
    assert set(nodes) == {n.name for n in topo.nodes}
    assert nodes["a"]["address"] == "10.0.1.2" and nodes["a"]["netns"] == "rp-demo-a"
    assert nodes["nat-b"]["profile"] == "apdm-random"
    assert nodes["nat-a"]["interfaces"]["wan"] == str(topo.interface("nat-a", "wan").address)
    assert nodes["r1"]["impairment"] == str(Impairment(delay_ms=20, loss=0.01))
    text = format_lab(info, "supervisor pid 42, running")
    assert text.splitlines()[0].startswith("lab demo (supervisor pid 42, running): a -- nat-a [eim-apdf]")
    assert "rendezvous server: 203.0.113.10:3478" in text
    assert "eth0=10.0.1.2/24" in text and "nat apdm-random" in text


def test_record_info_round_trips_and_old_records_read_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "REGISTRY_DIR", tmp_path)
    record = registry.new_record("demo", ("rp-demo-a",))
    registry.write_record(registry.RunRecord(**{**record.__dict__, "info": {"kind": KIND, "x": [1]}}))
    (tmp_path / "old.json").write_text(
        json.dumps({"run_id": "old", "owner_pid": 1, "owner_start_time": 1, "namespaces": [], "created": 0.0})
    )
    assert registry.read_record("demo") is not None
    assert registry.read_record("demo").info == {"kind": KIND, "x": [1]}  # type: ignore[union-attr]
    assert registry.read_record("old").info == {}  # type: ignore[union-attr]
    assert registry.read_record("nothing") is None


def test_a_zombie_owner_counts_as_dead() -> None:
    """Where init does not reap orphans, a killed supervisor stays a zombie: it cannot clean up any more."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    try:
        start = proc_start_time(pid)
        assert start is not None
        record = registry.RunRecord("z", pid, start, (), 0.0)
        _wait_zombie(pid)
        assert not record.owner_alive()
        assert registry.RunRecord("me", os.getpid(), proc_start_time(os.getpid()) or 0, (), 0.0).owner_alive()
    finally:
        os.waitpid(pid, 0)


def _wait_zombie(pid: int) -> None:
    # waitid with WNOWAIT blocks until the child has exited but leaves it a zombie.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "up", "--name", "x"],
        ["lab", "down", "x"],
        ["lab", "run", "x", "a", "--", "true"],
        ["lab", "shell", "x", "a"],
    ],
)
def test_without_root_each_command_says_so_and_exits_3(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 3
    assert capsys.readouterr().err == f"rawpunch lab {argv[1]}: needs root (run with sudo)\n"


def test_down_all_stops_every_lab_even_after_one_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawpunch.lab import persist, upcli  # noqa: PLC0415

    labs = [registry.RunRecord(name, 1, 1, (), 0.0) for name in ("stuck", "fine")]
    stopped: list[str] = []

    def stop(name: str) -> str:
        stopped.append(name)
        if name == "stuck":
            raise persist.LabError("lab stuck was not started by `rawpunch lab up`")
        return f"lab {name} is down"

    monkeypatch.setattr(persist, "running_labs", lambda: labs)
    monkeypatch.setattr(persist, "stop", stop)
    status = upcli.run_up_command(build_parser().parse_args(["lab", "down", "--all"]))
    out, err = capsys.readouterr()
    assert stopped == ["stuck", "fine"]
    assert status == upcli.EXIT_FAILED
    assert out == "lab fine is down\n"
    assert err == "rawpunch lab down: lab stuck was not started by `rawpunch lab up`\n"
