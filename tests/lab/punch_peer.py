"""In-node helper of the punch lab tests: a punch peer, a stalling partner and a blind attacker.

Started by ``tests/lab/test_punch.py`` inside a lab node (``LabNode.popen``); commands arrive as JSON lines on
stdin, everything it has to say leaves as JSON lines on stdout (diagnostics on stderr). One process serves
many punches, so a test pays the interpreter start-up once per node, not once per punch.

``peer NAME``
    ``{"op": "punch", "id": N, "server": "H:P", "secret": S, "mode": "small" | "bulk", "bulk_bytes": B}``
    runs ``rawpunch.punch.session.punch`` and forwards each of its events (tagged with ``id`` and ``node``).
    On success it reports ``punched`` (sockname, peername, TCP_INFO, the engine's ``ignored`` counters) and
    waits for ``{"op": "go"}`` (exchange data, then report ``exchanged``) or ``{"op": "abort"}`` (close):
    the test inspects the NATs' conntrack while the socket is idle and ESTABLISHED. On failure it reports
    ``failed`` with the one-line reason. Exchanges:

    * ``small``, ordered, to exercise half-close: slot 0 sends its line and shuts down its sending side,
      then reads to EOF; slot 1 reads to EOF, then sends its line and shuts down. So slot 0 receives data
      after its own FIN, and slot 1 sends after seeing the peer's.
    * ``bulk``: B random bytes each way at once (a sender thread), ``shutdown(SHUT_WR)`` after the last,
      read to EOF; sha256 of what was sent and of what arrived.

``stall NAME``
    ``{"secret": S, "server": "H:P"}``: register, discover the TCP endpoint and exchange peer info like a
    real peer, report ``exchanged``, then never send READY: the partner sits in ``ready()`` with its firewall
    guard applied. Exits when stdin closes.

``attack``
    Reports ``ready`` once its raw socket is open. Then, per command ``{"targets": [{"dst": "H:P", "src":
    "H:P"}, ...], "kinds": [...], "rounds": R, "interval": S}``: R rounds, S seconds apart, each sending to
    every target one forged segment of each kind (of ``FORGED``; all by default) from the spoofed ``src``,
    with random sequence and acknowledgment numbers (a blind attacker: the ISNs travel sealed). IP ID
    ``FORGED_IP_ID`` marks them for counting rules. Reports ``attacked`` with the counts sent.

The engine's ``ignored`` counters are not part of the session's events, so the peer reads them from the
engine itself: it wraps ``PunchEngine`` as the session module sees it (test instrumentation only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

FORGED_IP_ID = 0xBEEF
FORGED = ("syn", "syn-ack", "rst", "rst-ack", "ack")
TCP_INFO_HEAD = struct.Struct("8B4I")  # state, ca_state, retransmits, probes, backoff, options, wscales, ...
RECV_TIMEOUT = 30.0


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def read_command() -> dict[str, Any] | None:
    line = sys.stdin.readline()
    if not line:
        return None
    command: dict[str, Any] = json.loads(line)
    return command


# --- peer ---------------------------------------------------------------------------------------------


def tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
    state, _ca, _retrans, _probes, _backoff, options, wscale, _app, _rto, _ato, snd_mss, rcv_mss = (
        TCP_INFO_HEAD.unpack(raw)
    )
    return {
        "state": state,  # 1: TCP_ESTABLISHED
        "options": options,  # TCPI_OPT_TIMESTAMPS 1, TCPI_OPT_SACK 2, TCPI_OPT_WSCALE 4
        "snd_wscale": wscale & 0x0F,
        "rcv_wscale": wscale >> 4,
        "snd_mss": snd_mss,
        "rcv_mss": rcv_mss,
    }


def recv_to_eof(sock: socket.socket, digest: Any = None) -> tuple[bytes, int]:
    """Everything until EOF (kept only without *digest*), and the byte count."""
    kept, count = [], 0
    while chunk := sock.recv(1 << 18):
        count += len(chunk)
        if digest is None:
            kept.append(chunk)
        else:
            digest.update(chunk)
    return b"".join(kept), count


def small_exchange(sock: socket.socket, slot: int, line: bytes) -> dict[str, Any]:
    if slot == 0:
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        got, _ = recv_to_eof(sock)  # arrives after our FIN: half-close works here
    else:
        got, _ = recv_to_eof(sock)  # ends at the peer's FIN
        sock.sendall(line)  # the peer has half-closed; this direction is still open
        sock.shutdown(socket.SHUT_WR)
    return {"sent": line.decode(), "received": got.decode(errors="replace"), "eof": True}


def bulk_exchange(sock: socket.socket, nbytes: int) -> dict[str, Any]:
    data = os.urandom(nbytes)
    errors: list[str] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"send: {exc}")

    started = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    digest = hashlib.sha256()
    _, count = recv_to_eof(sock, digest)
    sender.join(RECV_TIMEOUT)
    return {
        "sent_bytes": nbytes,
        "sent_sha256": hashlib.sha256(data).hexdigest(),
        "received_bytes": count,
        "received_sha256": digest.hexdigest(),
        "eof": True,
        "seconds": round(time.monotonic() - started, 3),
        "errors": errors,
    }


def ignored_by(engines: list[Any]) -> dict[str, int]:
    """The engines' ``ignored`` counters: reason -> segments (what did not fit and changed nothing)."""
    total: Counter[str] = Counter()
    for engine in engines:
        total.update(engine.ignored)
    return dict(total)


