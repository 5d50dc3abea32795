"""The ng client against a fake rtpengine on a loopback UDP socket: JSON and bencode framing, the
cookie check (a late answer on a kept socket is not taken for the current one), errors, timeouts."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from kemi_o365 import rtpengine_ng


@pytest.fixture
def fake_rtpengine() -> Iterator[tuple[socket.socket, list[bytes]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    received: list[bytes] = []
    yield sock, received
    sock.close()


def serve(
    sock: socket.socket, received: list[bytes], answer: Callable[[bytes, bytes], list[bytes]]
) -> threading.Thread:
    """Answer one request: `answer(cookie, body)` gives the datagrams to send back, in order."""

    def run() -> None:
        data, peer = sock.recvfrom(65535)
        received.append(data)
        cookie, _, body = data.partition(b" ")
        for datagram in answer(cookie, body):
            sock.sendto(datagram, peer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_json_command_round_trip(fake_rtpengine: tuple[socket.socket, list[bytes]]) -> None:
    sock, received = fake_rtpengine
    reply = {"result": "ok", "totals": {"RTP": {"packets": 500}}}
    thread = serve(sock, received, lambda cookie, body: [cookie + b" " + json.dumps(reply).encode()])
    host, port = sock.getsockname()
    got = rtpengine_ng.command_json(host, port, {"command": "delete", "call-id": "c1"}, timeout=1.0)
    thread.join(2)
    assert got == reply
    assert json.loads(received[0].partition(b" ")[2]) == {"command": "delete", "call-id": "c1"}


def test_kept_socket_skips_an_answer_with_another_cookie(
    fake_rtpengine: tuple[socket.socket, list[bytes]],
) -> None:
    sock, received = fake_rtpengine
    late = b"0123456789ab " + json.dumps({"result": "ok", "stale": True}).encode()
    thread = serve(sock, received, lambda cookie, body: [late, cookie + b' {"result": "ok"}'])
    host, port = sock.getsockname()
    try:
        got = rtpengine_ng.command_json(host, port, {"command": "delete", "call-id": "c1"}, keep_socket=True)
    finally:
        # The kept socket lives as long as the process (a Kamailio worker); not a test run's.
        kept = rtpengine_ng._Kept.sock
        if kept is not None:
            kept.close()
        rtpengine_ng._Kept.sock = None
    thread.join(2)
    assert got == {"result": "ok"}


def test_error_result_raises_with_rtpengines_reason(
    fake_rtpengine: tuple[socket.socket, list[bytes]],
) -> None:
    sock, received = fake_rtpengine
    body = b'{"result": "error", "error-reason": "Unknown call-id"}'
    thread = serve(sock, received, lambda cookie, _: [cookie + b" " + body])
    host, port = sock.getsockname()
    with pytest.raises(rtpengine_ng.NgError, match="Unknown call-id"):
        rtpengine_ng.command_json(host, port, {"command": "delete", "call-id": "nope"})
    thread.join(2)


def test_silence_is_a_timeout_naming_the_command(fake_rtpengine: tuple[socket.socket, list[bytes]]) -> None:
    sock, _ = fake_rtpengine
    host, port = sock.getsockname()
    with pytest.raises(rtpengine_ng.NgError, match="did not answer 'delete'"):
        rtpengine_ng.command_json(host, port, {"command": "delete", "call-id": "c1"}, timeout=0.05)


def test_bencode_command_round_trip(fake_rtpengine: tuple[socket.socket, list[bytes]]) -> None:
    sock, received = fake_rtpengine
    reply = rtpengine_ng.bencode({"result": "pong"})
    thread = serve(sock, received, lambda cookie, _: [cookie + b" " + reply])
    host, port = sock.getsockname()
    assert rtpengine_ng.ping(host, port)
    thread.join(2)
    assert rtpengine_ng.bdecode(received[0].partition(b" ")[2]) == {"command": b"ping"}


def test_sent_command_is_answered_later(fake_rtpengine: tuple[socket.socket, list[bytes]]) -> None:
    # A Kamailio worker sends the BYE's delete, relays the BYE, then reads rtpengine's answer.
    sock, received = fake_rtpengine
    thread = serve(sock, received, lambda cookie, _: [cookie + b' {"result": "ok", "totals": {}}'])
    host, port = sock.getsockname()
    try:
        pending = rtpengine_ng.send_json(host, port, {"command": "delete", "call-id": "c1"}, timeout=1.0)
        thread.join(2)  # rtpengine has answered before anyone reads
        assert pending.reply() == {"result": "ok", "totals": {}}
        silent = rtpengine_ng.send_json(host, port, {"command": "delete", "call-id": "c2"}, timeout=0.05)
        with pytest.raises(rtpengine_ng.NgError, match="did not answer 'delete'"):
            silent.reply()
    finally:
        kept = rtpengine_ng._Kept.sock
        if kept is not None:
            kept.close()
        rtpengine_ng._Kept.sock = None


def test_forked_workers_never_send_the_same_cookie(fake_rtpengine: tuple[socket.socket, list[bytes]]) -> None:
    """rtpengine answers a cookie it has already seen with that earlier reply, from whichever process:
    two Kamailio workers with one cookie sequence would get each other's deletes answered (and one
    session never deleted). Each forked process must start its own."""
    sock, _ = fake_rtpengine
    host, port = sock.getsockname()

    def send_two() -> None:
        for n in range(2):
            rtpengine_ng.send_json(host, port, {"command": "delete", "call-id": f"c{n}"})

    try:
        send_two()  # this process's cookies, before the fork
        child = os.fork()
        if child == 0:  # the worker: sends and leaves at once, without pytest's teardown
            try:
                send_two()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        send_two()
        cookies = [sock.recvfrom(65535)[0].partition(b" ")[0] for _ in range(6)]
    finally:
        kept = rtpengine_ng._Kept.sock
        if kept is not None:
            kept.close()
        rtpengine_ng._Kept.sock = None
    assert len(set(cookies)) == 6, cookies
