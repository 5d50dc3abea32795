"""The Microsoft peer on loopback: mutual TLS, the seed's 200 OK shape, BYE both ways, CANCEL, refusals."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import pytest

from kemi_o365.lab.certs import LabPki, make_lab_pki, make_leaf
from kemi_o365.lab.ms_peer import MS_TLS12_CIPHERS, MicrosoftPeer, Received, split_name_addrs, with_received
from kemi_o365.sipmsg import SipMessage, StreamReader, header_param, uri_of

SBC_FQDN = "sbc-o365.example.com"
MS_FQDN = "um.example.net"
PEER_IP = "127.0.0.3"
SBC_IP = "127.0.0.2"  # the test client plays the SBC's outside leg
TIMEOUT = 5.0

RECORD_ROUTES = [
    f"<sip:{SBC_IP}:5061;transport=tls;r2=on;lr>",
    f"<sip:{SBC_IP}:5060;transport=tcp;r2=on;lr>",
]
# Top Via names the SBC by FQDN, so the peer must add received= (the seed's 200 shows it).
TOP_VIA = f"SIP/2.0/TLS {SBC_FQDN}:5061;branch=z9hG4bKf5ce.075c1223046356d5878a36157c2736d5.0;i=c"
SECOND_VIA = "SIP/2.0/TCP 127.0.0.10:5060;branch=z9hG4bK1fd3fd816943"
FROM = '"10048 - Armstrong, Clint" <sip:10048@127.0.0.10>;tag=94213~3cc43a48-48ec-41b9'
TO = f"<sip:87000@{MS_FQDN}>"
CONTACT = f"<sip:10048@{SBC_IP}:5061;transport=tls>"
OFFER = (
    "v=0\r\n"
    f"o=CiscoSystemsCCM-SIP 94213 1 IN IP4 {SBC_IP}\r\n"
    "s=SIP Call\r\n"
    f"c=IN IP4 {SBC_IP}\r\n"
    "t=0 0\r\n"
    "m=audio 31182 RTP/SAVP 0 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:Rt5s9b1WdrBKIoygx4q3Tx8Zog/+Qt1/UTEmxr9x\r\n"
)


class SipTlsClient:
    """The SBC's side of one TLS connection, with a mailbox of parsed messages."""

    def __init__(
        self, pki: LabPki, port: int, *, cert: bool = True, max_tls: ssl.TLSVersion | None = None
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=pki.ca_cert)
        if cert:
            ctx.load_cert_chain(pki.sbc_cert, pki.sbc_key)
        if max_tls is not None:
            ctx.maximum_version = max_tls
        raw = socket.create_connection((PEER_IP, port), timeout=TIMEOUT, source_address=(SBC_IP, 0))
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=MS_FQDN)
        except BaseException:
            raw.close()
            raise
        self._reader = StreamReader()
        self._inbox: list[SipMessage] = []

    def send(self, msg: SipMessage) -> None:
        self.sock.sendall(msg.to_bytes())

    def recv(self, predicate: Callable[[SipMessage], bool], timeout: float = TIMEOUT) -> SipMessage:
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._inbox):
                if predicate(msg):
                    return self._inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching SIP message")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed the connection")
            self._inbox += self._reader.feed(data)

    def close(self) -> None:
        self.sock.close()


def status_is(code: int, method: str = "INVITE") -> Callable[[SipMessage], bool]:
    return lambda m: not m.is_request and m.status == code and m.method == method


def invite(call_id: str) -> SipMessage:
    headers = [("Record-Route", rr) for rr in RECORD_ROUTES]
    headers += [
        ("To", TO),
        ("Via", TOP_VIA),
        ("Via", SECOND_VIA),
        ("From", FROM),
        ("Call-ID", call_id),
        ("Supported", "timer,resource-priority,replaces"),
        ("Min-SE", "1800"),
        ("User-Agent", "Cisco-CUCM9.1"),
        ("CSeq", "101 INVITE"),
        ("Session-Expires", "1800"),
        ("Contact", CONTACT),
        ("Max-Forwards", "70"),
        ("Content-Type", "application/sdp"),
    ]
    return SipMessage(f"INVITE sip:87000@{MS_FQDN}:5061;transport=tls SIP/2.0", headers, OFFER)


