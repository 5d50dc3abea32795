"""A small TLS SIP peer that plays Microsoft's side (Exchange UM / the Teams proxy) in the lab.

Why our own: Debian's SIPp has no TLS, and the Microsoft side is the one the SBC must satisfy: mutual
TLS, the 200 OK shape of the seed capture (a second, private c= line under m=, one SDES crypto line),
in-dialog BYE along the route set. It answers on the connection a request came in on and never opens
one, so it cannot reach beyond the loopback addresses it is given.

Threads: one accepts, one per connection owns that connection's TLS socket for reading *and* writing
(an OpenSSL connection must not be used from two threads at once); other threads hand it messages
through a queue, which it drains between short reads.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import queue
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from cryptography import x509

from kemi_o365.lab.certs import cert_cn, cert_san_dns
from kemi_o365.sipmsg import SipMessage, SipParseError, StreamReader, header_param, uri_of

log = logging.getLogger(__name__)

# The TLS 1.2 suites Microsoft accepts (MICROSOFT-NOTES.md §1.2); TLS 1.3 suites are not affected.
MS_TLS12_CIPHERS = (
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256"
)
SERVER_HEADER = "RTCC/ MSExchangeUM/15.01.0231.021"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
CRYPTO_SUITE = "AES_CM_128_HMAC_SHA1_80"
SRTP_KEY_BYTES = 30  # 16-byte master key + 14-byte master salt (RFC 4568 §6.2.1)

_POLL = 0.05  # how long a connection thread blocks in recv before looking at its queue
_IO_TIMEOUT = 5.0
_HANDSHAKE_TIMEOUT = 3.0
_STOP_TIMEOUT = 5.0  # longer than a handshake, so stop() outlasts a client stalled mid-handshake

CallState = Literal["proceeding", "answered", "confirmed", "rejected", "cancelled", "ended"]


@dataclass(frozen=True)
class ConnInfo:
    """One accepted TLS connection, as the SBC presented itself on it."""

    peer: tuple[str, int]
    local: tuple[str, int]
    cert_cn: str | None
    san_dns: tuple[str, ...]
    tls_version: str | None
    cipher: str | None


@dataclass(frozen=True)
class Received:
    """A message as it crossed the wire; `at` is time.monotonic(), `wall` time.time()."""

    at: float
    wall: float
    msg: SipMessage
    raw: bytes
    conn: ConnInfo


Sent = Received  # what the peer wrote is recorded the same way


@dataclass(frozen=True)
class TlsFailure:
    """A connection refused during the handshake (no client certificate, unknown CA...)."""

    at: float
    peer: tuple[str, int]
    error: str


@dataclass
class Call:
    """Dialog state the peer keeps per Call-ID (the UAS side of RFC 3261 §12.1.1)."""

    call_id: str
    invite: SipMessage
    conn: ConnInfo
    local_tag: str
    remote_contact: str
    route_set: list[str]
    local_cseq: int
    link: _Link = field(repr=False)
    state: CallState = "proceeding"
    media_port: int = 0
    srtp_key: str = ""  # base64 inline key of our a=crypto line
    media_sock: socket.socket | None = field(default=None, repr=False)
    answer_at: float | None = None  # monotonic deadline of a delayed final answer

    def close_media(self) -> None:
        if self.media_sock is not None:
            self.media_sock.close()
            self.media_sock = None


class _Framer:
    """StreamReader plus the exact bytes of each message, so the recording is verbatim."""

    def __init__(self) -> None:
        self._reader = StreamReader()
        self._raw = b""

    def feed(self, data: bytes) -> list[tuple[SipMessage, bytes]]:
        msgs = self._reader.feed(data)
        self._raw += data
        out: list[tuple[SipMessage, bytes]] = []
        for msg in msgs:
            # Same cut as StreamReader: skip keep-alive CRLFs, headers, blank line, Content-Length bytes.
            self._raw = self._raw.lstrip(b"\r\n")
            total = self._raw.index(b"\r\n\r\n") + 4 + int(msg.get("Content-Length", "0") or "0")
            out.append((msg, self._raw[:total]))
            self._raw = self._raw[total:]
        return out


class _Link:
    """One TLS connection and the thread that owns it."""

    def __init__(self, sock: ssl.SSLSocket, info: ConnInfo) -> None:
        self.sock = sock
        self.info = info
        self.owner = threading.current_thread()
        self.outbox: queue.SimpleQueue[SipMessage] = queue.SimpleQueue()
        self.framer = _Framer()
        self.open = True


class MicrosoftPeer:
    """Microsoft's SIP side over mutual TLS: answers INVITEs like the seed's 200 OK, records everything."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        cert: Path,
        key: Path,
        ca: Path,
        media_ip: str,
        answer_sdp_private_c: str | None = "127.0.0.25",
        require_client_cert: bool = True,
        contact_host: str | None = None,
        ciphers: str = MS_TLS12_CIPHERS,
    ) -> None:
        _require_loopback(host)
        _require_loopback(media_ip)
        self.host = host
        self.port = port
        self.media_ip = media_ip
        self.answer_sdp_private_c = answer_sdp_private_c
        self.require_client_cert = require_client_cert
        # Microsoft puts the name its certificate carries in Contact; without one, the bind address.
        self.contact_host = contact_host or _cert_file_cn(Path(cert)) or host
        self.answer_code: tuple[int, str] = (200, "OK")
        self.answer_delay = 0.0  # > 0: send 180 and answer later, leaving room for a CANCEL
        # When set, an INVITE/OPTIONS on a connection whose client CN differs (case-sensitively) gets
        # 403, as Exchange UM Online answered a wildcard or mismatched certificate (NOTES §1.9).
        self.require_cn: str | None = None
        self.received: list[Received] = []
        self.sent: list[Sent] = []
        self.connections: list[ConnInfo] = []
        self.tls_failures: list[TlsFailure] = []
        self.calls: dict[str, Call] = {}
        self._ctx = _server_context(Path(cert), Path(key), Path(ca), require_client_cert, ciphers)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._conn_threads: list[threading.Thread] = []
        self._links: list[_Link] = []

    # ----- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen (ready to accept when this returns), then serve in daemon threads."""
        if self._accept_thread is not None:
            raise RuntimeError("MicrosoftPeer already started")
        self._stop.clear()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family)
        listener.settimeout(_POLL)
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"ms-peer-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "Microsoft peer listening on %s:%d (contact host %s)", self.host, self.port, self.contact_host
        )

    def stop(self) -> None:
        """Close the listener, every connection and media socket; bounded by _STOP_TIMEOUT."""
        self._stop.set()
        deadline = time.monotonic() + _STOP_TIMEOUT
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            threads = list(self._conn_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            stuck = [link for link in self._links if link.open]
            calls = list(self.calls.values())
        for link in stuck:
            log.warning("connection %s did not stop in time; closing it under its thread", link.info.peer)
            link.sock.close()
        for call in calls:
            call.close_media()
        with self._cond:
            self._conn_threads.clear()
            self._links.clear()
        self._accept_thread = None

    def __enter__(self) -> MicrosoftPeer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- public helpers ---------------------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[Received], bool], timeout: float = 5.0, *, start: int = 0
    ) -> Received:
        """First received message (from index `start`) matching `predicate`; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.received):
                    rec = self.received[index]
                    index += 1
                    if predicate(rec):
                        return rec
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching message within {timeout}s")
                self._cond.wait(remaining)

    def hangup(self, call_id: str, timeout: float = 5.0) -> SipMessage:
        """Send an in-dialog BYE for an answered call and return its final response."""
        with self._cond:
            call = self.calls[call_id]
            if call.state not in ("answered", "confirmed"):
                raise RuntimeError(f"call {call_id} is {call.state}, not answered")
            if not call.link.open:
                raise ConnectionError(f"the connection of call {call_id} is closed")
            call.local_cseq += 1
            cseq = call.local_cseq
            bye = self._in_dialog_request(call, "BYE", cseq)
            start = len(self.received)
        self._emit(call.link, bye)

        def is_final(rec: Received) -> bool:
            m = rec.msg
            return (
                not m.is_request
                and m.get("Call-ID") == call_id
                and _cseq(m) == (cseq, "BYE")
                and m.status >= 200
            )

        final = self.wait_for(is_final, timeout, start=start).msg
        call.state = "ended"
        call.close_media()
        return final

    # ----- connections ------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while not self._stop.is_set():
                try:
                    raw, addr = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.warning("accept failed: %s", exc)
                    return
                thread = threading.Thread(
                    target=self._serve, args=(raw, addr), name=f"ms-peer-conn-{addr[1]}", daemon=True
                )
                with self._cond:
                    self._conn_threads.append(thread)
                thread.start()

    def _serve(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        link = self._handshake(raw, (addr[0], addr[1]))
        if link is None:
            return
        try:
            self._pump(link)
        finally:
            link.open = False
            link.sock.close()
            log.debug("connection %s closed", link.info.peer)

    def _handshake(self, raw: socket.socket, addr: tuple[str, int]) -> _Link | None:
        raw.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            self._tls_failed(addr, exc)
            return None
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            tls.close()
            self._tls_failed(addr, exc)
            return None
        link = _Link(tls, _conn_info(tls, addr))
        with self._cond:
            self._links.append(link)
            self.connections.append(link.info)
            self._cond.notify_all()
        log.info("TLS from %s: CN=%s %s %s", addr, link.info.cert_cn, link.info.tls_version, link.info.cipher)
        return link

    def _tls_failed(self, addr: tuple[str, int], exc: BaseException) -> None:
        log.info("TLS handshake with %s refused: %s", addr, exc)
        with self._cond:
            self.tls_failures.append(TlsFailure(time.monotonic(), addr, str(exc)))
            self._cond.notify_all()

    def _pump(self, link: _Link) -> None:
        link.sock.settimeout(_POLL)
        while not self._stop.is_set():
            try:
                if not self._pump_once(link):
                    return
            except TimeoutError:
                continue
            except OSError as exc:  # ssl.SSLError included: the SBC went away or broke the stream
                log.debug("connection %s ended: %s", link.info.peer, exc)
                return
            except SipParseError as exc:
                log.warning("unreadable SIP from %s, closing: %s", link.info.peer, exc)
                return

    def _pump_once(self, link: _Link) -> bool:
        """Send what is queued or due, then read once; False when the SBC closed the connection."""
        self._flush(link)
        self._answer_due(link)
        data = link.sock.recv(65536)
        if not data:
            return False
        for msg, raw in link.framer.feed(data):
            self._record(self.received, msg, raw, link.info)
            self._dispatch(link, msg)
        return True

    def _flush(self, link: _Link) -> None:
        while True:
            try:
                msg = link.outbox.get_nowait()
            except queue.Empty:
                return
            self._send(link, msg)

    def _emit(self, link: _Link, msg: SipMessage) -> None:
        """Send now if we own the connection, else hand it to the thread that does."""
        if threading.current_thread() is link.owner:
            self._send(link, msg)
        else:
            link.outbox.put(msg)

    def _send(self, link: _Link, msg: SipMessage) -> None:
        raw = msg.to_bytes()
        link.sock.settimeout(_IO_TIMEOUT)
        try:
            link.sock.sendall(raw)
        finally:
            link.sock.settimeout(_POLL)
        self._record(self.sent, msg, raw, link.info)

    def _record(self, store: list[Received], msg: SipMessage, raw: bytes, conn: ConnInfo) -> None:
        with self._cond:
            store.append(Received(time.monotonic(), time.time(), msg, raw, conn))
            self._cond.notify_all()

    # ----- requests ---------------------------------------------------------------------------

    def _dispatch(self, link: _Link, msg: SipMessage) -> None:
        if not msg.is_request:
            return  # responses only matter to whoever waits for them (hangup)
        handlers: dict[str, Callable[[_Link, SipMessage], None]] = {
            "INVITE": self._on_invite,
            "ACK": self._on_ack,
            "BYE": self._on_bye,
            "CANCEL": self._on_cancel,
            "OPTIONS": self._on_options,
        }
        handlers.get(msg.method, self._on_unknown)(link, msg)

    def _cn_refused(self, link: _Link, msg: SipMessage) -> bool:
        if self.require_cn is None or link.info.cert_cn == self.require_cn:
            return False
        self._send(link, self._response(link, msg, 403, "Forbidden"))
        return True

    def _on_invite(self, link: _Link, msg: SipMessage) -> None:
        if self._cn_refused(link, msg):
            return
        call_id = msg.get("Call-ID")
        existing = self.calls.get(call_id)
        if existing is not None and header_param(msg.get("To"), "tag"):
            self._on_reinvite(link, msg, existing)
            return
        self._send(link, self._response(link, msg, 100, "Trying", tag=False))
        call = Call(
            call_id=call_id,
            invite=msg,
            conn=link.info,
            local_tag=secrets.token_hex(5),
            remote_contact=uri_of(msg.get("Contact")),
            route_set=[r for value in msg.get_all("Record-Route") for r in split_name_addrs(value)],
            # Our CSeq space is independent of the caller's (RFC 3261 §12.1.1); any start works.
            local_cseq=secrets.randbelow(10_000) + 1,
            link=link,
        )
        with self._cond:
            self.calls[call_id] = call
        if self.answer_delay > 0:
            self._send(link, self._response(link, msg, 180, "Ringing", tag=call.local_tag))
            call.answer_at = time.monotonic() + self.answer_delay
        else:
            self._answer(link, call)

    def _on_reinvite(self, link: _Link, msg: SipMessage, call: Call) -> None:
        # A session refresh: the media does not change, so the same answer (same o= version) is right.
        if call.state not in ("answered", "confirmed"):
            self._send(link, self._response(link, msg, 481, "Call/Transaction Does Not Exist"))
            return
        self._send(link, self._ok_with_answer(link, msg, call))

    def _answer_due(self, link: _Link) -> None:
        now = time.monotonic()
        with self._cond:
            due = [
                c
                for c in self.calls.values()
                if c.link is link and c.answer_at is not None and c.answer_at <= now
            ]
        for call in due:
            call.answer_at = None
            if call.state == "proceeding":
                self._answer(link, call)

    def _answer(self, link: _Link, call: Call) -> None:
        code, reason = self.answer_code
        if not 200 <= code < 300:
            call.state = "rejected"
            self._send(link, self._response(link, call.invite, code, reason, tag=call.local_tag))
            return
        family = socket.AF_INET6 if ":" in self.media_ip else socket.AF_INET
        media = socket.socket(family, socket.SOCK_DGRAM)
        media.bind((self.media_ip, 0))
        call.media_sock = media
        call.media_port = media.getsockname()[1]
        call.srtp_key = base64.b64encode(secrets.token_bytes(SRTP_KEY_BYTES)).decode()
        call.state = "answered"
        self._send(link, self._ok_with_answer(link, call.invite, call, code, reason))
        log.info("answered call %s, media %s:%d", call.call_id, self.media_ip, call.media_port)

    def _on_ack(self, link: _Link, msg: SipMessage) -> None:
        call = self.calls.get(msg.get("Call-ID"))
        if call is not None and call.state == "answered":
            call.state = "confirmed"

    def _on_bye(self, link: _Link, msg: SipMessage) -> None:
        call = self.calls.get(msg.get("Call-ID"))
        if call is None or call.state not in ("answered", "confirmed"):
            self._send(link, self._response(link, msg, 481, "Call/Transaction Does Not Exist"))
            return
        call.state = "ended"
        call.close_media()
        self._send(link, self._response(link, msg, 200, "OK"))

    def _on_cancel(self, link: _Link, msg: SipMessage) -> None:
        call = self.calls.get(msg.get("Call-ID"))
        branch = header_param(msg.get("Via"), "branch")
        if call is None or branch != header_param(call.invite.get("Via"), "branch"):
            self._send(link, self._response(link, msg, 481, "Call/Transaction Does Not Exist"))
            return
        # RFC 3261 §9.2: the CANCEL always gets 200; only a pending INVITE is ended, with 487.
        self._send(link, self._response(link, msg, 200, "OK", tag=call.local_tag))
        if call.state == "proceeding":
            call.answer_at = None
            call.state = "cancelled"
            self._emit(
                call.link,
                self._response(call.link, call.invite, 487, "Request Terminated", tag=call.local_tag),
            )

    def _on_options(self, link: _Link, msg: SipMessage) -> None:
        if self._cn_refused(link, msg):
            return
        extra = [("Allow", ALLOW), ("Accept", "application/sdp"), ("Server", SERVER_HEADER)]
        self._send(link, self._response(link, msg, 200, "OK", extra=extra))

    def _on_unknown(self, link: _Link, msg: SipMessage) -> None:
        self._send(link, self._response(link, msg, 501, "Not Implemented", extra=[("Allow", ALLOW)]))

    # ----- message building -------------------------------------------------------------------

    def _response(
        self,
        link: _Link,
        req: SipMessage,
        code: int,
        reason: str,
        *,
        tag: str | bool = True,
        extra: list[tuple[str, str]] | None = None,
    ) -> SipMessage:
        """A response in the seed's header order; `tag` True adds a fresh To tag when none is there."""
        to = req.get("To")
        if tag is not False and not header_param(to, "tag"):
            to = f"{to};tag={tag if isinstance(tag, str) else secrets.token_hex(5)}"
        vias = req.get_all("Via")
        if vias:
            vias[0] = with_received(vias[0], link.info.peer[0])
        headers = [("To", to), *(("Via", v) for v in vias)]
        headers += [("From", req.get("From")), ("Call-ID", req.get("Call-ID")), ("CSeq", req.get("CSeq"))]
        return SipMessage(f"SIP/2.0 {code} {reason}", headers + (extra or []))

    def _ok_with_answer(
        self, link: _Link, invite: SipMessage, call: Call, code: int = 200, reason: str = "OK"
    ) -> SipMessage:
        resp = self._response(link, invite, code, reason, tag=call.local_tag)
        resp.headers += [("Record-Route", rr) for rr in invite.get_all("Record-Route")]
        resp.headers += [
            ("Contact", f"<sip:{self.contact_host}:{self.port};transport=tls>"),
            ("Content-Type", "application/sdp"),
            ("P-Asserted-Identity", f"<{uri_of(invite.get('To'))}>"),
            ("Server", SERVER_HEADER),
            ("Session-Expires", "1800;refresher=uac"),
            ("Min-SE", "1800"),
        ]
        resp.body = self._answer_sdp(call)
        return resp

    def _answer_sdp(self, call: Call) -> str:
        net = "IP6" if ":" in self.media_ip else "IP4"
        lines = [
            "v=0",
            f"o=- 85 0 IN {net} {self.media_ip}",
            "s=session",
            f"c=IN {net} {self.media_ip}",
            "t=0 0",
            f"m=audio {call.media_port} RTP/SAVP 0 101",
        ]
        if self.answer_sdp_private_c:
            # Exchange UM added its internal address at media level, overriding the session c=; the
            # seed's SBC had to strip it. Nothing listens there, so an SBC that keeps it loses audio.
            lines.append(f"c=IN IP4 {self.answer_sdp_private_c}")
        lines += [
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16,36",
            f"a=crypto:1 {CRYPTO_SUITE} inline:{call.srtp_key}",
        ]
        return "\r\n".join(lines) + "\r\n"

    def _in_dialog_request(self, call: Call, method: str, cseq: int) -> SipMessage:
        """RFC 3261 §12.2.1.1 from the UAS side: R-URI = remote target, Route = Record-Route as received."""
        invite = call.invite
        sent_by = f"[{self.host}]" if ":" in self.host else self.host
        headers = [("Via", f"SIP/2.0/TLS {sent_by}:{self.port};branch=z9hG4bK{secrets.token_hex(8)}")]
        # Loose routing assumed: Kamailio's Record-Route always carries ;lr.
        headers += [("Route", route) for route in call.route_set]
        headers += [
            ("Max-Forwards", "70"),
            ("From", _with_tag(invite.get("To"), call.local_tag)),
            ("To", invite.get("From")),
            ("Call-ID", call.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("User-Agent", SERVER_HEADER),
        ]
        return SipMessage(f"{method} {call.remote_contact} SIP/2.0", headers)


# ----- small pure helpers ---------------------------------------------------------------------


def split_name_addrs(value: str) -> list[str]:
    """Split a comma-joined header value (Route, Record-Route) at commas outside <> and quotes."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "<>":
            depth += 1 if ch == "<" else -1
        elif ch == "," and not quoted and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


_SENT_BY = re.compile(r"\s*SIP\s*/\s*2\.0\s*/\s*\S+\s+(\[[^\]]+\]|[^:;,\s]+)(:\d+)?", re.IGNORECASE)


def with_received(via: str, source_ip: str) -> str:
    """Add received= after sent-by when the host differs from the packet source (RFC 3261 §18.2.1)."""
    m = _SENT_BY.match(via)
    if m is None or m.group(1).strip("[]") == source_ip or header_param(via, "received") is not None:
        return via
    return f"{via[: m.end()]};received={source_ip}{via[m.end() :]}"


def _with_tag(value: str, tag: str) -> str:
    return value if header_param(value, "tag") else f"{value};tag={tag}"


def _cseq(msg: SipMessage) -> tuple[int, str]:
    number, _, method = msg.get("CSeq").strip().partition(" ")
    return (int(number), method.strip()) if number.isdigit() else (-1, method.strip())


def _require_loopback(address: str) -> None:
    # The lab rule: nothing here may ever talk to a non-loopback address.
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"{address} is not a loopback address")


def _cert_file_cn(path: Path) -> str | None:
    return cert_cn(x509.load_pem_x509_certificate(path.read_bytes()))


def _server_context(
    cert: Path, key: Path, ca: Path, require_client_cert: bool, ciphers: str
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    # Optional still asks for (and verifies) a certificate, so the recording shows what the SBC sent.
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _conn_info(tls: ssl.SSLSocket, addr: tuple[str, int]) -> ConnInfo:
    der = tls.getpeercert(binary_form=True)
    cn: str | None = None
    sans: tuple[str, ...] = ()
    if der:
        cert = x509.load_der_x509_certificate(der)
        cn, sans = cert_cn(cert), cert_san_dns(cert)
    cipher = tls.cipher()
    local = tls.getsockname()
    return ConnInfo(
        peer=addr,
        local=(local[0], local[1]),
        cert_cn=cn,
        san_dns=sans,
        tls_version=tls.version(),
        cipher=cipher[0] if cipher else None,
    )
