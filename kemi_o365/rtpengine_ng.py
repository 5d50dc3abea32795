"""A small client for rtpengine's ng control protocol (bencode or JSON over UDP): ping, list, query,
delete.

Used by the lab and `kemi-o365 status` to ask rtpengine what it holds, and by the Kamailio workers
for one thing the rtpengine module cannot do: a BYE's delete whose reply (the final statistics) the
call record keeps. Offers and answers go through Kamailio's rtpengine module.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

Bencodable: TypeAlias = "int | bytes | str | list[Bencodable] | dict[str, Bencodable]"
Decoded: TypeAlias = "int | bytes | list[Decoded] | dict[str, Decoded]"


class NgError(Exception):
    """rtpengine did not answer, or answered with an error."""


def bencode(value: Bencodable) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    items = sorted(value.items())
    return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"


def bdecode(data: bytes) -> Decoded:
    value, end = _decode(data, 0)
    if end != len(data):
        raise NgError("trailing bytes after bencoded value")
    return value


def _decode(data: bytes, i: int) -> tuple[Decoded, int]:
    lead = data[i : i + 1]
    if lead == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1 : end]), end + 1
    if lead in (b"l", b"d"):
        i += 1
        items: list[Decoded] = []
        while data[i : i + 1] != b"e":
            item, i = _decode(data, i)
            items.append(item)
        if lead == b"l":
            return items, i + 1
        keys = items[0::2]
        return {
            k.decode() if isinstance(k, bytes) else str(k): v for k, v in zip(keys, items[1::2], strict=True)
        }, i + 1
    colon = data.index(b":", i)
    length = int(data[i:colon])
    start = colon + 1
    return data[start : start + length], start + length


def command(host: str, port: int, message: dict[str, Bencodable], timeout: float = 1.0) -> dict[str, Decoded]:
    """Send one ng command and return the decoded reply dictionary."""
    reply = bdecode(_exchange(host, port, message, bencode(message), timeout, keep_socket=False))
    if not isinstance(reply, dict):
        raise NgError("reply is not a dictionary")
    if reply.get("result") == b"error":
        reason = reply.get("error-reason", b"")
        raise NgError(f"rtpengine error: {reason.decode() if isinstance(reason, bytes) else reason}")
    return reply


def command_json(
    host: str, port: int, message: dict[str, str | int], timeout: float = 1.0, *, keep_socket: bool = False
) -> dict[str, Any]:
    """The same in JSON, which rtpengine (10.5 too) answers in JSON: the reply is decoded by CPython's
    C parser, several times faster than bencode in Python for a delete's statistics. `keep_socket`:
    reuse this process's socket next time (Kamailio workers send one per call ending)."""
    payload = json.dumps(message).encode()
    return _json_reply(_exchange(host, port, message, payload, timeout, keep_socket=keep_socket))


@dataclass
class Pending:
    """A JSON command sent on this process's kept socket; its answer is read with `reply()`, so the
    caller can do other work while rtpengine handles it."""

    host: str
    port: int
    command: str
    cookie: bytes
    deadline: float

    def reply(self) -> dict[str, Any]:
        sock = _kept_socket()
        return _json_reply(
            _receive(sock, self.cookie, self.deadline, f"{self.host}:{self.port}", self.command)
        )


def send_json(host: str, port: int, message: dict[str, str | int], timeout: float = 1.0) -> Pending:
    """Send a JSON command on the kept socket without waiting; `Pending.reply()` waits until `timeout`
    after the send at most."""
    cookie = b"%s%x" % (_Kept.prefix, next(_Kept.cookies))
    _kept_socket().sendto(cookie + b" " + json.dumps(message).encode(), (host, port))
    return Pending(host, port, str(message.get("command")), cookie, time.monotonic() + timeout)


def _json_reply(body: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(body)
    except ValueError as exc:
        raise NgError(f"rtpengine's reply is not JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise NgError("reply is not a dictionary")
    if reply.get("result") == "error":
        raise NgError(f"rtpengine error: {reply.get('error-reason', '')}")
    return reply


def _exchange(
    host: str, port: int, message: Mapping[str, object], payload: bytes, timeout: float, *, keep_socket: bool
) -> bytes:
    cookie = os.urandom(6).hex().encode()
    sock = _kept_socket() if keep_socket else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(cookie + b" " + payload, (host, port))
        return _receive(
            sock, cookie, time.monotonic() + timeout, f"{host}:{port}", str(message.get("command"))
        )
    finally:
        if not keep_socket:
            sock.close()


def _receive(sock: socket.socket, cookie: bytes, deadline: float, where: str, command: str) -> bytes:
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError as exc:
            raise NgError(f"rtpengine at {where} did not answer {command!r}") from exc
        got_cookie, _, body = data.partition(b" ")
        if got_cookie == cookie:
            return body
        # Otherwise a late answer to an earlier command on the kept socket: skipped.


class _Kept:
    sock: socket.socket | None = None
    # rtpengine answers a cookie it has seen with its cached reply, whoever sends it: every
    # process needs its own sequence (pid and a random start), not a getrandom call per command.
    prefix = b""
    cookies = itertools.count()


def _new_process() -> None:
    # A socket inherited across fork() would be shared by every Kamailio worker.
    _Kept.sock = None
    _Kept.prefix = b"%x-%s-" % (os.getpid(), os.urandom(3).hex().encode())
    _Kept.cookies = itertools.count()


_new_process()
os.register_at_fork(after_in_child=_new_process)


def _kept_socket() -> socket.socket:
    if _Kept.sock is None:
        _Kept.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return _Kept.sock


def ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        return command(host, port, {"command": "ping"}, timeout).get("result") == b"pong"
    except (NgError, OSError):
        return False


def list_calls(host: str, port: int) -> list[str]:
    """Call-IDs of every session rtpengine holds."""
    reply = command(host, port, {"command": "list", "limit": 1000})
    calls = reply.get("calls", [])
    if not isinstance(calls, list):
        raise NgError("'calls' is not a list")
    return [c.decode() for c in calls if isinstance(c, bytes)]
