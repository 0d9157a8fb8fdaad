"""What every benchmark records beside its figures: machine, commit, a dated BENCHMARKS.md section."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "BENCHMARKS.md"


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu: str
    kernel: str
    python: str
    load: float
    commit: str

    def line(self) -> str:
        return (
            f"- Machine: {self.cores} cores, {self.cpu}; kernel {self.kernel}; Python {self.python}; "
            f"1-minute load average at start {self.load:.2f}."
        )


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine() -> Machine:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    # --no-optional-locks: reading the status must not rewrite the index of a tree others are working in.
    dirty = _git("--no-optional-locks", "status", "--porcelain")
    commit = (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")
    load = float(Path("/proc/loadavg").read_text().split()[0])
    cpu = models[0] if models else platform.processor() or "unknown CPU"
    return Machine(os.cpu_count() or 0, cpu, platform.release(), platform.python_version(), load, commit)


def append_section(title: str, host: Machine, quick: bool, lines: list[str], header: str) -> None:
    """Append ``## <title>: <date>, commit <c>`` and ``lines``; a new file starts with ``header``."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"## {title}{stamp}, commit {host.commit}{' (quick)' if quick else ''}", "", host.line()]
    existing = RECORD.read_text() if RECORD.exists() else header
    RECORD.write_text(existing.rstrip() + "\n\n" + "\n".join([*head, *lines]).rstrip() + "\n")