def in_dialog(method: str, ok: SipMessage, cseq: int, *, branch: str) -> SipMessage:
    """ACK/BYE from the caller: R-URI = the peer's Contact (no Route: the test client is the last hop)."""
    headers = [
        ("Via", f"SIP/2.0/TLS {SBC_IP}:5061;branch={branch}"),
        ("From", FROM),
        ("To", ok.get("To")),
        ("Call-ID", ok.get("Call-ID")),
        ("CSeq", f"{cseq} {method}"),
        ("Max-Forwards", "70"),
    ]
    return SipMessage(f"{method} {uri_of(ok.get('Contact'))} SIP/2.0", headers)


def simple_request(method: str, call_id: str) -> SipMessage:
    headers = [
        ("Via", f"SIP/2.0/TLS {SBC_IP}:5061;branch=z9hG4bK-{method.lower()}-{call_id}"),
        ("From", f"<sip:ping@{SBC_FQDN}>;tag=abc"),
        ("To", f"<sip:{MS_FQDN}>"),
        ("Call-ID", call_id),
        ("CSeq", f"1 {method}"),
        ("Max-Forwards", "70"),
    ]
    return SipMessage(f"{method} sip:{MS_FQDN}:5061;transport=tls SIP/2.0", headers)


def cancel_for(inv: SipMessage) -> SipMessage:
    """RFC 3261 §9.1: same R-URI, top Via, From, To, Call-ID and CSeq number as the INVITE."""
    headers = [
        ("Via", inv.get_all("Via")[0]),
        ("From", inv.get("From")),
        ("To", inv.get("To")),
        ("Call-ID", inv.get("Call-ID")),
        ("CSeq", "101 CANCEL"),
        ("Max-Forwards", "70"),
    ]
    return SipMessage(f"CANCEL {inv.ruri} SIP/2.0", headers)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), SBC_FQDN, MS_FQDN)


@pytest.fixture
def peer(pki: LabPki) -> Iterator[MicrosoftPeer]:
    with MicrosoftPeer(
        host=PEER_IP, port=0, cert=pki.ms_cert, key=pki.ms_key, ca=pki.ca_cert, media_ip=PEER_IP
    ) as p:
        yield p


class Connect(Protocol):
    def __call__(self, *, cert: bool = True, max_tls: ssl.TLSVersion | None = None) -> SipTlsClient: ...


@pytest.fixture
def connect(pki: LabPki, peer: MicrosoftPeer) -> Iterator[Connect]:
    clients: list[SipTlsClient] = []

    def make(*, cert: bool = True, max_tls: ssl.TLSVersion | None = None) -> SipTlsClient:
        client = SipTlsClient(pki, peer.port, cert=cert, max_tls=max_tls)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def state_of(peer: MicrosoftPeer, call_id: str) -> str:
    # A function, not an attribute read, so the checker does not pin the state across peer activity.
    return peer.calls[call_id].state


def answer_call(client: SipTlsClient, call_id: str) -> tuple[SipMessage, SipMessage, SipMessage]:
    """INVITE → 100, 200; returns (invite, 100, 200) without ACKing."""
    inv = invite(call_id)
    client.send(inv)
    trying = client.recv(status_is(100))
    ok = client.recv(status_is(200))
    return inv, trying, ok


