"""A small TLS SIP peer that plays Microsoft's side (Exchange UM / the Teams proxy) in the lab.

Why our own: Debian's SIPp has no TLS, and the Microsoft side is the one the SBC must satisfy: mutual
TLS, the 200 OK shape of the seed capture (a second, private c= line under m=, one SDES crypto line),
in-dialog BYE along the route set. It enforces exactly the rules of `kemi_o365.rules` for its profile
and, like Microsoft, answers a breach with 403/488, naming the rule in a Warning header.

Teams answering mode (`teams_ringing`, `teams_early_media`): like the Teams proxy on an inbound call
(MICROSOFT-NOTES §1.5), several 180 Ringing, each with a To-tag of its own (forked early dialogs), then
one 183 Session Progress with the media processor's SDP, then the 200 OK with the same SDP and the
183's To-tag. Off by default, so the Exchange UM behaviour (100, 200) stays as it was.

It answers on the connection a request came in on. Requests Microsoft starts (re-INVITE, MWI NOTIFY,
Play on Phone) go out on a connection of its own to the SBC's external listener: Microsoft does not
reuse the SBC's connections (no RFC 5923 aliasing, MICROSOFT-NOTES §1.6), and the seed 003 Acme SBC
failed exactly these requests because it refused Microsoft's own connections. Every address, ours and
the targets, must be a loopback one.

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
from kemi_o365.policy.model import Profile
from kemi_o365.rules import InviteView, Violation, evaluate
from kemi_o365.sipmsg import SipMessage, SipParseError, StreamReader, header_param, uri_host, uri_of

log = logging.getLogger(__name__)

# The TLS 1.2 suites Microsoft accepts (MICROSOFT-NOTES.md §1.2); TLS 1.3 suites are not affected.
MS_TLS12_CIPHERS = (
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256"
)
SERVER_HEADER = "RTCC/ MSExchangeUM/15.01.0231.021"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
# What the Teams SIP proxy sends (MICROSOFT-NOTES §1.3: a Kamailio trace of Microsoft's OPTIONS).
TEAMS_SERVER_HEADER = "Microsoft.PSTNHub.SIPProxy"
TEAMS_ALLOW = "INVITE,ACK,OPTIONS,CANCEL,BYE,NOTIFY"
# RFC 3261 §20.43: 399 is the "miscellaneous" warn-code, free text for the rule that failed.
WARN_CODE = 399
MWI_CONTENT_TYPE = "application/simple-message-summary"  # RFC 3842 §6
CRYPTO_SUITE = "AES_CM_128_HMAC_SHA1_80"
SRTP_KEY_BYTES = 30  # 16-byte master key + 14-byte master salt (RFC 4568 §6.2.1)

_POLL = 0.05  # how long a connection thread blocks in recv before looking at its queue
_IO_TIMEOUT = 5.0
_HANDSHAKE_TIMEOUT = 3.0
_STOP_TIMEOUT = 5.0  # longer than a handshake, so stop() outlasts a client stalled mid-handshake

CallState = Literal["proceeding", "answered", "confirmed", "rejected", "cancelled", "ended"]


@dataclass(frozen=True)
class ConnInfo:
    """One TLS connection, as the SBC presented itself on it (client cert, or server cert if outbound)."""

    peer: tuple[str, int]
    local: tuple[str, int]
    cert_cn: str | None
    san_dns: tuple[str, ...]
    tls_version: str | None
    cipher: str | None
    outbound: bool = False
    """True: the peer opened it (requests Microsoft starts); False: the SBC did."""
    sni: str | None = None
    """The server name the SBC asked for in its ClientHello (connections the SBC opened)."""

    @property
    def names(self) -> tuple[str, ...]:
        """CN first ("" if none), then SAN DNS names; () without a certificate (rules.InviteView)."""
        if self.cert_cn is None and not self.san_dns:
            return ()
        return (self.cert_cn or "", *self.san_dns)


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
    """Dialog state the peer keeps per Call-ID (RFC 3261 §12.1.1 as UAS, §12.1.2 for calls it starts)."""

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
    local_party: str = ""  # our From/To value in in-dialog requests, with our tag
    remote_party: str = ""  # theirs, with their tag
    destination_host: str | None = None  # host the dialog's INVITE was addressed to (rule to-host)
    outbound: bool = False  # True: the peer started the call (Play on Phone)
    sdp_version: int = 0  # o= version of our SDP; RFC 3264 §8 wants +1 for each changed offer

    def close_media(self) -> None:
        if self.media_sock is not None:
            self.media_sock.close()
            self.media_sock = None


class _Framer:
    """StreamReader plus the exact bytes of each message, so the recording is verbatim."""

    def __init__(self) -> None:
        self._reader = StreamReader()
        self._raw = b""

    @property
    def keepalives(self) -> int:
        return self._reader.keepalives

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


@dataclass(frozen=True)
class PeerCall:
    """The outcome of a call the peer started (Play on Phone)."""

    call_id: str
    final: SipMessage
    """The final response to the INVITE."""
    provisional: tuple[SipMessage, ...]
    """180/183... before it, in order."""
    answer_sdp: str | None
    """The SBC's SDP answer (2xx only)."""
    bye: SipMessage | None
    """The final response to our BYE; None without hangup, or when the SBC hung up first."""


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
        profile: Profile = Profile.EXCHANGE_UM,
        expected_sbc_fqdn: str | None = None,
        keylog_file: Path | None = None,
        teams_ringing: int = 0,
        teams_early_media: bool = False,
    ) -> None:
        """`profile` picks the rules enforced on INVITEs (kemi_o365.rules) and the Server/Allow headers;
        `expected_sbc_fqdn` is the FQDN Microsoft was configured with for the SBC (None: the
        certificate rules are skipped); `keylog_file` gets NSS key-log lines of every connection, so
        tshark can decrypt a capture. `teams_ringing` (that many 180s, each a fork with a To-tag of its
        own) and `teams_early_media` (one 183 with the SDP answer) play the Teams proxy's answer."""
        if teams_ringing < 0:
            raise ValueError(f"teams_ringing must be >= 0, got {teams_ringing}")
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
        self.answer_headers: list[tuple[str, str]] = []
        """Extra headers on a failure answer, e.g. ("Retry-After", "30") with a 503."""
        self.answer_delay = 0.0  # > 0: send 180 and answer later, leaving room for a CANCEL
        # Teams answering mode (MICROSOFT-NOTES §1.5); with answer_delay, the 200 comes that much later.
        self.teams_ringing = teams_ringing  # 180s before the answer, each with a different To-tag
        self.teams_early_media = teams_early_media  # one 183 with SDP, with the final To-tag
        self.profile = profile
        self.expected_sbc_fqdn = expected_sbc_fqdn
        self.received: list[Received] = []
        self.sent: list[Sent] = []
        self.connections: list[ConnInfo] = []  # accepted (SBC-initiated) connections
        self.outbound_connections: list[ConnInfo] = []  # the ones the peer opened
        self.tls_failures: list[TlsFailure] = []
        self.violations: list[Violation] = []  # the rule each refused request was answered with
        self.calls: dict[str, Call] = {}
        # Calls whose final answer waits for its delay: the pump looks only at these, not at every
        # call the peer has seen (that list only grows, and a load run holds thousands).
        self._delayed: dict[str, Call] = {}
        self._ctx = _server_context(Path(cert), Path(key), Path(ca), require_client_cert, ciphers)
        self._client_ctx = _client_context(Path(cert), Path(key), Path(ca), ciphers)
        if keylog_file is not None:
            for ctx in (self._ctx, self._client_ctx):
                ctx.keylog_filename = str(keylog_file)
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

    @property
    def server_header(self) -> str:
        """Our Server / User-Agent value: Exchange UM's, or the Teams SIP proxy's."""
        return TEAMS_SERVER_HEADER if self._teams else SERVER_HEADER

    @property
    def allow_header(self) -> str:
        return TEAMS_ALLOW if self._teams else ALLOW

    @property
    def _teams(self) -> bool:
        return self.profile is Profile.TEAMS_DIRECT_ROUTING

    def keepalives(self) -> int:
        """Double-CRLF keep-alives received so far, on every connection (RFC 5626 §3.5.1)."""
        with self._cond:
            return sum(link.framer.keepalives for link in self._links)

    def wait_for(
        self, predicate: Callable[[Received], bool], timeout: float = 5.0, *, start: int = 0
    ) -> Received:
        """First received message (from index `start`) matching `predicate`; TimeoutError after `timeout`."""
        return self._wait_index(predicate, timeout, start)[1]

    def _wait_index(
        self, predicate: Callable[[Received], bool], timeout: float, start: int
    ) -> tuple[int, Received]:
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.received):
                    rec = self.received[index]
                    index += 1
                    if predicate(rec):
                        return index - 1, rec
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
            bye = self._in_dialog_request(call, "BYE", call.local_cseq, call.link)
        final, _ = self._transact(call.link, bye, timeout)
        call.state = "ended"
        call.close_media()
        return final

    # ----- requests Microsoft starts ----------------------------------------------------------

    def reinvite(
        self,
        call_id: str,
        *,
        sdp: str | None = None,
        target: tuple[str, int],
        sbc_fqdn: str | None = None,
        timeout: float = 5.0,
    ) -> SipMessage:
        """Send an in-dialog re-INVITE for an answered call over a new connection to `target`; ACK a 2xx.

        Without `sdp`, the offer is our current SDP with a fresh SRTP key (and o= version + 1), as
        Exchange UM re-keyed on re-INVITE. `sbc_fqdn` (default: expected_sbc_fqdn, else the CN the
        SBC presented on the call's connection) is the name the SBC's certificate must carry.
        """
        with self._cond:
            call = self.calls[call_id]
            if call.state not in ("answered", "confirmed"):
                raise RuntimeError(f"call {call_id} is {call.state}, not answered")
        name = sbc_fqdn or self.expected_sbc_fqdn or call.conn.cert_cn
        if not name:
            raise ValueError("no SBC FQDN to verify the SBC's certificate against; pass sbc_fqdn")
        link = self._connect(target, name)
        old_key, old_version = call.srtp_key, call.sdp_version
        if sdp is None:
            call.srtp_key = _new_srtp_key()
            call.sdp_version += 1
            sdp = self._answer_sdp(call)
        with self._cond:
            call.local_cseq += 1
            req = self._in_dialog_request(call, "INVITE", call.local_cseq, link)
        req.headers += [
            ("Contact", self._contact()),
            ("Content-Type", "application/sdp"),
        ]
        req.body = sdp
        final, _ = self._transact(link, req, timeout)
        if 200 <= final.status < 300:
            # A 2xx refreshes the remote target (RFC 3261 §12.2.1.2); the ACK goes to the new one.
            if final.has("Contact"):
                call.remote_contact = uri_of(final.get("Contact"))
            self._emit(link, self._ack(call, link, req, final))
        else:
            call.srtp_key, call.sdp_version = old_key, old_version  # a refused offer changes nothing
            self._emit(link, _ack_non_2xx(req, final))
        return final

    def notify_mwi(
        self,
        target: tuple[str, int],
        *,
        to_user: str,
        sbc_fqdn: str,
        messages_waiting: bool = True,
        timeout: float = 5.0,
    ) -> SipMessage:
        """An out-of-dialog message-waiting NOTIFY (RFC 3842) for `to_user`, over a new connection."""
        link = self._connect(target, sbc_fqdn)
        account = f"sip:{to_user}@{sbc_fqdn}"
        waiting, count = ("yes", "1/0") if messages_waiting else ("no", "0/0")
        req = SipMessage(
            f"NOTIFY {account} SIP/2.0",
            [
                ("Via", self._via(link)),
                ("Max-Forwards", "70"),
                ("From", f"<sip:{self.contact_host}>;tag={secrets.token_hex(5)}"),
                ("To", f"<{account}>"),
                ("Call-ID", f"{secrets.token_hex(12)}@{self.contact_host}"),
                ("CSeq", "1 NOTIFY"),
                ("Contact", self._contact()),
                ("Event", "message-summary"),
                ("Subscription-State", "active"),
                ("User-Agent", self.server_header),
                ("Content-Type", MWI_CONTENT_TYPE),
            ],
            f"Messages-Waiting: {waiting}\r\nMessage-Account: {account}\r\nVoice-Message: {count} (0/0)\r\n",
        )
        final, _ = self._transact(link, req, timeout)
        return final

    def call(
        self,
        target: tuple[str, int],
        *,
        to_user: str,
        sbc_fqdn: str,
        from_user: str = "87000",
        hold_s: float = 0.5,
        hangup: bool = True,
        timeout: float = 5.0,
        user_phone: bool | None = None,
        on_answered: Callable[[Call, SipMessage], None] | None = None,
        sdp: str | None = None,
    ) -> PeerCall:
        """A new SRTP call to `to_user` behind the SBC, over a new connection: Exchange UM's Play on
        Phone, or (Teams profile) a Teams user calling a number behind the SBC.

        Teams sends E.164 numbers (MICROSOFT-NOTES §1.4) and addresses the SBC as it was paired, FQDN
        and port: `INVITE sip:+442079460048@sbc1.contoso.example:5061;user=phone;transport=tls`, From
        `<sip:+441632960001@sip.pstnhub.microsoft.com;user=phone>`. `user_phone` adds `;user=phone` to
        the Request-URI, To and From (None: under the Teams profile, to each number starting with '+').

        Waits for the final response (provisionals allowed before), ACKs a 2xx, calls `on_answered`
        (the call, the 2xx) once the ACK is out, e.g. to start media, and with `hangup` sends BYE
        `hold_s` after that unless the SBC hung up first. `timeout` bounds each transaction.

        `sdp`, when given, is sent verbatim as the offer instead of our own (e.g. a large Teams offer
        with ICE candidates and many codecs); the peer still opens its media socket as usual.
        """
        link = self._connect(target, sbc_fqdn)
        call_id = f"{secrets.token_hex(12)}@{self.contact_host}"
        local_tag = secrets.token_hex(5)
        port = f":{target[1]}" if self._teams else ""
        callee = f"sip:{to_user}@{sbc_fqdn}{port}{self._phone_param(to_user, user_phone)}"
        caller = f"sip:{from_user}@{self.contact_host}{self._phone_param(from_user, user_phone)}"
        request_uri = f"{callee};transport=tls" if self._teams else callee
        req = SipMessage(
            f"INVITE {request_uri} SIP/2.0",
            [
                ("Via", self._via(link)),
                ("Max-Forwards", "70"),
                ("From", f"<{caller}>;tag={local_tag}"),
                ("To", f"<{callee}>"),
                ("Call-ID", call_id),
                ("CSeq", "1 INVITE"),
                ("Contact", self._contact()),
                ("Allow", self.allow_header),
                ("User-Agent", self.server_header),
                ("Content-Type", "application/sdp"),
            ],
        )
        call = Call(
            call_id=call_id,
            invite=req,
            conn=link.info,
            local_tag=local_tag,
            remote_contact=request_uri,
            route_set=[],
            local_cseq=1,
            link=link,
            local_party=req.get("From"),
            remote_party=req.get("To"),
            destination_host=self.contact_host,
            outbound=True,
        )
        self._open_media(call)
        req.body = self._answer_sdp(call, private_c=False) if sdp is None else sdp
        with self._cond:
            self.calls[call_id] = call
        final, provisional = self._transact(link, req, timeout)
        if not 200 <= final.status < 300:
            call.state = "rejected"
            call.close_media()
            self._emit(link, _ack_non_2xx(req, final))
            return PeerCall(call_id, final, tuple(provisional), None, None)
        # RFC 3261 §12.1.2: the UAC's route set is the 2xx's Record-Route in reverse order.
        rr = [r for value in final.get_all("Record-Route") for r in split_name_addrs(value)]
        call.route_set = rr[::-1]
        call.remote_contact = uri_of(final.get("Contact")) or request_uri
        call.remote_party = final.get("To")
        call.state = "answered"
        self._emit(link, self._ack(call, link, req, final))
        call.state = "confirmed"
        if on_answered is not None:
            on_answered(call, final)
        bye: SipMessage | None = None
        if hangup:
            deadline = time.monotonic() + hold_s
            while time.monotonic() < deadline and self._call_state(call_id) != "ended":
                time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
            if self._call_state(call_id) != "ended":
                bye = self.hangup(call_id, timeout)
        return PeerCall(call_id, final, tuple(provisional), final.body or None, bye)

    def _phone_param(self, user: str, user_phone: bool | None) -> str:
        """`;user=phone` for a URI with this user part (RFC 3261 §19.1.1), by choice or by profile."""
        wanted = self._teams and user.startswith("+") if user_phone is None else user_phone
        return ";user=phone" if wanted else ""

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
        self._run_link(link)

    def _run_link(self, link: _Link) -> None:
        try:
            self._pump(link)
        finally:
            link.open = False
            link.sock.close()
            log.debug("connection %s closed", link.info.peer)

    def _connect(self, target: tuple[str, int], server_name: str) -> _Link:
        """Open our own TLS connection to the SBC (our certificate, theirs verified for `server_name`)."""
        _require_loopback(target[0])
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        raw.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            raw.bind((self.host, 0))  # from the peer's address, as the SBC's ACL expects
            raw.connect(target)
            tls = self._client_ctx.wrap_socket(raw, server_hostname=server_name)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            self._tls_failed(target, exc)
            raise ConnectionError(f"TLS connection to {target[0]}:{target[1]} failed: {exc}") from exc
        info = _conn_info(tls, target, outbound=True)
        link = _Link(tls, info)
        thread = threading.Thread(
            target=self._run_link, args=(link,), name=f"ms-peer-out-{info.local[1]}", daemon=True
        )
        link.owner = thread  # set before start: every send from other threads must go through the queue
        with self._cond:
            self._links.append(link)
            self._conn_threads.append(thread)
            self.outbound_connections.append(info)
            self._cond.notify_all()
        thread.start()
        log.info("TLS to %s:%d from %s: %s %s", *target, info.local, info.tls_version, info.cipher)
        return link

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

    def _breach(
        self, link: _Link, msg: SipMessage, destination_host: str | None, *, identity_only: bool = False
    ) -> Violation | None:
        """The first rule of our profile the request breaks (kemi_o365.rules), recorded; None if none.

        `identity_only` keeps the 403 rules (certificate, Contact): they are about who is talking and
        apply to OPTIONS too (MICROSOFT-NOTES §1.3), while the 488 ones read an INVITE's offer.
        """
        view = InviteView(
            msg=msg,
            destination_host=destination_host,
            tls_client_names=link.info.names,
            expected_sbc_fqdn=self.expected_sbc_fqdn,
        )
        found = [v for v in evaluate(view, self.profile) if not identity_only or v.rule.code == 403]
        if not found:
            return None
        for extra in found[1:]:
            log.info("also breaks %s: %s", extra.rule.name, extra.detail)
        with self._cond:
            self.violations.append(found[0])
            self._cond.notify_all()
        log.info("refusing %s %s: %s", msg.method, msg.get("Call-ID"), found[0].detail)
        return found[0]

    def _refusal(self, link: _Link, msg: SipMessage, v: Violation, tag: str | bool = True) -> SipMessage:
        text = f"{v.rule.name}: {v.detail}".replace("\\", "\\\\").replace('"', '\\"')
        warning = ("Warning", f'{WARN_CODE} {self.contact_host} "{text}"')
        return self._response(link, msg, v.rule.code, v.rule.reason, tag=tag, extra=[warning])

    def _on_invite(self, link: _Link, msg: SipMessage) -> None:
        call_id = msg.get("Call-ID")
        existing = self.calls.get(call_id)
        if existing is not None and header_param(msg.get("To"), "tag"):
            self._on_reinvite(link, msg, existing)
            return
        breach = self._breach(link, msg, uri_host(msg.ruri))
        if breach is None:
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
            remote_party=msg.get("From"),
            destination_host=uri_host(msg.ruri),
        )
        call.local_party = _with_tag(msg.get("To"), call.local_tag)
        with self._cond:
            self.calls[call_id] = call
        if breach is not None:
            call.state = "rejected"  # no media is opened for a refused offer
            self._send(link, self._refusal(link, msg, breach, tag=call.local_tag))
            return
        teams_mode = self.teams_ringing > 0 or self.teams_early_media
        if teams_mode:
            self._teams_progress(link, call)
        if self.answer_delay > 0:
            if not teams_mode:
                self._send(link, self._response(link, msg, 180, "Ringing", tag=call.local_tag))
            call.answer_at = time.monotonic() + self.answer_delay
            with self._cond:
                self._delayed[call.call_id] = call
        else:
            self._answer(link, call)

    def _teams_progress(self, link: _Link, call: Call) -> None:
        """The Teams proxy's provisionals on an inbound call (MICROSOFT-NOTES §1.5): one 180 per
        ringing endpoint, each a forked early dialog with a To-tag of its own, then one 183 with the
        media processor's SDP and the To-tag the 200 will carry."""
        for _ in range(self.teams_ringing):
            fork_tag = secrets.token_hex(5)
            self._send(link, self._dialog_response(link, call.invite, 180, "Ringing", fork_tag))
        if self.teams_early_media:
            self._open_media(call)
            early = self._dialog_response(link, call.invite, 183, "Session Progress", call.local_tag)
            early.headers.append(("Content-Type", "application/sdp"))
            early.body = self._answer_sdp(call)
            self._send(link, early)

    def _on_reinvite(self, link: _Link, msg: SipMessage, call: Call) -> None:
        if call.state not in ("answered", "confirmed"):
            self._send(link, self._response(link, msg, 481, "Call/Transaction Does Not Exist"))
            return
        # Same rules as the initial INVITE, against the dialog's destination: the Request-URI is now
        # our Contact, but To must still name the forwarding address. A refusal leaves the call up.
        breach = self._breach(link, msg, call.destination_host)
        if breach is not None:
            self._send(link, self._refusal(link, msg, breach))
            return
        # A session refresh: the media does not change, so the same answer (same o= version) is right.
        self._send(link, self._ok_with_answer(link, msg, call))

    def _answer_due(self, link: _Link) -> None:
        now = time.monotonic()
        with self._cond:
            if not self._delayed:
                return
            due = [
                c
                for c in self._delayed.values()
                if c.link is link and c.answer_at is not None and c.answer_at <= now
            ]
            for c in due:
                del self._delayed[c.call_id]
        for call in due:
            call.answer_at = None
            if call.state == "proceeding":
                self._answer(link, call)

    def _answer(self, link: _Link, call: Call) -> None:
        code, reason = self.answer_code
        if not 200 <= code < 300:
            call.state = "rejected"
            call.close_media()  # opened for a 183's early media
            response = self._response(link, call.invite, code, reason, tag=call.local_tag)
            response.headers += self.answer_headers
            self._send(link, response)
            return
        if call.media_sock is None:  # a 183 already opened it: the 200 repeats the 183's answer
            self._open_media(call)
        call.state = "answered"
        self._send(link, self._ok_with_answer(link, call.invite, call, code, reason))
        log.info("answered call %s, media %s:%d", call.call_id, self.media_ip, call.media_port)

    def _open_media(self, call: Call) -> None:
        family = socket.AF_INET6 if ":" in self.media_ip else socket.AF_INET
        media = socket.socket(family, socket.SOCK_DGRAM)
        media.bind((self.media_ip, 0))
        call.media_sock = media
        call.media_port = media.getsockname()[1]
        call.srtp_key = _new_srtp_key()

    def _call_state(self, call_id: str) -> CallState:
        with self._cond:
            return self.calls[call_id].state

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
            with self._cond:
                self._delayed.pop(call.call_id, None)
            call.state = "cancelled"
            call.close_media()  # opened for a 183's early media
            self._emit(
                call.link,
                self._response(call.link, call.invite, 487, "Request Terminated", tag=call.local_tag),
            )

    def _on_options(self, link: _Link, msg: SipMessage) -> None:
        breach = self._breach(link, msg, uri_host(msg.ruri), identity_only=True)
        if breach is not None:
            self._send(link, self._refusal(link, msg, breach))
            return
        extra = [("Allow", self.allow_header), ("Accept", "application/sdp"), ("Server", self.server_header)]
        self._send(link, self._response(link, msg, 200, "OK", extra=extra))

    def _on_unknown(self, link: _Link, msg: SipMessage) -> None:
        self._send(
            link, self._response(link, msg, 501, "Not Implemented", extra=[("Allow", self.allow_header)])
        )

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

    def _dialog_response(
        self, link: _Link, invite: SipMessage, code: int, reason: str, tag: str
    ) -> SipMessage:
        """A dialog-creating response (RFC 3261 §12.1.1): Record-Route copied, our Contact."""
        resp = self._response(link, invite, code, reason, tag=tag)
        resp.headers += [("Record-Route", rr) for rr in invite.get_all("Record-Route")]
        resp.headers.append(("Contact", self._contact()))
        return resp

    def _ok_with_answer(
        self, link: _Link, invite: SipMessage, call: Call, code: int = 200, reason: str = "OK"
    ) -> SipMessage:
        resp = self._dialog_response(link, invite, code, reason, call.local_tag)
        resp.headers += [
            ("Content-Type", "application/sdp"),
            ("P-Asserted-Identity", f"<{uri_of(invite.get('To'))}>"),
            ("Server", self.server_header),
            ("Session-Expires", "1800;refresher=uac"),
            ("Min-SE", "1800"),
        ]
        resp.body = self._answer_sdp(call)
        return resp

    def _answer_sdp(self, call: Call, *, private_c: bool = True) -> str:
        """Our SDP (answer, or offer for calls we start / re-INVITEs): the seed's 200 OK shape."""
        net = "IP6" if ":" in self.media_ip else "IP4"
        lines = [
            "v=0",
            f"o=- 85 {call.sdp_version} IN {net} {self.media_ip}",
            "s=session",
            f"c=IN {net} {self.media_ip}",
            "t=0 0",
            f"m=audio {call.media_port} RTP/SAVP 0 101",
        ]
        if private_c and self.answer_sdp_private_c:
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

    def _in_dialog_request(self, call: Call, method: str, cseq: int, link: _Link) -> SipMessage:
        """RFC 3261 §12.2.1.1: R-URI = remote target, Route = the dialog's route set, sent on `link`."""
        headers = [("Via", self._via(link))]
        # Loose routing assumed: Kamailio's Record-Route always carries ;lr.
        headers += [("Route", route) for route in call.route_set]
        headers += [
            ("Max-Forwards", "70"),
            ("From", call.local_party),
            ("To", call.remote_party),
            ("Call-ID", call.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("User-Agent", self.server_header),
        ]
        return SipMessage(f"{method} {call.remote_contact} SIP/2.0", headers)

    def _ack(self, call: Call, link: _Link, invite: SipMessage, final: SipMessage) -> SipMessage:
        """ACK for a 2xx: a new transaction, same CSeq number (RFC 3261 §13.2.2.4)."""
        ack = self._in_dialog_request(call, "ACK", _cseq(invite)[0], link)
        ack.set("To", final.get("To"))
        return ack

    def _via(self, link: _Link) -> str:
        """Our Via: on our own connections the address and ephemeral port we really send from."""
        host, port = link.info.local if link.info.outbound else (self.host, self.port)
        sent_by = f"[{host}]" if ":" in host else host
        return f"SIP/2.0/TLS {sent_by}:{port};branch=z9hG4bK{secrets.token_hex(8)}"

    def _contact(self) -> str:
        return f"<sip:{self.contact_host}:{self.port};transport=tls>"

    def _transact(self, link: _Link, req: SipMessage, timeout: float) -> tuple[SipMessage, list[SipMessage]]:
        """Send a request and wait for its final response; (final, provisionals). TimeoutError after
        `timeout`; ConnectionError if the connection closes first."""
        branch = header_param(req.get("Via"), "branch")
        want = _cseq(req)
        with self._cond:
            start = len(self.received)
        self._emit(link, req)
        provisional: list[SipMessage] = []
        deadline = time.monotonic() + timeout

        def ours(rec: Received) -> bool:
            m = rec.msg
            return (
                not m.is_request
                and m.get("Call-ID") == req.get("Call-ID")
                and _cseq(m) == want
                and header_param(m.get("Via"), "branch") == branch
            )

        while True:
            try:
                index, rec = self._wait_index(
                    ours, min(_POLL * 4, max(0.0, deadline - time.monotonic())), start
                )
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no final response to {want[1]} within {timeout}s") from None
                if not link.open:
                    raise ConnectionError(
                        f"connection {link.info.peer} closed before a final response"
                    ) from None
                continue
            start = index + 1
            if rec.msg.status >= 200:
                return rec.msg, provisional
            provisional.append(rec.msg)


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


def _ack_non_2xx(invite: SipMessage, final: SipMessage) -> SipMessage:
    """The transaction layer's ACK for a non-2xx final (RFC 3261 §17.1.1.3): same branch and R-URI."""
    headers = [
        ("Via", invite.get_all("Via")[0]),
        *(("Route", r) for r in invite.get_all("Route")),
        ("Max-Forwards", "70"),
        ("From", invite.get("From")),
        ("To", final.get("To")),
        ("Call-ID", invite.get("Call-ID")),
        ("CSeq", f"{_cseq(invite)[0]} ACK"),
    ]
    return SipMessage(f"ACK {invite.ruri} SIP/2.0", headers)


def _new_srtp_key() -> str:
    return base64.b64encode(secrets.token_bytes(SRTP_KEY_BYTES)).decode()


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
    ctx.sni_callback = _remember_sni
    return ctx


def _remember_sni(sock: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
    # Teams expects SNI = its FQDN (MICROSOFT-NOTES §1.2); keep it for ConnInfo.
    sock._kemi_sni = server_name  # type: ignore[union-attr]


def _client_context(cert: Path, key: Path, ca: Path, ciphers: str) -> ssl.SSLContext:
    # Microsoft's side as TLS client: presents its certificate, verifies the SBC's name and chain.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def _conn_info(tls: ssl.SSLSocket, addr: tuple[str, int], *, outbound: bool = False) -> ConnInfo:
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
        outbound=outbound,
        sni=getattr(tls, "_kemi_sni", None),
    )
