"""The window scale rawpunch offers is the one this kernel offers in its own SYNs."""

from __future__ import annotations

import socket
import struct

import pytest

from rawpunch.punch.splice import kernel_wscale

TCP_INFO_WSCALE_OFFSET = 6  # struct tcp_info: state, ca_state, retransmits, probes, backoff, options, wscales


def _wscales(sock: socket.socket) -> tuple[int, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    (packed,) = struct.unpack_from("B", raw, TCP_INFO_WSCALE_OFFSET)
    return packed & 0x0F, packed >> 4  # snd_wscale, rcv_wscale


def test_matches_a_kernel_made_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert _wscales(client) == (kernel_wscale(), kernel_wscale())


@pytest.mark.parametrize(
    ("rmem_max", "tcp_rmem_max", "expected"),
    [
        (212992, 6291456, 7),  # Linux defaults on a small machine: 6 MiB -> 6 MiB >> 7 fits 16 bits
        (4194304, 33554432, 10),  # 32 MiB
        (65535, 65535, 0),  # fits without scaling
        (65536, 0, 1),
        (1 << 40, 0, 14),  # RFC 7323 section 2.3: never more than 14
    ],
)
def test_shift_is_the_smallest_that_fits_the_largest_buffer(
    rmem_max: int, tcp_rmem_max: int, expected: int
) -> None:
    assert kernel_wscale(rmem_max, tcp_rmem_max) == expected
