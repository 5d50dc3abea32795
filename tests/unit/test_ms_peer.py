"""The Microsoft peer on loopback: mutual TLS, the seed's 200 OK shape, BYE both ways, CANCEL, refusals."""

from __future__ import annotations

import base64
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography import x509

from kemi_o365.lab.certs import LabPki, cert_cn, make_lab_pki, make_leaf
from kemi_o365.lab.ms_peer import MS_TLS12_CIPHERS, MicrosoftPeer, Received, split_name_addrs, with_received
from kemi_o365.policy.model import Profile
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
        host=PEER_IP,
        port=0,
        cert=pki.ms_cert,
        key=pki.ms_key,
        ca=pki.ca_cert,
        media_ip=PEER_IP,
        expected_sbc_fqdn=SBC_FQDN,
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


def test_wildcard_client_certificate_is_recorded_and_refused(
    pki: LabPki, peer: MicrosoftPeer, tmp_path: Path
) -> None:
    cert, key = make_leaf(tmp_path, pki, SBC_FQDN, wildcard=True)
    wildcard_pki = LabPki(**{**pki.__dict__, "sbc_cert": cert, "sbc_key": key})
    client = SipTlsClient(wildcard_pki, peer.port)
    try:
        # Identity rules (403) apply to OPTIONS too; the offer rules (488) need an INVITE.
        client.send(simple_request("OPTIONS", "wild"))
        refused = client.recv(status_is(403, "OPTIONS"))
    finally:
        client.close()
    assert peer.connections[0].cert_cn == "*.example.com"
    assert refused.get("Warning") == (
        f'399 {MS_FQDN} "certificate-subject-exact: certificate subject CN '
        f"'*.example.com' is a wildcard; expected exactly '{SBC_FQDN}'\""
    )


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


# ----- the rules (kemi_o365.rules) enforced on INVITEs sent straight to the peer ---------------

CRYPTO_LINE = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:Rt5s9b1WdrBKIoygx4q3Tx8Zog/+Qt1/UTEmxr9x"
AUDIO_LINE = "m=audio 31182 RTP/SAVP 0 101"


def warning_for(rule: str, detail: str) -> str:
    return f'399 {MS_FQDN} "{rule}: {detail}"'


def offer_with(old: str, new: str) -> str:
    assert old in OFFER
    return OFFER.replace(old, new)


# (rule, how the INVITE is spoiled, code, Warning detail)
UM_BREACHES: list[tuple[str, Callable[[SipMessage], None], int, str]] = [
    (
        "to-host-is-destination",
        lambda m: m.set("To", f"<sip:87000@{SBC_FQDN}>"),
        488,
        f"To host '{SBC_FQDN}' is not the destination '{MS_FQDN}': 'To: <sip:87000@{SBC_FQDN}>'",
    ),
    (
        "srtp-required",
        lambda m: setattr(
            m, "body", offer_with(AUDIO_LINE, "m=audio 31182 RTP/AVP 0 101").replace(CRYPTO_LINE + "\r\n", "")
        ),
        488,
        "audio is offered as RTP/AVP, not RTP/SAVP: 'm=audio 31182 RTP/AVP 0 101'",
    ),
    (
        "crypto-suite-aes-cm-128-hmac-sha1-80",
        lambda m: setattr(m, "body", offer_with("HMAC_SHA1_80", "HMAC_SHA1_32")),
        488,
        f"no a=crypto line offers AES_CM_128_HMAC_SHA1_80: '{CRYPTO_LINE.replace('_80', '_32')}'",
    ),
    (
        "srtp-authenticated",
        lambda m: setattr(m, "body", offer_with(CRYPTO_LINE, CRYPTO_LINE + " UNAUTHENTICATED_SRTP")),
        488,
        f"a=crypto carries UNAUTHENTICATED_SRTP: '{CRYPTO_LINE} UNAUTHENTICATED_SRTP'",
    ),
    (
        "no-rtcp-mux",
        lambda m: setattr(m, "body", OFFER + "a=rtcp-mux\r\n"),
        488,
        "rtcp-mux is offered: 'a=rtcp-mux'",
    ),
    (
        "no-ice",
        lambda m: setattr(m, "body", OFFER + "a=ice-ufrag:8hhY\r\na=ice-pwd:asd88fgpdd777uzjYhagZg\r\n"),
        488,
        "ICE attribute offered: 'a=ice-ufrag:8hhY'",
    ),
]


