"""``rawpunch probe --timers``: how long the NAT keeps a mapping (RFC 5382 REQ-5), bounded.

RFC 5382 REQ-5 asks for an idle timeout of at least 2 h 4 min for an established connection and 4 min for
a transitory one, e.g. SYN_SENT; no probe waits that long. This one checks a short ladder of idle times
(``WAITS``, up to ``--timer-limit`` seconds), all at once so that the total is the longest wait:

* **syn_sent**: a low-TTL SYN opens a mapping in SYN_SENT (it dies past the NAT, as in the simultaneous
  open test); after *w* seconds the server sends a SYN from that endpoint. It still passes: the mapping
  outlived *w*.
* **established**: a connection to a probe listener asks the server to send a byte *w* seconds later
  and then stays idle. The byte comes in: the mapping outlived *w*. The first segment after the idle time
  comes from outside, as a peer's would: an outbound one could make a NAT pick the flow up again (Linux
  conntrack's loose pickup), and the mapping would look alive to us but not to anyone else.

The result is a bracket, ``alive_s`` (the longest wait it survived) and ``expired_within_s`` (the first
it did not), which can only ever *fail* a requirement, never prove it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from rawpunch.proto.codec import ProbeKind
from rawpunch.rendezvous.client import RendezvousError

if TYPE_CHECKING:
    from rawpunch.probe.run import _Run

WAITS = (1.0, 4.0, 16.0)
#: Offsets of the timer tests' local ports from the run's base (after the ones ``run`` uses).
SYN_SENT_PORTS = (18, 19, 20)
ESTABLISHED_PORTS = (21, 22, 23)


async def measure_timers(run: _Run, priming_ttl: int, limit: float) -> dict[str, Any]:
    from rawpunch.probe import run as adapter  # noqa: PLC0415 - the adapter imports this module

    waits = [w for w in WAITS if w <= limit]
    syn_sent = [run.base + off for off in SYN_SENT_PORTS[: len(waits)]]
    established = [run.base + off for off in ESTABLISHED_PORTS[: len(waits)]]
    for port in syn_sent:
        await adapter._discover(run, port, run.main_p2, hold=True)
    held = []
    for port in established:
        await adapter._discover(run, port, run.main_p2, hold=True)
        held.append(run.held[-1])
    for port in syn_sent:
        adapter._send_syn(run, port, run.server, ttl=priming_ttl)
    loop = asyncio.get_running_loop()
    start = loop.time()
    lock = asyncio.Lock()  # one control request at a time

    async def syn_sent_alive(port: int, wait: float) -> bool:
        await asyncio.sleep(max(0.0, start + wait - loop.time()))
        async with lock:
            answer = await adapter._ask(run, ProbeKind.SIMOPEN, local_port=port)
            await adapter._discover(run, 0, run.server, hold=False)  # barrier: a round trip via the NAT
        return answer.sources[0] in adapter._syns_to(run, port)

    async def established_alive(index: int, wait: float) -> bool:
        sock = held[index]
        await loop.sock_sendall(sock, b"W" + bytes([round(wait)]))  # "answer in wait seconds"
        try:
            await adapter._recv(sock, 1, wait + adapter.STEP_TIMEOUT)
        except (TimeoutError, OSError):
            return False
        return True

    try:
        alive_syn = await asyncio.gather(
            *(syn_sent_alive(p, w) for p, w in zip(syn_sent, waits, strict=True))
        )
    except RendezvousError as exc:
        alive_syn = []
        run.notes.append(f"syn_sent timer not measured: {exc}")
    alive_est = await asyncio.gather(*(established_alive(i, w) for i, w in enumerate(waits)))
    result = {"established": _bracket(waits, list(alive_est))}
    if alive_syn:
        result["syn_sent"] = _bracket(waits, list(alive_syn))
    return result


def _bracket(waits: list[float], alive: list[bool]) -> dict[str, Any]:
    survived = [w for w, ok in zip(waits, alive, strict=True) if ok]
    died = [w for w, ok in zip(waits, alive, strict=True) if not ok]
    alive_s = max(survived, default=None)
    expired = min(died, default=None)
    if expired is None:
        summary = f"alive after {alive_s:g} s (longer not tested)" if alive_s else "not measured"
    else:
        summary = f"expired within {expired:g} s" + (f" (alive after {alive_s:g} s)" if alive_s else "")
    return {
        "waits_s": waits,
        "alive": alive,
        "alive_s": alive_s,
        "expired_within_s": expired,
        "summary": summary,
    }
