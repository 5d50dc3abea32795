"""Microsoft's large INVITEs (ICE candidates, many codecs) are trimmed before a UDP leg toward CUCM.

A Teams offer is well over 1500 bytes: a dozen payload types with their rtpmap/fmtp lines, SDES
crypto, ICE credentials and candidates, rtcp-mux, labels and x- attributes. Over UDP toward CUCM that
would be fragmented (or refused). With `cucm.transport: udp` the SBC offers CUCM plain RTP, ICE
removed, only `cucm.codecs` (PCMU, PCMA, telephone-event by default): the INVITE fits one datagram.

SIPp plays CUCM over UDP (sipp-scenarios/cucm-answers-udp); the Python peer plays Microsoft.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemi_o365.lab.demo import cucm_uas, wait_rtpengine_empty
from kemi_o365.lab.rtp import decode_inline_key, new_inline_key
from kemi_o365.lab.sipp import SippProcess
from tests.e2e.conftest import Lab, lab_policy_data, running_lab

pytestmark = pytest.mark.e2e

EXTENSION = "10048"
MS_MEDIA_IP = "127.0.0.3"
# Payload types CUCM may see: PCMU, PCMA and telephone-event (the offer's 101).
CUCM_PAYLOADS = {"0", "8", "101"}
ICE_ATTRIBUTES = ("a=ice-", "a=candidate", "a=remote-candidates", "a=x-candidate")
UDP_BUDGET = 1300  # comfortably under a 1500-byte Ethernet MTU, IP and UDP headers included


def teams_offer(media_port: int) -> str:
    """A Teams-style SDP offer (shape of a Teams media processor's INVITE), loopback addresses only."""
    key = new_inline_key()
    assert len(decode_inline_key(key)) == 30
    rtcp_port = media_port + 1
    lines = [
        "v=0",
        f"o=- 0 0 IN IP4 {MS_MEDIA_IP}",
        "s=session",
        f"c=IN IP4 {MS_MEDIA_IP}",
        "b=CT:10000000",
        "t=0 0",
        f"m=audio {media_port} RTP/SAVP 104 9 103 111 116 18 0 8 97 101 13 118",
        f"c=IN IP4 {MS_MEDIA_IP}",
        f"a=rtcp:{rtcp_port}",
        "a=ice-ufrag:Ab3x",
        "a=ice-pwd:kYm9qT2vWcLx7RbPz4NhJd8F",
        f"a=candidate:1 1 UDP 2130706431 {MS_MEDIA_IP} {media_port} typ host",
        f"a=candidate:1 2 UDP 2130705918 {MS_MEDIA_IP} {rtcp_port} typ host",
        f"a=candidate:2 1 tcp-pass 2120547327 {MS_MEDIA_IP} {media_port + 10} typ host",
        f"a=candidate:2 2 tcp-pass 2120546814 {MS_MEDIA_IP} {media_port + 11} typ host",
        f"a=candidate:3 1 UDP 1694234111 127.0.0.30 {media_port + 20} typ srflx raddr {MS_MEDIA_IP} "
        f"rport {media_port}",
        f"a=candidate:3 2 UDP 1694233598 127.0.0.30 {media_port + 21} typ srflx raddr {MS_MEDIA_IP} "
        f"rport {rtcp_port}",
        f"a=candidate:4 1 UDP 16648703 127.0.0.31 {media_port + 30} typ relay raddr 127.0.0.30 "
        f"rport {media_port + 20}",
        f"a=candidate:4 2 UDP 16648702 127.0.0.31 {media_port + 31} typ relay raddr 127.0.0.30 "
        f"rport {media_port + 21}",
        "a=rtcp-mux",
        "a=x-ssrc-range:3456790528-3456790528",
        "a=rtcp-fb:* x-message app send:dsh recv:dsh",
        "a=rtcp-rsize",
        "a=label:main-audio",
        "a=x-source:main-audio",
        "a=x-source-streamid:1c9c3b2e-4f5a-4d8e-9b1a-7e6f5d4c3b2a",
        f"a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:{key}|2^31",
        "a=rtpmap:104 SILK/16000",
        "a=fmtp:104 usedtx=false",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:103 SILK/8000",
        "a=fmtp:103 usedtx=false",
        "a=rtpmap:111 SIREN/16000",
        "a=fmtp:111 bitrate=16000",
        "a=rtpmap:116 opus/48000/2",
        "a=fmtp:116 minptime=10;useinbandfec=1;usedtx=0",
        "a=rtpmap:18 G729/8000",
        "a=fmtp:18 annexb=no",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:97 RED/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=rtpmap:13 CN/8000",
        "a=rtpmap:118 CN/16000",
        "a=ptime:20",
        "a=maxptime:200",
        "a=sendrecv",
    ]
    return "\r\n".join(lines) + "\r\n"


def _free_udp(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


# One UDP datagram as SIPp 3.6.1 -trace_msg logs it: the byte count says exactly where it ends.
_UDP_RECEIVED = re.compile(rb"^UDP message received \[(\d+)\] bytes :\n\n", re.MULTILINE)


def _udp_datagrams_received(message_file: Path) -> list[bytes]:
    raw = message_file.read_bytes()
    return [raw[m.end() : m.end() + int(m.group(1))] for m in _UDP_RECEIVED.finditer(raw)]


@pytest.fixture
def udp_lab(tmp_path: Path) -> Iterator[Lab]:
    data = lab_policy_data()
    data["cucm"]["transport"] = "udp"
    with running_lab(tmp_path, data) as lab:
        yield lab


def _cucm_uas_udp(lab: Lab) -> SippProcess:
    """SIPp as CUCM, answering on cucm.address:cucm.port over UDP."""
    return cucm_uas(
        lab.policy, lab.root / "sipp-cucm-answers-udp", "cucm-answers-udp", udp=True, timeout_s=12
    )


def test_large_teams_offer_is_trimmed_for_the_udp_leg_to_cucm(udp_lab: Lab) -> None:
    lab = udp_lab
    offer = teams_offer(_free_udp(MS_MEDIA_IP))
    with _cucm_uas_udp(lab) as cucm:
        outcome = lab.peer.call(
            lab.microsoft_listener,
            to_user=EXTENSION,
            sbc_fqdn=lab.policy.sbc.fqdn,
            hold_s=0.2,
            sdp=offer,
        )
        result = cucm.wait(15)
    assert outcome.final.status == 200, outcome.final
    assert result.ok, result.describe()
    assert outcome.bye is not None and outcome.bye.status == 200

    # What Microsoft sent: one INVITE well over an Ethernet MTU.
    sent = [
        s
        for s in lab.peer.sent
        if s.msg.is_request and s.msg.method == "INVITE" and s.msg.get("Call-ID") == outcome.call_id
    ]
    assert len(sent) == 1 and sent[0].msg.body == offer
    assert len(sent[0].raw) > 1500, len(sent[0].raw)

    # What CUCM received: over UDP, one datagram, trimmed.
    invites = [
        t
        for t in result.messages
        if t.direction == "received" and t.msg.is_request and t.msg.method == "INVITE"
    ]
    assert invites, result.describe()
    assert {t.transport for t in invites} == {"UDP"}
    invite = invites[0].msg
    assert invite.ruri.startswith(f"sip:{EXTENSION}@{lab.policy.cucm.address}:{lab.policy.cucm.port}")

    sdp = invite.sdp_lines
    audio = [ln for ln in sdp if ln.startswith("m=")]
    assert len(audio) == 1, audio
    fields = audio[0].split()
    assert fields[0] == "m=audio" and fields[2] == "RTP/AVP", audio
    payloads = fields[3:]
    assert payloads and set(payloads) <= CUCM_PAYLOADS, payloads
    assert "0" in payloads and "101" in payloads, payloads
    rtpmap_pts = {ln.split(":", 1)[1].split()[0] for ln in sdp if ln.startswith("a=rtpmap:")}
    assert rtpmap_pts <= CUCM_PAYLOADS, rtpmap_pts
    assert not [ln for ln in sdp if ln.startswith("a=crypto")], sdp
    assert not [ln for ln in sdp if ln.startswith(ICE_ATTRIBUTES)], sdp
    assert "a=rtcp-mux" not in sdp, sdp
    assert {ln for ln in sdp if ln.startswith("c=")} == {f"c=IN IP4 {lab.policy.sbc.internal.address}"}, sdp

    # CUCM's plain-RTP answer reaches Microsoft as SRTP.
    assert outcome.answer_sdp is not None
    answer = outcome.answer_sdp.replace("\r\n", "\n").split("\n")
    assert any(ln.startswith("m=audio") and " RTP/SAVP " in ln for ln in answer), answer
    assert [ln for ln in answer if ln.startswith("a=crypto:")], answer
    assert wait_rtpengine_empty(lab.policy) == []

    # RFC 3261 §18.1.1: a request over 1300 bytes (path MTU unknown) must not go over UDP. Checked on
    # the bytes CUCM received, every copy (retransmissions included).
    datagrams = [d for d in _udp_datagrams_received(cucm.message_file) if d.startswith(b"INVITE ")]
    assert datagrams, result.describe()
    sizes = [len(d) for d in datagrams]
    assert max(sizes) < UDP_BUDGET, f"INVITE toward CUCM is {sizes} bytes; its SDP:\n" + "\n".join(sdp)