@pytest.mark.parametrize("breach", UM_BREACHES, ids=[b[0] for b in UM_BREACHES])
def test_invite_breaking_a_rule_is_refused_like_microsoft(
    peer: MicrosoftPeer, connect: Connect, breach: tuple[str, Callable[[SipMessage], None], int, str]
) -> None:
    rule, spoil, code, detail = breach
    client = connect()
    inv = invite(f"call-{rule}")
    spoil(inv)
    client.send(inv)
    refused = client.recv(lambda m: not m.is_request)  # the very first response: no 100 before it
    assert refused.start_line == f"SIP/2.0 {code} Not Acceptable Here"
    assert refused.get("Warning") == warning_for(rule, detail)
    assert header_param(refused.get("To"), "tag")
    assert refused.body == ""
    assert [v.rule.name for v in peer.violations] == [rule]
    assert peer.violations[0].detail == detail
    call = peer.calls[f"call-{rule}"]
    assert call.state == "rejected"
    assert call.media_sock is None  # no media opened for a refused offer


@pytest.mark.parametrize(
    ("leaf", "detail"),
    [
        (
            {"name": SBC_FQDN, "wildcard": True},
            f"certificate subject CN '*.example.com' is a wildcard; expected exactly '{SBC_FQDN}'",
        ),
        (
            {"name": "other.example.com"},
            f"certificate subject CN 'other.example.com' is not '{SBC_FQDN}'",
        ),
        (
            {"name": SBC_FQDN, "cn": "SBC-O365.example.com"},
            f"certificate subject CN 'SBC-O365.example.com' differs in case from '{SBC_FQDN}' "
            "(compared case-sensitively)",
        ),
    ],
    ids=["wildcard", "other-name", "case"],
)
def test_invite_with_the_wrong_certificate_gets_403(
    pki: LabPki, peer: MicrosoftPeer, tmp_path: Path, leaf: dict[str, Any], detail: str
) -> None:
    name = leaf.pop("name")
    cert, key = make_leaf(tmp_path, pki, name, **leaf)
    client = SipTlsClient(LabPki(**{**pki.__dict__, "sbc_cert": cert, "sbc_key": key}), peer.port)
    try:
        client.send(invite("call-cert"))
        refused = client.recv(lambda m: not m.is_request)
    finally:
        client.close()
    assert refused.start_line == "SIP/2.0 403 Forbidden"
    assert refused.get("Warning") == warning_for("certificate-subject-exact", detail)
    assert peer.calls["call-cert"].state == "rejected"


