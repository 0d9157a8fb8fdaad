"""Undo on a fatal signal: one mechanism for everything rawpunch must remove (labs, firewall rules).

A ``SignalGuard`` installs handlers for a set of signals while its owner has something live. On a
signal it runs the owner's teardown, puts the previous handlers back, and then behaves as the
process would have without it: calls the previous Python handler (SIGINT's raises
KeyboardInterrupt), or dies from the signal with the default action (so the exit status still
says "killed by SIGTERM"). Signals that were ignored stay ignored (e.g. SIGHUP under nohup). Two
guards chain: the second one's "previous" is the first one's handler. A forked child that
inherited the handler tears nothing down (the parent owns the resources).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any


class SignalGuard:
    def __init__(self, signals: Iterable[signal.Signals], teardown: Callable[[], None]) -> None:
        self.signals = tuple(signals)
        self.teardown = teardown
        self.previous: dict[int, Any] = {}
        self.installed = False
        self.pid = 0  # the process that installed the handlers
        self._handler = self._on_signal  # one bound method, so `is` finds it again

    def install(self) -> None:
        # Handlers can only be set from the main thread; elsewhere __exit__ and atexit remain.
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.installed = True
        self.pid = os.getpid()
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue  # the process survives this signal, so must what the guard protects
            self.previous[sig] = previous
            signal.signal(sig, self._handler)

    def remove(self) -> None:
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        if os.getpid() != self.pid:
            return
        for sig, previous in list(self.previous.items()):
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, previous)
            del self.previous[sig]
        self.installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            # A forked child that inherited the handler: behave as it would have without us.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        previous = self.previous.get(signum, signal.SIG_DFL)
        self.teardown()
        self.remove()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
