"""Kamailio's JSON-RPC over the run's datagram socket (jsonrpcs module, transport 4)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

_ids = itertools.count(1)


class RpcError(Exception):
    """Kamailio did not answer, or answered with an error."""


def call(sock_path: Path, method: str, *params: Any, timeout: float = 3.0) -> Any:
    """Run one RPC command and return its `result`."""
    request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(_ids)}
    with tempfile.TemporaryDirectory(prefix="kemi-o365-rpc-") as tmp:
        reply_path = os.path.join(tmp, "reply.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(reply_path)
            sock.settimeout(timeout)
            try:
                sock.sendto(json.dumps(request).encode(), str(sock_path))
                chunks = [sock.recv(1 << 20)]
                # Large results (app_python.api_list) arrive in several datagrams.
                with contextlib.suppress(TimeoutError):
                    while not _complete(b"".join(chunks)):
                        sock.settimeout(0.5)
                        chunks.append(sock.recv(1 << 20))
            except (TimeoutError, FileNotFoundError, ConnectionRefusedError) as exc:
                raise RpcError(f"Kamailio RPC socket {sock_path} did not answer {method}: {exc}") from exc
    reply = json.loads(b"".join(chunks))
    if "error" in reply:
        raise RpcError(f"{method}: {reply['error'].get('message', reply['error'])}")
    return reply.get("result")


def _complete(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True