def test_first_rule_in_table_order_is_answered(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    inv = invite("call-two")
    inv.set("To", f"<sip:87000@{SBC_FQDN}>")
    inv.body = OFFER + "a=rtcp-mux\r\n"
    client.send(inv)
    refused = client.recv(status_is(488))
    assert refused.get("Warning").startswith(f'399 {MS_FQDN} "to-host-is-destination: ')
    assert [v.rule.name for v in peer.violations] == ["to-host-is-destination"]


def test_warning_text_escapes_quotes(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    inv = invite("call-quote")
    inv.set("To", f'"Voice Mail" <sip:87000@{SBC_FQDN}>')
    client.send(inv)
    refused = client.recv(status_is(488))
    assert refused.get("Warning") == (
        f"399 {MS_FQDN} \"to-host-is-destination: To host '{SBC_FQDN}' is not the destination "
        f"'{MS_FQDN}': 'To: \\\"Voice Mail\\\" <sip:87000@{SBC_FQDN}>'\""
    )


def test_passing_invite_is_answered_and_records_no_violation(peer: MicrosoftPeer, connect: Connect) -> None:
    client = connect()
    _, _, ok = answer_call(client, "call-good")
    assert ok.status == 200
    assert not ok.has("Warning")
    assert peer.violations == []


def reinvite_from_sbc(ok: SipMessage, cseq: int, body: str) -> SipMessage:
    msg = in_dialog("INVITE", ok, cseq, branch=f"z9hG4bK-reinv-{cseq}")
    msg.headers += [("Contact", CONTACT), ("Content-Type", "application/sdp")]
    msg.body = body
    return msg


def test_reinvite_breaking_a_rule_is_refused_and_the_call_stays(
    peer: MicrosoftPeer, connect: Connect
) -> None:
    client = connect()
    _, _, ok = answer_call(client, "call-re")
    client.send(in_dialog("ACK", ok, 101, branch="z9hG4bK-ack-re"))
    peer.wait_for(lambda r: r.msg.method == "ACK", TIMEOUT)

    client.send(reinvite_from_sbc(ok, 102, OFFER + "a=ice-lite\r\n"))
    refused = client.recv(status_is(488))
    assert refused.get("Warning") == warning_for("no-ice", "ICE attribute offered: 'a=ice-lite'")
    assert refused.get("To") == ok.get("To")
    assert state_of(peer, "call-re") == "confirmed"
    assert peer.calls["call-re"].media_sock is not None

    client.send(reinvite_from_sbc(ok, 103, OFFER))  # the To host is checked against the dialog's
    assert client.recv(status_is(200)).get("CSeq") == "103 INVITE"


def test_teams_profile_applies_its_own_rules(pki: LabPki) -> None:
    with MicrosoftPeer(
        host=PEER_IP,
        port=0,
        cert=pki.ms_cert,
        key=pki.ms_key,
        ca=pki.ca_cert,
        media_ip=PEER_IP,
        profile=Profile.TEAMS_DIRECT_ROUTING,
        expected_sbc_fqdn=SBC_FQDN,
    ) as teams:
        client = SipTlsClient(pki, teams.port)
        try:
            inv = invite("call-teams")
            inv.body = OFFER + "a=rtcp-mux\r\n"  # fine for Teams; the Contact IP is not
            client.send(inv)
            refused = client.recv(lambda m: not m.is_request)
        finally:
            client.close()
    assert refused.start_line == "SIP/2.0 403 Forbidden"
    assert refused.get("Warning") == warning_for(
        "sbc-address-is-fqdn",
        f"Contact host '{SBC_IP}' is an IP address, not the SBC FQDN: 'Contact: {CONTACT}'",
    )


# ----- requests Microsoft starts, against a stand-in for the SBC's external listener -------------


@dataclass
class SbcConn:
    """One connection the peer opened to the stand-in SBC."""

    sock: ssl.SSLSocket
    peer: tuple[str, int]
    client_cn: str | None
    outbox: queue.SimpleQueue[SipMessage] = field(default_factory=queue.SimpleQueue)


Responder = Callable[[SipMessage], list[SipMessage]]


class FakeSbcListener:
    """The SBC's external TLS listener: requires Microsoft's client certificate, answers by a script.

    One thread per connection owns its socket (reads, and sends what the test queues).
    """

    def __init__(self, pki: LabPki, respond: Responder) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.sbc_cert, pki.sbc_key)
        self.ctx.load_verify_locations(cafile=pki.ca_cert)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.respond = respond
        self.listener = socket.create_server((SBC_IP, 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.conns: list[SbcConn] = []
        self.received: list[tuple[SbcConn, SipMessage]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> tuple[str, int]:
        return (SBC_IP, self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(TIMEOUT)
            try:
                tls = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()
                continue
            der = tls.getpeercert(binary_form=True)
            cn = cert_cn(x509.load_der_x509_certificate(der)) if der else None
            conn = SbcConn(tls, (addr[0], addr[1]), cn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._cond:
                self.conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: SbcConn) -> None:
        reader = StreamReader()
        conn.sock.settimeout(0.05)
        with conn.sock:
            while not self._stop.is_set():
                while not conn.outbox.empty():
                    conn.sock.sendall(conn.outbox.get().to_bytes())
                try:
                    data = conn.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for msg in reader.feed(data):
                    with self._cond:
                        self.received.append((conn, msg))
                        self._cond.notify_all()
                    for out in self.respond(msg):
                        conn.sock.sendall(out.to_bytes())

    def wait(
        self, predicate: Callable[[SipMessage], bool], timeout: float = TIMEOUT
    ) -> tuple[SbcConn, SipMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for conn, msg in self.received:
                    if predicate(msg):
                        return conn, msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the stand-in SBC got no matching message")
                self._cond.wait(remaining)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)
        self.listener.close()


def reply(
    req: SipMessage, code: int, reason: str, *, tag: str | None = "sbc-tag", **extra: str
) -> SipMessage:
    to = req.get("To")
    if tag and not header_param(to, "tag"):
        to = f"{to};tag={tag}"
    headers = [("Via", v) for v in req.get_all("Via")]
    headers += [
        ("From", req.get("From")),
        ("To", to),
        ("Call-ID", req.get("Call-ID")),
        ("CSeq", req.get("CSeq")),
    ]
    body = extra.pop("body", "")
    headers += [(name.replace("_", "-"), value) for name, value in extra.items()]
    return SipMessage(f"SIP/2.0 {code} {reason}", headers, body)


SBC_ANSWER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
    "m=audio 40000 RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:FHoHEZk7wM6b/frTeX+fzQ/K0PtuAvfIzRqjol9K\r\n"
)
SBC_CONTACT = f"<sip:1001@{SBC_FQDN}:5061;transport=tls>"
SBC_RECORD_ROUTES = [
    f"<sip:{SBC_IP}:5061;transport=tls;r2=on;lr>",
    "<sip:127.0.0.9:5060;transport=tcp;r2=on;lr>",
]


def sbc_answers(code: int = 200, reason: str = "OK") -> Responder:
    """An SBC that rings, then answers INVITEs with `code`, and accepts everything else with 200."""

    def respond(msg: SipMessage) -> list[SipMessage]:
        if not msg.is_request or msg.method == "ACK":
            return []
        if msg.method != "INVITE":
            return [reply(msg, 200, "OK")]
        if code != 200:
            return [reply(msg, 100, "Trying", tag=None), reply(msg, code, reason)]
        ok = reply(msg, 200, "OK", Contact=SBC_CONTACT, Content_Type="application/sdp", body=SBC_ANSWER)
        ok.headers[1:1] = [("Record-Route", rr) for rr in SBC_RECORD_ROUTES]
        return [reply(msg, 100, "Trying", tag=None), reply(msg, 180, "Ringing"), ok]

    return respond


@pytest.fixture
def sbc_listener(pki: LabPki) -> Iterator[Callable[[Responder], FakeSbcListener]]:
    made: list[FakeSbcListener] = []

    def make(respond: Responder) -> FakeSbcListener:
        made.append(FakeSbcListener(pki, respond))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def is_req(method: str) -> Callable[[SipMessage], bool]:
    return lambda m: m.is_request and m.method == method


def established(peer: MicrosoftPeer, client: SipTlsClient, call_id: str) -> SipMessage:
    _, _, ok = answer_call(client, call_id)
    client.send(in_dialog("ACK", ok, 101, branch=f"z9hG4bK-ack-{call_id}"))
    peer.wait_for(lambda r: r.msg.method == "ACK", TIMEOUT)
    return ok


def test_reinvite_goes_over_a_new_connection(
    peer: MicrosoftPeer, connect: Connect, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    client = connect()
    ok = established(peer, client, "call-mrei")
    old_key = peer.calls["call-mrei"].srtp_key
    old_cseq = peer.calls["call-mrei"].local_cseq

    final = peer.reinvite("call-mrei", target=sbc.address)

    assert final.status == 200
    conn, req = sbc.wait(is_req("INVITE"))
    # Microsoft's own connection: from the peer's address, an ephemeral port, its own certificate.
    assert conn.peer[0] == PEER_IP
    assert conn.peer[1] != peer.port
    assert conn.peer[1] != client.sock.getsockname()[1]
    assert conn.client_cn == MS_FQDN
    assert peer.outbound_connections[0].local == conn.peer
    assert peer.outbound_connections[0].cert_cn == SBC_FQDN  # the SBC's server certificate, verified
    assert req.start_line == f"INVITE {uri_of(CONTACT)} SIP/2.0"
    assert req.get_all("Route") == RECORD_ROUTES
    assert req.get("Via").startswith(f"SIP/2.0/TLS {PEER_IP}:{conn.peer[1]};branch=z9hG4bK")
    assert req.get("From") == ok.get("To")
    assert req.get("To") == FROM
    assert req.get("CSeq") == f"{old_cseq + 1} INVITE"
    assert req.get("Contact") == f"<sip:{MS_FQDN}:{peer.port};transport=tls>"
    sdp = req.sdp_lines
    assert sdp[1] == f"o=- 85 1 IN IP4 {PEER_IP}"  # a changed offer bumps the version (RFC 3264 §8)
    crypto = [ln for ln in sdp if ln.startswith("a=crypto:")]
    assert len(crypto) == 1
    new_key = crypto[0].split("inline:")[1]
    assert new_key != old_key
    assert len(base64.b64decode(new_key)) == 30
    assert f"m=audio {peer.calls['call-mrei'].media_port} RTP/SAVP 0 101" in sdp

    ack_conn, ack = sbc.wait(is_req("ACK"))
    assert ack_conn is conn
    assert ack.get("CSeq") == f"{old_cseq + 1} ACK"
    assert ack.start_line == f"ACK {uri_of(SBC_CONTACT)} SIP/2.0"  # the 2xx refreshed the target
    assert ack.get_all("Route") == RECORD_ROUTES
    assert header_param(ack.get("Via"), "branch") != header_param(req.get("Via"), "branch")
    assert state_of(peer, "call-mrei") == "confirmed"


def test_refused_reinvite_keeps_the_old_key(
    peer: MicrosoftPeer, connect: Connect, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers(488, "Not Acceptable Here"))
    established(peer, connect(), "call-mrei-488")
    old_key = peer.calls["call-mrei-488"].srtp_key
    final = peer.reinvite("call-mrei-488", target=sbc.address, sdp=OFFER)
    assert final.status == 488
    _, req = sbc.wait(is_req("INVITE"))
    assert req.body == OFFER
    _, ack = sbc.wait(is_req("ACK"))
    # RFC 3261 §17.1.1.3: the non-2xx ACK shares the INVITE's branch and Request-URI.
    assert header_param(ack.get("Via"), "branch") == header_param(req.get("Via"), "branch")
    assert ack.ruri == req.ruri
    assert peer.calls["call-mrei-488"].srtp_key == old_key
    assert state_of(peer, "call-mrei-488") == "confirmed"


def test_notify_mwi(peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]) -> None:
    sbc = sbc_listener(sbc_answers())
    final = peer.notify_mwi(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN)
    assert final.status == 200
    conn, req = sbc.wait(is_req("NOTIFY"))
    assert conn.client_cn == MS_FQDN
    assert conn.peer[1] != peer.port
    assert req.start_line == f"NOTIFY sip:10048@{SBC_FQDN} SIP/2.0"
    assert req.get("To") == f"<sip:10048@{SBC_FQDN}>"
    assert header_param(req.get("From"), "tag")
    assert req.get("Event") == "message-summary"
    assert req.get("Subscription-State") == "active"
    assert req.get("Content-Type") == "application/simple-message-summary"
    assert req.get("Contact") == f"<sip:{MS_FQDN}:{peer.port};transport=tls>"
    assert req.get("Via").startswith(f"SIP/2.0/TLS {PEER_IP}:{conn.peer[1]};branch=z9hG4bK")
    assert req.get("CSeq") == "1 NOTIFY"
    assert req.body == (
        f"Messages-Waiting: yes\r\nMessage-Account: sip:10048@{SBC_FQDN}\r\nVoice-Message: 1/0 (0/0)\r\n"
    )
    assert any(s.msg is not None and s.msg.method == "NOTIFY" and s.conn.outbound for s in peer.sent)
    assert any(not r.msg.is_request and r.msg.method == "NOTIFY" for r in peer.received)

    peer.notify_mwi(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN, messages_waiting=False)
    _, cleared = sbc.wait(lambda m: m.is_request and "Messages-Waiting: no" in m.body)
    assert "Voice-Message: 0/0 (0/0)" in cleared.body
    assert len(sbc.conns) == 2  # each request Microsoft starts opens its own connection


def test_play_on_phone_call(
    peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    result = peer.call(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN, hold_s=0.1)

    assert result.final.status == 200
    assert [m.status for m in result.provisional] == [100, 180]
    assert result.answer_sdp == SBC_ANSWER
    assert result.bye is not None
    assert result.bye.status == 200
    conn, inv = sbc.wait(is_req("INVITE"))
    assert conn.client_cn == MS_FQDN
    assert conn.peer[1] != peer.port
    assert inv.start_line == f"INVITE sip:10048@{SBC_FQDN} SIP/2.0"
    assert inv.get("To") == f"<sip:10048@{SBC_FQDN}>"
    assert inv.get("Via").startswith(f"SIP/2.0/TLS {PEER_IP}:{conn.peer[1]};branch=z9hG4bK")
    assert inv.get("Contact") == f"<sip:{MS_FQDN}:{peer.port};transport=tls>"
    sdp = inv.sdp_lines
    call = peer.calls[result.call_id]
    assert f"m=audio {call.media_port} RTP/SAVP 0 101" in sdp
    assert f"c=IN IP4 {PEER_IP}" in sdp
    assert [ln for ln in sdp if ln.startswith("c=")] == [f"c=IN IP4 {PEER_IP}"]
    crypto = [ln for ln in sdp if ln.startswith("a=crypto:")]
    assert len(crypto) == 1
    assert crypto[0].startswith("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:")

    ack_conn, ack = sbc.wait(is_req("ACK"))
    bye_conn, bye = sbc.wait(is_req("BYE"))
    assert ack_conn is conn
    assert bye_conn is conn
    # RFC 3261 §12.1.2: the UAC's route set is the Record-Route in reverse; target = the 2xx Contact.
    for req in (ack, bye):
        assert req.start_line.split()[1] == uri_of(SBC_CONTACT)
        assert req.get_all("Route") == SBC_RECORD_ROUTES[::-1]
        assert req.get("To") == f"<sip:10048@{SBC_FQDN}>;tag=sbc-tag"
        assert req.get("From") == inv.get("From")
    assert ack.get("CSeq") == "1 ACK"
    assert bye.get("CSeq") == "2 BYE"
    assert call.state == "ended"
    assert call.media_sock is None


def test_play_on_phone_call_with_a_given_offer(
    peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.3\r\ns=session\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    offer += "m=audio 40000 RTP/SAVP 104 0 101\r\na=ice-ufrag:Ab3x\r\na=rtpmap:104 SILK/16000\r\n"
    result = peer.call(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN, hold_s=0, sdp=offer)
    assert result.final.status == 200
    _, inv = sbc.wait(is_req("INVITE"))
    assert inv.body == offer
    assert inv.get("Content-Type") == "application/sdp"
    sent = [s for s in peer.sent if s.msg.is_request and s.msg.method == "INVITE"]
    assert sent[-1].raw.endswith(offer.encode())
    sbc.wait(is_req("BYE"))
    assert peer.calls[result.call_id].state == "ended"


def test_play_on_phone_rejected(
    peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers(486, "Busy Here"))
    result = peer.call(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN)
    assert result.final.status == 486
    assert result.answer_sdp is None
    assert result.bye is None
    _, inv = sbc.wait(is_req("INVITE"))
    _, ack = sbc.wait(is_req("ACK"))
    assert header_param(ack.get("Via"), "branch") == header_param(inv.get("Via"), "branch")
    assert ack.get("To") == f"<sip:10048@{SBC_FQDN}>;tag=sbc-tag"
    assert peer.calls[result.call_id].state == "rejected"
    assert peer.calls[result.call_id].media_sock is None


def test_sbc_can_hang_up_on_the_peers_connection(
    peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    result = peer.call(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN, hangup=False)
    assert result.bye is None
    conn, inv = sbc.wait(is_req("INVITE"))
    ok = result.final
    bye = SipMessage(
        f"BYE {uri_of(inv.get('Contact'))} SIP/2.0",
        [
            ("Via", f"SIP/2.0/TLS {SBC_IP}:5061;branch=z9hG4bK-sbc-bye"),
            ("From", ok.get("To")),
            ("To", inv.get("From")),
            ("Call-ID", inv.get("Call-ID")),
            ("CSeq", "7 BYE"),
            ("Max-Forwards", "70"),
        ],
    )
    conn.outbox.put(bye)
    _, bye_ok = sbc.wait(lambda m: not m.is_request and m.method == "BYE")
    assert bye_ok.status == 200
    assert peer.calls[result.call_id].state == "ended"


def test_peer_verifies_the_sbc_certificate_name(
    peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    with pytest.raises(ConnectionError, match="TLS connection"):
        peer.notify_mwi(sbc.address, to_user="10048", sbc_fqdn="not-the-sbc.example.com")
    assert peer.tls_failures
    assert not peer.outbound_connections


def test_keylog_file_gets_both_directions(
    pki: LabPki, tmp_path: Path, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    keylog = tmp_path / "keys.log"
    sbc = sbc_listener(sbc_answers())
    with MicrosoftPeer(
        host=PEER_IP,
        port=0,
        cert=pki.ms_cert,
        key=pki.ms_key,
        ca=pki.ca_cert,
        media_ip=PEER_IP,
        keylog_file=keylog,
    ) as logged:
        client = SipTlsClient(pki, logged.port)
        try:
            client.send(simple_request("OPTIONS", "keylog"))
            client.recv(status_is(200, "OPTIONS"))
        finally:
            client.close()
        logged.notify_mwi(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN)
    lines = keylog.read_text().splitlines()
    # TLS 1.3 logs traffic secrets, 1.2 a CLIENT_RANDOM line: one secret set per connection at least.
    secrets_lines = [ln for ln in lines if ln.startswith(("CLIENT_TRAFFIC_SECRET_0", "CLIENT_RANDOM"))]
    assert len(secrets_lines) >= 2


# ----- Teams Direct Routing answering and calls ---------------------------------------------------

TEAMS_CONTACT = f"<sip:{SBC_FQDN}:5061;transport=tls>"


def teams_invite(call_id: str) -> SipMessage:
    """The INVITE as an SBC paired with Teams sends it: its FQDN in Contact and the top Record-Route."""
    inv = invite(call_id)
    inv.headers = [(n, v) for n, v in inv.headers if n != "Record-Route"]
    inv.headers.insert(0, ("Record-Route", f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;lr>"))
    inv.set("Contact", TEAMS_CONTACT)
    return inv


@pytest.fixture
def teams_peer(pki: LabPki) -> Iterator[MicrosoftPeer]:
    with MicrosoftPeer(
        host=PEER_IP,
        port=0,
        cert=pki.ms_cert,
        key=pki.ms_key,
        ca=pki.ca_cert,
        media_ip=PEER_IP,
        answer_sdp_private_c=None,
        profile=Profile.TEAMS_DIRECT_ROUTING,
        expected_sbc_fqdn=SBC_FQDN,
        teams_ringing=2,
        teams_early_media=True,
    ) as p:
        yield p


def responses(client: SipTlsClient, count: int) -> list[SipMessage]:
    return [client.recv(lambda m: not m.is_request) for _ in range(count)]


def test_teams_forks_ringing_then_early_media_then_answers(teams_peer: MicrosoftPeer, pki: LabPki) -> None:
    client = SipTlsClient(pki, teams_peer.port)
    try:
        inv = teams_invite("call-teams-fork")
        client.send(inv)
        got = responses(client, 5)
    finally:
        client.close()
    assert [m.status for m in got] == [100, 180, 180, 183, 200]
    trying, ring1, ring2, early, ok = got
    call = teams_peer.calls["call-teams-fork"]
    tags = [header_param(m.get("To"), "tag") for m in (ring1, ring2, early, ok)]
    # Each 180 is a fork of its own; the 183 and the 200 share the dialog's final tag.
    assert tags[0] != tags[1] and call.local_tag not in tags[:2]
    assert tags[2] == tags[3] == call.local_tag
    assert header_param(trying.get("To"), "tag") is None
    for m in (ring1, ring2, early, ok):
        assert m.get_all("Record-Route") == inv.get_all("Record-Route")
        assert m.get("Contact") == f"<sip:{teams_peer.contact_host}:{teams_peer.port};transport=tls>"
    assert ring1.body == ring2.body == ""
    assert early.get("Content-Type") == "application/sdp"
    assert early.body == ok.body != ""
    assert f"m=audio {call.media_port} RTP/SAVP 0 101" in early.sdp_lines
    assert [ln for ln in early.sdp_lines if ln.startswith("c=")] == [f"c=IN IP4 {PEER_IP}"]
    assert ok.get("Server") == "Microsoft.PSTNHub.SIPProxy"
    assert teams_peer.violations == []
    assert state_of(teams_peer, "call-teams-fork") == "answered"


def test_teams_early_media_then_cancel(teams_peer: MicrosoftPeer, pki: LabPki) -> None:
    teams_peer.teams_ringing = 1
    teams_peer.answer_delay = 5.0
    client = SipTlsClient(pki, teams_peer.port)
    try:
        inv = teams_invite("call-teams-cancel")
        client.send(inv)
        assert [m.status for m in responses(client, 3)] == [100, 180, 183]
        assert teams_peer.calls["call-teams-cancel"].media_sock is not None
        client.send(cancel_for(inv))
        client.recv(status_is(200, "CANCEL"))
        terminated = client.recv(status_is(487))
    finally:
        client.close()
    assert header_param(terminated.get("To"), "tag") == teams_peer.calls["call-teams-cancel"].local_tag
    assert state_of(teams_peer, "call-teams-cancel") == "cancelled"
    assert teams_peer.calls["call-teams-cancel"].media_sock is None


def test_teams_early_media_then_rejection_closes_media(teams_peer: MicrosoftPeer, pki: LabPki) -> None:
    teams_peer.teams_ringing = 0
    teams_peer.answer_code = (480, "Temporarily Unavailable")
    client = SipTlsClient(pki, teams_peer.port)
    try:
        client.send(teams_invite("call-teams-480"))
        assert [m.status for m in responses(client, 3)] == [100, 183, 480]
    finally:
        client.close()
    assert teams_peer.calls["call-teams-480"].media_sock is None


def test_teams_mode_is_off_by_default(peer: MicrosoftPeer, connect: Connect) -> None:
    assert (peer.teams_ringing, peer.teams_early_media) == (0, False)
    client = connect()
    client.send(invite("call-plain"))
    assert [m.status for m in responses(client, 2)] == [100, 200]
    with pytest.raises(ValueError, match="teams_ringing"):
        MicrosoftPeer(
            host=PEER_IP,
            port=0,
            cert=Path("x"),
            key=Path("x"),
            ca=Path("x"),
            media_ip=PEER_IP,
            teams_ringing=-1,
        )


def test_teams_call_sends_e164_with_user_phone(
    teams_peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    answered: list[tuple[str, int]] = []
    result = teams_peer.call(
        sbc.address,
        to_user="+442079460048",
        from_user="+441632960001",
        sbc_fqdn=SBC_FQDN,
        hold_s=0.1,
        on_answered=lambda call, ok: answered.append((call.call_id, ok.status)),
    )
    assert result.final.status == 200
    assert answered == [(result.call_id, 200)]
    _, inv = sbc.wait(is_req("INVITE"))
    callee = f"sip:+442079460048@{SBC_FQDN}:{sbc.port};user=phone"
    assert inv.start_line == f"INVITE {callee};transport=tls SIP/2.0"
    assert inv.get("To") == f"<{callee}>"
    assert inv.get("From").startswith(f"<sip:+441632960001@{MS_FQDN};user=phone>;tag=")
    assert inv.get("User-Agent") == "Microsoft.PSTNHub.SIPProxy"
    assert inv.get("Allow") == "INVITE,ACK,OPTIONS,CANCEL,BYE,NOTIFY"
    _, bye = sbc.wait(is_req("BYE"))
    assert bye.get("To") == f"<{callee}>;tag=sbc-tag"


def test_user_phone_can_be_forced_either_way(
    peer: MicrosoftPeer, teams_peer: MicrosoftPeer, sbc_listener: Callable[[Responder], FakeSbcListener]
) -> None:
    sbc = sbc_listener(sbc_answers())
    peer.call(sbc.address, to_user="10048", sbc_fqdn=SBC_FQDN, hold_s=0, user_phone=True)
    _, um = sbc.wait(is_req("INVITE"))
    assert um.start_line == f"INVITE sip:10048@{SBC_FQDN};user=phone SIP/2.0"
    assert um.get("From").startswith(f"<sip:87000@{MS_FQDN};user=phone>")
    teams_peer.call(sbc.address, to_user="+442079460048", sbc_fqdn=SBC_FQDN, hold_s=0, user_phone=False)
    _, teams = sbc.wait(lambda m: is_req("INVITE")(m) and m is not um)
    assert teams.start_line == f"INVITE sip:+442079460048@{SBC_FQDN}:{sbc.port};transport=tls SIP/2.0"
