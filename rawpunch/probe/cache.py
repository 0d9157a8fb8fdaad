"""A short-lived cache of probe results, per network, for ``--strategy auto``.

A NAT's behaviour belongs to the network a host is on, not to the host: the key is the default route's
gateway plus the local address that route uses (a laptop moving from home to office gets another key).
Entries live ``LIFETIME`` seconds (10 minutes: long enough for a few punches, short enough that a NAT
rebooting into another state or a moved laptop does not keep a stale answer). The file is written
atomically (a temporary file in the same directory, then ``os.replace``), so a reader never sees half.
It lives in ``/run/rawpunch/`` when that is writable (root: tmpfs, gone at reboot), else in
``~/.cache/rawpunch/``. The expiry uses the wall clock: it only ages a cache entry and never times
anything between peers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, TypeGuard

from rawpunch.probe.result import NatBehaviour

LIFETIME = 600.0
FILENAME = "probe-cache.json"
MAX_ENTRIES = 32


def cache_dirs() -> list[Path]:
    """Candidate directories, preferred first (``RAWPUNCH_CACHE_DIR`` overrides both)."""
    if os.environ.get("RAWPUNCH_CACHE_DIR"):
        return [Path(os.environ["RAWPUNCH_CACHE_DIR"])]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path("/run/rawpunch"), home / "rawpunch"]


def default_gateway(route_table: str) -> str | None:
    """The default route's gateway from the text of ``/proc/net/route`` (little-endian hex fields)."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def source_address(toward: str, port: int = 9) -> str:
    """The source address the kernel picks toward *toward* (a UDP connect sends nothing); OSError if none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((toward, port))
        return str(s.getsockname()[0])


def network_key() -> str | None:
    """``gateway|local address`` of the current default route; None without one."""
    try:
        gateway = default_gateway(Path("/proc/net/route").read_text())
    except OSError:
        return None
    if gateway is None:
        return None
    try:
        local: str | None = source_address(gateway)
    except OSError:
        local = None
    return f"{gateway}|{local}"


def _path(directory: Path | None) -> Path | None:
    if directory is not None:
        return directory / FILENAME
    for candidate in cache_dirs():
        if (candidate / FILENAME).exists():
            return candidate / FILENAME
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fresh(entry: object, now: float) -> TypeGuard[dict[str, Any]]:
    """An entry younger than LIFETIME (and not from the future); anything malformed is not."""
    if not isinstance(entry, dict):
        return False
    try:
        return 0 <= now - float(entry.get("stored", 0)) <= LIFETIME
    except (TypeError, ValueError):
        return False


def load(
    key: str | None = None, now: float | None = None, directory: Path | None = None
) -> NatBehaviour | None:
    """The cached behaviour of this network (or *key*'s) if younger than LIFETIME, else None."""
    key = network_key() if key is None else key
    path = _path(directory)
    if key is None or path is None:
        return None
    entry = _read(path).get(key)
    now = time.time() if now is None else now
    if not _fresh(entry, now):
        return None
    try:
        return NatBehaviour.from_json(entry["behaviour"])
    except (KeyError, TypeError):
        return None


def store(
    behaviour: NatBehaviour, key: str | None = None, now: float | None = None, directory: Path | None = None
) -> Path | None:
    """Cache *behaviour* for this network (or *key*); returns the file, or None if nothing was writable."""
    key = network_key() if key is None else key
    if key is None:
        return None
    now = time.time() if now is None else now
    for candidate in [directory] if directory is not None else cache_dirs():
        with contextlib.suppress(OSError):
            return _write(candidate, key, behaviour, now)
    return None


def _write(directory: Path, key: str, behaviour: NatBehaviour, now: float) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / FILENAME
    entries = {k: v for k, v in _read(path).items() if _fresh(v, now)}
    entries[key] = {"stored": now, "behaviour": behaviour.to_json()}
    newest = sorted(entries.items(), key=lambda kv: kv[1]["stored"])[-MAX_ENTRIES:]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-cache.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(newest), f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
