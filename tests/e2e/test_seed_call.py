"""The seed call through real Kamailio + rtpengine: what Microsoft and CUCM each receive.

CUCM is SIPp (TCP) replaying the seed INVITE; Microsoft is the mutual-TLS Python peer.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest

from kemi_o365 import rtpengine_ng
from kemi_o365.lab.demo import SCENARIOS, CallOutcome, place_seed_call, wait_rtpengine_empty
from kemi_o365.lab.sipp import start_sipp
from kemi_o365.sipmsg import SipMessage, header_param, uri_host, uri_of
from kemi_o365.topology import masker
from tests.e2e.conftest import Lab, lab_policy_data, running_lab

pytestmark = pytest.mark.e2e

CUCM_ADDRESSES = {"127.0.0.4"}


def _sdp(msg: SipMessage, prefix: str) -> list[str]:
    return [ln for ln in msg.sdp_lines if ln.startswith(prefix)]


@pytest.fixture
def seed_call(lab: Lab) -> CallOutcome:
    outcome = place_seed_call(lab.policy, lab.peer, lab.root / "sipp")
    assert outcome.sipp.ok, outcome.sipp.describe()
    return outcome


def test_invite_at_microsoft_has_forwarding_to_and_only_srtp(lab: Lab, seed_call: CallOutcome) -> None:
    invite = seed_call.invite_at_microsoft()
    assert invite is not None
    forwarding = lab.policy.microsoft.to_uri
    assert uri_of(invite.get("To")) == forwarding
    assert uri_host(invite.get("To")) == uri_host(forwarding)
    audio = _sdp(invite, "m=audio ")
    assert len(audio) == 1
    assert audio[0].split()[2:] == ["RTP/SAVP", "0", "101"]
    crypto = _sdp(invite, "a=crypto:")
    assert len(crypto) == 1, crypto
    m = re.fullmatch(r"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:([A-Za-z0-9+/=]{40})", crypto[0])
    assert m, crypto[0]
    assert len(base64.b64decode(m.group(1))) == 30
    assert "UNAUTHENTICATED_SRTP" not in invite.body
    assert not _sdp(invite, "a=rtcp-mux")
    assert not [
        ln for ln in invite.sdp_lines if ln.startswith(("a=ice-", "a=candidate", "a=remote-candidates"))
    ]
    assert not _sdp(invite, "a=fingerprint") and not _sdp(invite, "a=setup")


def test_invite_at_microsoft_shows_only_the_sbc_public_address(lab: Lab, seed_call: CallOutcome) -> None:
    invite = seed_call.invite_at_microsoft()
    assert invite is not None
    public = lab.policy.sbc.external.advertised_address
    origin = _sdp(invite, "o=")
    connections = _sdp(invite, "c=")
    assert origin and origin[0].endswith(f"IN IP4 {public}")
    assert connections and all(c == f"c=IN IP4 {public}" for c in connections)
    for cucm in CUCM_ADDRESSES:
        assert cucm not in invite.body


def test_invite_arrives_over_mutual_tls_with_the_sbc_certificate(lab: Lab, seed_call: CallOutcome) -> None:
    first = next(r for r in lab.peer.received if r.msg.is_request and r.msg.method == "INVITE")
    assert first.conn.cert_cn == lab.policy.sbc.fqdn
    assert lab.policy.sbc.fqdn in first.conn.san_dns
    assert first.conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert first.conn.sni == lab.policy.microsoft.proxies[0].fqdn  # SNI names the Microsoft proxy
    invite = first.msg
    assert invite.get("Via").startswith(f"SIP/2.0/TLS {lab.policy.sbc.fqdn}:{lab.policy.sbc.external.port};")
    # One Record-Route toward Microsoft: the SBC's internal entry is for CUCM's eyes only.
    rr = invite.get_all("Record-Route")
    assert len(rr) == 1, rr
    assert f"sip:{lab.policy.sbc.fqdn}:{lab.policy.sbc.external.port};transport=tls" in rr[0]
    assert ";r2=on" in rr[0] and ";lr" in rr[0]


def test_cucm_records_both_sbc_routes(lab: Lab, seed_call: CallOutcome) -> None:
    answer = seed_call.answer_at_cucm()
    assert answer is not None
    internal = lab.policy.sbc.internal
    rr = [e for v in answer.get_all("Record-Route") for e in v.split(",")]
    # Microsoft's route set ends with the SBC's external entry; CUCM's gets the internal one after it.
    assert len(rr) == 2, rr
    assert f"sip:{lab.policy.sbc.fqdn}:{lab.policy.sbc.external.port};transport=tls" in rr[0]
    assert f"sip:{internal.address}:{internal.port};transport=tcp" in rr[1]
    assert all(";r2=on" in r and ";lr" in r for r in rr)


def test_answer_at_cucm_is_plain_rtp_from_the_internal_address(lab: Lab, seed_call: CallOutcome) -> None:
    answer = seed_call.answer_at_cucm()
    assert answer is not None
    audio = _sdp(answer, "m=audio ")
    assert len(audio) == 1 and audio[0].split()[2] == "RTP/AVP"
    assert not _sdp(answer, "a=crypto")
    assert _sdp(answer, "c=") == [f"c=IN IP4 {lab.policy.sbc.internal.address}"]
    # The media-level c= line Microsoft adds (seed 000) is stripped before rtpengine sees the answer.
    ms_answer = next(m for _, m in seed_call.from_microsoft if not m.is_request and m.status == 200)
    assert "c=IN IP4 127.0.0.25" in ms_answer.body
    assert "127.0.0.25" not in answer.body
    # CUCM gets back the To it sent (the forwarding address is only for Microsoft).
    assert uri_host(answer.get("To")) == "pstn-o365.example.com"
    assert header_param(answer.get("To"), "tag")


def test_ack_and_bye_pass_and_rtpengine_is_empty(lab: Lab, seed_call: CallOutcome) -> None:
    methods = [m.method for _, m in seed_call.at_microsoft if m.is_request]
    assert methods == ["INVITE", "ACK", "BYE"]
    bye_ok = [m for m in seed_call.sipp.received() if not m.is_request and m.method == "BYE"]
    assert [m.status for m in bye_ok] == [200]
    assert seed_call.rtpengine_left == []
    rtp = lab.policy.rtpengine
    assert rtpengine_ng.list_calls(rtp.control_address, rtp.control_port) == []


def test_microsoft_hangs_up_and_bye_reaches_cucm(lab: Lab) -> None:
    with start_sipp(
        SCENARIOS / "ms-hangup" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=20,
    ) as sipp:
        invite = lab.peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "ACK", timeout=10)
        rtp = lab.policy.rtpengine
        # rtpengine knows the call by CUCM's Call-ID; Microsoft by its masked form (topology hiding).
        cucm_call_id = masker(lab.policy).unmask(invite.msg.get("Call-ID"))
        assert cucm_call_id is not None
        assert rtpengine_ng.list_calls(rtp.control_address, rtp.control_port) == [cucm_call_id]
        final = lab.peer.hangup(invite.msg.get("Call-ID"))
        result = sipp.wait(20)
    assert final.status == 200
    assert result.ok, result.describe()
    byes = [m for m in result.received() if m.is_request and m.method == "BYE"]
    assert len(byes) == 1
    assert wait_rtpengine_empty(lab.policy) == []


def test_cancel_before_answer_releases_media(lab: Lab) -> None:
    lab.peer.answer_delay = 3.0
    with start_sipp(
        SCENARIOS / "cancel" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=20,
    ) as sipp:
        result = sipp.wait(20)
    assert result.ok, result.describe()
    statuses = [(m.status, m.method) for m in result.received() if not m.is_request]
    assert (200, "CANCEL") in statuses and (487, "INVITE") in statuses
    assert any(r.msg.is_request and r.msg.method == "CANCEL" for r in lab.peer.received)
    assert wait_rtpengine_empty(lab.policy) == []


def test_crlf_keepalives_keep_the_connection_to_microsoft_busy(tmp_path: Path) -> None:
    """Microsoft drops a TLS connection idle for 2 minutes (MICROSOFT-NOTES 1.6); the SBC sends
    double-CRLF keep-alives on its own connection every microsoft.keepalive_interval seconds."""
    data = lab_policy_data()
    data["microsoft"]["keepalive_interval"] = 1
    with running_lab(tmp_path, data) as lab:
        outcome = place_seed_call(lab.policy, lab.peer, lab.root / "sipp")
        assert outcome.sipp.ok
        before = lab.peer.keepalives()
        time.sleep(3.2)
        after = lab.peer.keepalives()
    assert after - before >= 2, (before, after)