def test_invite_ack_bye(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    inv, trying, ok = answer_call(client, "call-1@127.0.0.2")

    expected_vias = [f"{TOP_VIA.split(';', 1)[0]};received={SBC_IP};{TOP_VIA.split(';', 1)[1]}", SECOND_VIA]
    assert trying.get_all("Via") == expected_vias
    assert ok.get_all("Via") == expected_vias
    assert ok.get("From") == FROM
    assert ok.get("Call-ID") == "call-1@127.0.0.2"
    assert ok.get("CSeq") == "101 INVITE"
    assert ok.get("To").startswith(TO)
    tag = header_param(ok.get("To"), "tag")
    assert tag is not None
    assert len(tag) >= 8
    assert ok.get_all("Record-Route") == RECORD_ROUTES
    assert ok.get("Contact") == f"<sip:{MS_FQDN}:{peer.port};transport=tls>"
    assert ok.get("Content-Type") == "application/sdp"
    assert ok.get("P-Asserted-Identity") == f"<sip:87000@{MS_FQDN}>"
    assert ok.get("Server") == "RTCC/ MSExchangeUM/15.01.0231.021"
    assert ok.get("Session-Expires") == "1800;refresher=uac"
    assert ok.get("Min-SE") == "1800"

    sdp = ok.sdp_lines
    assert sdp[:5] == ["v=0", f"o=- 85 0 IN IP4 {PEER_IP}", "s=session", f"c=IN IP4 {PEER_IP}", "t=0 0"]
    call = peer.calls["call-1@127.0.0.2"]
    assert sdp[5] == f"m=audio {call.media_port} RTP/SAVP 0 101"
    assert sdp[6] == "c=IN IP4 127.0.0.25"  # the seed's media-level private address
    assert [ln for ln in sdp if ln.startswith("c=")] == [f"c=IN IP4 {PEER_IP}", "c=IN IP4 127.0.0.25"]
    assert "a=fmtp:101 0-16,36" in sdp
    cryptos = [ln for ln in sdp if ln.startswith("a=crypto:")]
    assert len(cryptos) == 1
    key = cryptos[0].split("inline:", 1)[1]
    assert cryptos[0].startswith("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:")
    assert len(key) == 40
    assert len(base64.b64decode(key)) == 30
    assert key == call.srtp_key

    # The media socket is really bound and held for the call.
    assert call.media_sock is not None
    assert call.media_sock.getsockname() == (PEER_IP, call.media_port)
    assert state_of(peer, "call-1@127.0.0.2") == "answered"
    assert call.local_tag == tag
    assert call.remote_contact == uri_of(CONTACT)
    assert call.route_set == RECORD_ROUTES

    client.send(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-1"))
    peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "ACK", TIMEOUT)
    assert state_of(peer, "call-1@127.0.0.2") == "confirmed"

    client.send(in_dialog("BYE", ok, 102, branch="z9hG4bK-bye-1"))
    bye_ok = client.recv(status_is(200, "BYE"))
    assert bye_ok.get("CSeq") == "102 BYE"
    assert bye_ok.get("To") == ok.get("To")
    assert state_of(peer, "call-1@127.0.0.2") == "ended"
    assert peer.calls["call-1@127.0.0.2"].media_sock is None  # closed with the call

    # The recording: verbatim bytes, the SBC certificate that was presented, ordered sends.
    first = peer.received[0]
    assert first.raw == inv.to_bytes()
    assert first.conn.cert_cn == SBC_FQDN
    assert first.conn.san_dns == (SBC_FQDN,)
    assert first.conn.peer[0] == SBC_IP
    assert first.conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert [r.msg.start_line.split(" ", 2)[1] for r in peer.sent] == ["100", "200", "200"]
    assert first.at <= peer.sent[0].at


@pytest.mark.parametrize("max_tls", [ssl.TLSVersion.TLSv1_2, None], ids=["tls1.2", "tls1.3"])
def test_client_without_certificate_is_refused(
    peer: MicrosoftPeer, connect: Connect, max_tls: ssl.TLSVersion | None
) -> None:
    refused = False
    try:
        # TLS 1.2 fails in the handshake; TLS 1.3 finishes the client's side before the server checks,
        # so there the refusal shows on the first read.
        client = connect(cert=False, max_tls=max_tls)
        client.send(simple_request("OPTIONS", "nocert"))
        client.recv(lambda m: True, timeout=TIMEOUT)
    except (ssl.SSLError, ConnectionError):
        refused = True
    assert refused
    deadline = time.monotonic() + TIMEOUT
    while not peer.tls_failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peer.tls_failures
    assert not peer.received
    assert not peer.connections


def test_tls12_client_gets_a_microsoft_suite(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect(max_tls=ssl.TLSVersion.TLSv1_2)
    client.send(simple_request("OPTIONS", "tls12"))
    ok = client.recv(status_is(200, "OPTIONS"))
    assert ok.get("Allow") == "INVITE, ACK, CANCEL, BYE, OPTIONS"
    assert header_param(ok.get("To"), "tag")
    conn = peer.connections[0]
    assert conn.tls_version == "TLSv1.2"
    assert conn.cipher in MS_TLS12_CIPHERS.split(":")


def test_hangup_sends_bye_along_the_route_set(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    _, _, ok = answer_call(client, "call-hangup")
    client.send(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-h"))
    peer.wait_for(lambda r: r.msg.method == "ACK", TIMEOUT)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(peer.hangup, "call-hangup", TIMEOUT)
        bye = client.recv(lambda m: m.is_request and m.method == "BYE")
        reply = SipMessage(
            "SIP/2.0 200 OK",
            [(n, bye.get(n)) for n in ("Via", "From", "To", "Call-ID", "CSeq")],
        )
        client.send(reply)
        final = pending.result(timeout=TIMEOUT)

    assert final.status == 200
    assert bye.start_line == f"BYE {uri_of(CONTACT)} SIP/2.0"
    assert bye.get_all("Route") == RECORD_ROUTES
    assert header_param(bye.get("From"), "tag") == header_param(ok.get("To"), "tag")
    assert bye.get("To") == FROM
    assert bye.get("Call-ID") == "call-hangup"
    number, method = bye.get("CSeq").split()
    assert method == "BYE"
    assert int(number) >= 1
    branch = header_param(bye.get("Via"), "branch")
    assert branch is not None
    assert branch.startswith("z9hG4bK")
    assert bye.get("Via").startswith(f"SIP/2.0/TLS {PEER_IP}:{peer.port};")
    assert peer.calls["call-hangup"].state == "ended"


def test_cancel_gets_487(peer: MicrosoftPeer, connect: Connect) -> None:
    peer.answer_delay = 30.0  # far beyond the test: only the CANCEL can end this INVITE
    client = connect()
    inv = invite("call-cancel")
    client.send(inv)
    client.recv(status_is(100))
    ringing = client.recv(status_is(180))
    client.send(cancel_for(inv))
    cancel_ok = client.recv(status_is(200, "CANCEL"))
    terminated = client.recv(status_is(487))
    assert header_param(terminated.get("To"), "tag") == header_param(ringing.get("To"), "tag")
    assert header_param(cancel_ok.get("To"), "tag") == header_param(ringing.get("To"), "tag")
    assert terminated.get("CSeq") == "101 INVITE"
    assert peer.calls["call-cancel"].state == "cancelled"
    assert peer.calls["call-cancel"].media_sock is None


def test_delayed_answer_rings_then_answers(peer: MicrosoftPeer, connect: Connect) -> None:
    peer.answer_delay = 0.2
    client = connect()
    client.send(invite("call-delayed"))
    ringing = client.recv(status_is(180))
    ok = client.recv(status_is(200))
    assert ok.get("To") == ringing.get("To")


def test_answer_code_rejects(peer: MicrosoftPeer, connect: Connect) -> None:
    peer.answer_code = (488, "Not Acceptable Here")
    client = connect()
    client.send(invite("call-488"))
    rejected = client.recv(status_is(488))
    assert header_param(rejected.get("To"), "tag")
    assert rejected.body == ""
    assert peer.calls["call-488"].state == "rejected"


def test_require_cn_refuses_other_names(peer: MicrosoftPeer, connect: Connect) -> None:
    peer.require_cn = "SBC-O365.example.com"  # the UM era compared case-sensitively
    client = connect()
    client.send(invite("call-403"))
    assert client.recv(status_is(403)).get("Call-ID") == "call-403"


def test_wildcard_client_certificate_is_recorded(pki: LabPki, peer: MicrosoftPeer, tmp_path: Path) -> None:
    cert, key = make_leaf(tmp_path, pki, SBC_FQDN, wildcard=True)
    wildcard_pki = LabPki(**{**pki.__dict__, "sbc_cert": cert, "sbc_key": key})
    client = SipTlsClient(wildcard_pki, peer.port)
    try:
        client.send(simple_request("OPTIONS", "wild"))
        client.recv(status_is(200, "OPTIONS"))
    finally:
        client.close()
    assert peer.connections[0].cert_cn == "*.example.com"


def test_unknown_method_and_stray_requests(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    client.send(simple_request("INFO", "info-1"))
    assert client.recv(status_is(501, "INFO")).get("Allow")
    client.send(simple_request("BYE", "no-such-call"))
    client.recv(status_is(481, "BYE"))
    client.send(simple_request("CANCEL", "no-such-call"))
    client.recv(status_is(481, "CANCEL"))


def test_no_private_c_line(pki: LabPki) -> None:
    with MicrosoftPeer(
        host=PEER_IP,
        port=0,
        cert=pki.ms_cert,
        key=pki.ms_key,
        ca=pki.ca_cert,
        media_ip=PEER_IP,
        answer_sdp_private_c=None,
    ) as peer:
        client = SipTlsClient(pki, peer.port)
        try:
            _, _, ok = answer_call(client, "call-one-c")
        finally:
            client.close()
    assert [ln for ln in ok.sdp_lines if ln.startswith("c=")] == [f"c=IN IP4 {PEER_IP}"]


def test_stop_closes_the_listener(pki: LabPki) -> None:
    peer = MicrosoftPeer(
        host=PEER_IP, port=0, cert=pki.ms_cert, key=pki.ms_key, ca=pki.ca_cert, media_ip=PEER_IP
    )
    peer.start()
    port = peer.port
    client = SipTlsClient(pki, port)
    started = time.monotonic()
    peer.stop()
    assert time.monotonic() - started < 2.0
    try:
        with pytest.raises((ConnectionError, TimeoutError, ssl.SSLError)):
            client.recv(lambda m: True, timeout=1.0)
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((PEER_IP, port), timeout=1.0).close()


def test_refuses_non_loopback_addresses(pki: LabPki) -> None:
    with pytest.raises(ValueError, match="loopback"):
        MicrosoftPeer(
            host="192.0.2.1", port=0, cert=pki.ms_cert, key=pki.ms_key, ca=pki.ca_cert, media_ip=PEER_IP
        )


def test_helpers() -> None:
    assert split_name_addrs('<sip:a;lr>, "x, y" <sip:b;lr>') == ["<sip:a;lr>", '"x, y" <sip:b;lr>']
    assert with_received("SIP/2.0/TLS 127.0.0.2:5061;branch=z9hG4bK1", "127.0.0.2").endswith(
        "branch=z9hG4bK1"
    )
    assert with_received("SIP/2.0/TLS h.example:5061;branch=b", "127.0.0.2") == (
        "SIP/2.0/TLS h.example:5061;received=127.0.0.2;branch=b"
    )


def test_wait_for_times_out(peer: MicrosoftPeer) -> None:
    def never(_: Received) -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        peer.wait_for(never, 0.1)
    assert time.monotonic() - started < 1.0
