"""A client that takes the front door's stream slots without ever finishing a call: raw HTTP/2
(no library), a gRPC HEADERS frame, then a DATA frame whose gRPC length prefix announces 1,000
bytes but carries 9, half-closed. grpcio waits for the rest for ever; only bounds in Envoy and the
services keep such streams from starving everyone else. No API key: the call never gets that far."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    encoded_name, encoded_value = name.encode(), value.encode()
    return b"\x00" + bytes([len(encoded_name)]) + encoded_name + bytes([len(encoded_value)]) + encoded_value


@contextlib.contextmanager
def truncated_streams(
    host: str, port: int, *, connections: int, streams_per_connection: int, path: str
) -> Iterator[None]:
    """Open the streams and hold them (the sockets stay open) until the block ends."""
    sockets = []
    block = b"".join(
        _literal(name, value)
        for name, value in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    truncated = b"\x00" + struct.pack(">I", 1000) + b"x" * 9
    try:
        for _ in range(connections):
            sock = socket.create_connection((host, port), timeout=5)
            sockets.append(sock)
            sock.sendall(PREFACE + _frame(SETTINGS, 0, 0))
            with contextlib.suppress(TimeoutError):
                sock.recv(65536)  # the server's SETTINGS
            frames = [_frame(SETTINGS, ACK, 0)]
            for index in range(streams_per_connection):
                stream = 1 + 2 * index
                frames += [
                    _frame(HEADERS, END_HEADERS, stream, block),
                    _frame(DATA, END_STREAM, stream, truncated),
                ]
            sock.sendall(b"".join(frames))
        yield
    finally:
        for sock in sockets:
            sock.close()
