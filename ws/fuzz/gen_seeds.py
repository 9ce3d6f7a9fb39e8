#!/usr/bin/env python3
"""Regenerates the committed seed corpora under corpus/<target>/seed-*.

The seeds are committed; this script only documents how they were made and rebuilds them
(`python3 gen_seeds.py`). Input layouts are described at the top of each fuzz target.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def request(path="/vnc/abc", extra="", method="GET", version="HTTP/1.1", drop=()):
    headers = [
        ("Host", "gw:8080"),
        ("Connection", "Upgrade"),
        ("Pragma", "no-cache"),
        ("Cache-Control", "no-cache"),
        ("Upgrade", "websocket"),
        ("Origin", "http://localhost:8000"),
        ("Sec-WebSocket-Version", "13"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
        ("Sec-WebSocket-Key", KEY),
    ]
    head = f"{method} {path} {version}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers if k not in drop)
    return (head + extra + "\r\n").encode()


def handshake():
    write("handshake", "novnc", request())
    write("handshake", "binary-subprotocol",
          request(extra="Sec-WebSocket-Protocol: binary\r\n"))
    write("handshake", "token-subprotocol",
          request(extra="Sec-WebSocket-Protocol: binary, vncgate.token.s3cr3t-T0k3n\r\n"))
    write("handshake", "bearer", request(extra="Authorization: Bearer eyJhbGciOi.x.y\r\n"))
    write("handshake", "query-token", request(path="/vnc/vm-42_a.b?x=1&token=fromquery"))
    write("handshake", "lowercase-keepalive", (
        "GET /vnc/abc HTTP/1.1\r\nhost: gw\r\nupgrade: WebSocket\r\n"
        "connection: keep-alive, Upgrade\r\nsec-websocket-version: 13\r\n"
        f"sec-websocket-key: {KEY}\r\n\r\n").encode())
    # Early frame bytes right after the head (a masked empty binary frame).
    write("handshake", "early-frame", request() + bytes([0x82, 0x80]) + MASK)
    write("handshake", "bare-lf", request().replace(b"\r\n", b"\n"))
    write("handshake", "partial", request()[:60])
    write("handshake", "post", request(method="POST"))
    write("handshake", "http10", request(version="HTTP/1.0"))
    write("handshake", "not-found", request(path="/other/abc"))
    write("handshake", "bad-session", request(path="/vnc/a%20b"))
    write("handshake", "no-upgrade", request(drop=("Upgrade",)))
    write("handshake", "version-8",
          request().replace(b"Version: 13", b"Version: 8"))
    write("handshake", "short-key", request().replace(KEY.encode(), b"c2hvcnQ="))
    write("handshake", "unsupported-subprotocol",
          request(extra="Sec-WebSocket-Protocol: base64\r\n"))
    write("handshake", "dup-host", request(extra="Host: other\r\n"))
    write("handshake", "bad-token", request(extra="Authorization: Bearer a\x01b\r\n"))
    write("handshake", "garbage", b"GARBAGE\r\n\r\n")


def frame(b0, payload, mask=MASK, masked=True, length=None):
    n = len(payload) if length is None else length
    out = bytes([b0])
    m = 0x80 if masked else 0
    if n < 126:
        out += bytes([m | n])
    elif n <= 0xFFFF:
        out += bytes([m | 126]) + struct.pack(">H", n)
    else:
        out += bytes([m | 127]) + struct.pack(">Q", n)
    if masked:
        out += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return out + payload


def frames_seed(name, wire, limit=0, sizes=b""):
    write("frames", name, bytes([limit, len(sizes)]) + sizes + wire)


def frames():
    body = bytes(i % 251 for i in range(300))
    frames_seed("hello", frame(0x82, b"Hello"))
    frames_seed("empty-binary", frame(0x82, b""))
    frames_seed("len125", frame(0x82, body[:125]))
    frames_seed("len16-126", frame(0x82, body[:126]), sizes=bytes([0, 2, 6]))
    frames_seed("len16-300", frame(0x82, body), sizes=bytes([9, 100]))
    # A 64-bit length with only a few payload bytes present (the rest never arrives).
    frames_seed("len64-truncated", frame(0x82, b"", length=70000) + b"abcdefgh")
    frames_seed("fragmented", frame(0x02, b"abc") + frame(0x89, b"p1") + frame(0x00, b"def")
                + frame(0x8A, b"") + frame(0x80, b"g") + frame(0x82, b"h"),
                sizes=bytes([0, 4, 1]))
    frames_seed("ping-pong", frame(0x89, b"hi") + frame(0x8A, b"hello pong"))
    frames_seed("close-empty", frame(0x88, b""))
    frames_seed("close-1000-reason", frame(0x88, struct.pack(">H", 1000) + "bye κό".encode()))
    frames_seed("close-4001-then-data", frame(0x88, struct.pack(">H", 4001)) + frame(0x82, b"x"))
    frames_seed("close-bad-code", frame(0x88, struct.pack(">H", 1005)))
    frames_seed("close-bad-utf8", frame(0x88, struct.pack(">H", 1000) + b"\xff\xfe"))
    frames_seed("close-one-byte", frame(0x88, b"\x03"))
    frames_seed("unmasked", frame(0x82, b"x", masked=False))
    frames_seed("text", frame(0x81, b"text"))
    frames_seed("rsv", frame(0xC2, b"x"))
    frames_seed("control-too-long", bytes([0x89, 0x80 | 126, 0, 126]) + MASK)
    frames_seed("length-msb", bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 63) + MASK)
    # The 1009 cap across fragments, with a 12-byte max_message (limit byte 0xC3).
    frames_seed("too-big-fragments", frame(0x02, bytes(6)) + frame(0x80, bytes(7)), limit=0xC3)


def unmask_seed(name, mask, offset, align, split, data):
    write("unmask", name,
          bytes(mask) + struct.pack("<Q", offset) + bytes([align]) + struct.pack("<H", split)
          + data)


def unmask():
    unmask_seed("hello", MASK, 0, 0, 0, bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58]))
    unmask_seed("aligned-64", MASK, 0, 0, 32, bytes(range(64)))
    unmask_seed("offset1-align3", [1, 2, 3, 4], 1, 3, 7, bytes(range(37)))
    unmask_seed("offset-huge", [0xFF, 0, 0xFF, 0], (1 << 64) - 3, 5, 9, bytes(range(23)))
    unmask_seed("len-126", [9, 8, 7, 6], 2, 1, 126, bytes(200))
    unmask_seed("len-65536", MASK, 65536, 0, 0xFFFF, b"x" * 16)
    unmask_seed("utf8-reason", MASK, 3, 7, 1000, ("é" * 70).encode())
    unmask_seed("empty", MASK, 0, 0, 0, b"")


if __name__ == "__main__":
    handshake()
    frames()
    unmask()
