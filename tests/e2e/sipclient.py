"""A one-shot SIP client for requests SIPp scenarios do not cover (stray sources, bad headers).

Sends one request over UDP or TCP from a chosen loopback address and collects responses until a
final one or the timeout.
"""

from __future__ import annotations

import os
import socket
import time

from kemi_o365.sipmsg import SipMessage, StreamReader, parse


def request(
    method: str,
    ruri: str,
    *,
    src_ip: str = "127.0.0.4",
    call_id: str | None = None,
    max_forwards: int = 70,
    extra: tuple[tuple[str, str], ...] = (),
    body: str = "",
) -> SipMessage:
    tag = os.urandom(4).hex()
    headers = [
        ("Via", f"SIP/2.0/UDP {src_ip}:5999;branch=z9hG4bK{os.urandom(6).hex()};rport"),
        ("Max-Forwards", str(max_forwards)),
        ("From", f"<sip:10048@{src_ip}>;tag={tag}"),
        ("To", f"<{ruri}>"),
        ("Call-ID", call_id or f"{os.urandom(8).hex()}@{src_ip}"),
        ("CSeq", f"1 {method}"),
        ("Contact", f"<sip:10048@{src_ip}:5999>"),
        *extra,
    ]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return SipMessage(f"{method} {ruri} SIP/2.0", headers, body)


def send(
    msg: SipMessage,
    target: tuple[str, int],
    *,
    transport: str = "udp",
    src_ip: str = "127.0.0.4",
    timeout: float = 3.0,
) -> list[SipMessage]:
    """Responses received to `msg`, in order, up to and including the first final one."""
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((src_ip, 0))
        port = sock.getsockname()[1]
        msg.set("Via", msg.get("Via").replace(":5999", f":{port}").replace("UDP", transport.upper()))
        sock.settimeout(timeout)
        if transport == "udp":
            sock.sendto(msg.to_bytes(), target)
        else:
            sock.connect(target)
            sock.sendall(msg.to_bytes())
        return _collect(sock, transport, timeout)


def _collect(sock: socket.socket, transport: str, timeout: float) -> list[SipMessage]:
    out: list[SipMessage] = []
    reader = StreamReader()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        if not data:
            break
        got = [parse(data)] if transport == "udp" else reader.feed(data)
        out += [m for m in got if not m.is_request]
        if any(m.status >= 200 for m in out):
            break
    return out
