"""A tiny TCP echo server for lab nodes: ``python -m rawpunch.lab.echo --port N``.

Each connection first receives one line ``<peer ip>:<peer port>\\n`` (the source address the server saw,
i.e. the address a NAT mapped the client to), then its bytes echoed back until it closes. The server prints
``listening <ip>:<port>`` on stdout once it accepts connections, so a test can wait for that line instead of
sleeping, and exits by itself after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

READY_PREFIX = "listening "


def _serve_one(conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.settimeout(10.0)
        try:
            conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass  # a reset or timed-out client is not the server's problem


def serve(host: str, port: int, lifetime: float) -> None:
    deadline = time.monotonic() + lifetime
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(16)
        srv.settimeout(0.5)
        bound = srv.getsockname()
        print(f"{READY_PREFIX}{bound[0]}:{bound[1]}", flush=True)
        while time.monotonic() < deadline:
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_serve_one, args=(conn, peer), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawpunch.lab.echo", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--lifetime", type=float, default=300.0, help="exit after this many seconds")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