def run_peer(name: str) -> None:
    from rawpunch.proto.codec import Endpoint  # noqa: PLC0415
    from rawpunch.punch import session  # noqa: PLC0415

    engines: list[Any] = []

    class CountingEngine(session.PunchEngine):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            engines.append(self)

    session.PunchEngine = CountingEngine
    emit({"event": "ready", "node": name})
    while (cmd := read_command()) is not None:
        if cmd.get("op") != "punch":
            continue
        tag = {"id": cmd["id"], "node": name}
        events: list[dict[str, Any]] = []

        def on_event(record: dict[str, Any], tag: dict[str, Any] = tag, events: list[Any] = events) -> None:
            events.append(record)
            emit({**tag, **record})

        engines.clear()
        settings = session.PunchSettings(
            Endpoint.parse(cmd["server"]),
            cmd["secret"],
            deadline=float(cmd.get("deadline", 10.0)),
            strategy=str(cmd.get("strategy", "crafted-handshake")),  # these tests are the crafted handshake's
            peer_timeout=float(cmd.get("peer_timeout", 30.0)),
            on_event=on_event,
        )
        try:
            result = asyncio.run(session.punch(settings))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            emit({**tag, "event": "failed", "error": error, "ignored": ignored_by(engines)})
            continue
        sock = result.sock
        try:
            sock.settimeout(RECV_TIMEOUT)
            emit(
                {
                    **tag,
                    "event": "punched",
                    "sockname": "{}:{}".format(*sock.getsockname()),
                    "peername": "{}:{}".format(*sock.getpeername()),
                    "local": str(result.local),
                    "peer": str(result.peer),
                    "tcp_info": tcp_info(sock),
                    "ignored": ignored_by(engines),
                }
            )
            go = read_command()
            if go is None or go.get("op") != "go":
                continue
            slot = next(e["slot"] for e in events if e["event"] == "registered")
            if cmd.get("mode") == "bulk":
                out = bulk_exchange(sock, int(cmd["bulk_bytes"]))
            else:
                line = f"{name} punch {cmd['id']} {secrets.token_hex(8)}".encode()
                out = small_exchange(sock, slot, line)
            emit({**tag, "event": "exchanged", **out})
        except Exception as exc:
            emit({**tag, "event": "exchange_failed", "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        finally:
            sock.close()


# --- stall --------------------------------------------------------------------------------------------


async def _stall(name: str, server: str, secret: str) -> None:
    from rawpunch.proto.codec import Endpoint  # noqa: PLC0415
    from rawpunch.proto.peerinfo import Capability, PeerInfo  # noqa: PLC0415
    from rawpunch.rendezvous.client import RendezvousClient  # noqa: PLC0415

    async with RendezvousClient(Endpoint.parse(server), secret) as client:
        await client.register()
        mapping = await client.discover_tcp(0)
        info = PeerInfo(
            capabilities=Capability.CRAFTED_HANDSHAKE,
            isn=secrets.randbits(32),
            mss=1460,
            wscale=7,
            sack=True,
            timestamps=True,
            tcp_port=mapping.local_port,
        )
        found = await client.exchange(info)
        emit({"event": "exchanged", "node": name, "public": str(mapping.public), "slot": found.slot})
        # Never READY: wait for stdin to close (the test's signal), without blocking the loop.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def run_stall(name: str) -> None:
    cmd = read_command()
    if cmd is not None:
        asyncio.run(_stall(name, cmd["server"], cmd["secret"]))


# --- attack -------------------------------------------------------------------------------------------


def run_attack() -> None:
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415

    flags = {"syn": "S", "syn-ack": "SA", "rst": "R", "rst-ack": "RA", "ack": "A"}
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    emit({"event": "ready", "node": "attacker"})
    while (cmd := read_command()) is not None:
        targets = []
        for t in cmd["targets"]:
            dst_host, dst_port = t["dst"].rsplit(":", 1)
            src_host, src_port = t["src"].rsplit(":", 1)
            targets.append((dst_host, int(dst_port), src_host, int(src_port)))
        kinds = cmd.get("kinds", FORGED)
        sent: Counter[str] = Counter()
        for i in range(int(cmd["rounds"])):
            if i:
                time.sleep(float(cmd["interval"]))  # pacing of the flood, not a synchronisation
            for dst_host, dst_port, src_host, src_port in targets:
                for kind in kinds:
                    pkt = IP(src=src_host, dst=dst_host, id=FORGED_IP_ID) / TCP(
                        sport=src_port,
                        dport=dst_port,
                        flags=flags[kind],
                        seq=secrets.randbits(32),
                        ack=secrets.randbits(32) if "A" in flags[kind] else 0,
                        window=0x1337,
                    )
                    raw.sendto(bytes(pkt), (dst_host, 0))
                    sent[kind] += 1
        emit({"event": "attacked", "sent": dict(sent), "total": sum(sent.values())})
    raw.close()


def main() -> None:
    mode = sys.argv[1]
    if mode == "peer":
        run_peer(sys.argv[2])
    elif mode == "stall":
        run_stall(sys.argv[2])
    elif mode == "attack":
        run_attack()
    else:
        raise SystemExit(f"punch_peer.py: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
