"""Shared test plumbing: the ``root`` marker, network-namespace lab fixtures, and a lab leak check.

* Tests marked ``root`` are skipped, with the reason, only when not running as root; CI runs as root, so
  they run there.
* ``lab_factory(topology)`` builds a lab and tears it down after the test, pass or fail; ``two_nat_lab`` is a
  built ``two_nats()`` lab, parametrisable indirectly with a profile name (both NATs) or a dict of
  ``two_nats`` keyword arguments::

      @pytest.mark.parametrize("two_nat_lab", ["eim-apdf", {"hops": 3}], indirect=True)
      def test_x(two_nat_lab): ...

* At the end of the session, any ``rp-`` namespace of a lab this process built that still exists fails the
  session loudly, naming it (and is then removed, so one leak does not poison the machine).

Everything is per process, so it is safe under pytest-xdist: run ids are random, names never fixed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rawpunch.lab.netns import Lab, created_run_ids, netns_name
from rawpunch.lab.nsproc import exclusive_lock, kill_netns_processes, list_netns, remove_netns
from rawpunch.lab.registry import record_path
from rawpunch.lab.topology import Topology, two_nats

ROOT_SKIP_REASON = "needs root for network namespaces and iptables (CI runs as root; locally: sudo)"

LabFactory = Callable[..., Lab]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip(ROOT_SKIP_REASON)


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """``make(topology, run_id=None) -> Lab``: a built lab, torn down after the test whatever happens."""
    labs: list[Lab] = []

    def make(topology: Topology, run_id: str | None = None) -> Lab:
        lab = Lab(topology, run_id)
        labs.append(lab)
        lab.build()  # a failed build tears itself down before raising
        return lab

    yield make
    errors: list[BaseException] = []
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def two_nat_lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    """A built ``two_nats()`` lab; ``request.param`` may be a profile name or a dict of two_nats kwargs."""
    param: Any = getattr(request, "param", None)
    if param is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(param, str):
        kwargs = {"profile_a": param, "profile_b": param}
    elif isinstance(param, dict):
        kwargs = dict(param)
    else:
        raise TypeError(f"two_nat_lab: param must be a profile name or a dict, got {param!r}")
    return lab_factory(two_nats(**kwargs))


@pytest.fixture
def exclusive_cleanup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """For tests that leave a dead run on purpose and then run a cleaner. The cleaners are global (every dead
    lab and guard record on the host), so under ``pytest -n`` one such test's cleaner would take another's
    dead run and that test's own cleaner would find nothing: they take turns, through a lock file in the
    temporary directory all xdist workers share (pytest removes it with its old temporary directories)."""
    with exclusive_lock(tmp_path_factory.getbasetemp().parent / "exclusive-cleanup.lock"):
        yield


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_lab_namespaces() -> Iterator[None]:
    yield
    run_ids = created_run_ids()
    if not run_ids or os.geteuid() != 0:
        return
    prefixes = tuple(netns_name(run_id, "") for run_id in run_ids)
    leaked = [ns for ns in list_netns() if ns.startswith(prefixes)]
    records = [str(record_path(r)) for r in run_ids if record_path(r).exists()]
    if not leaked and not records:
        return
    with contextlib.suppress(Exception):
        kill_netns_processes(leaked)
    for ns in leaked:
        with contextlib.suppress(OSError):
            remove_netns(ns)
    for path in records:
        with contextlib.suppress(OSError):
            os.unlink(path)
    pytest.fail(
        f"lab teardown leaked (now removed): namespaces {leaked}, registry records {records}", pytrace=False
    )
