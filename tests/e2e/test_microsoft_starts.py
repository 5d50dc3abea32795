"""Requests Microsoft starts, each on a TLS connection of its own (seed 003): re-INVITE, MWI, Play on Phone.

SIPp plays CUCM (answering over TCP); the Python peer plays Microsoft. Also: who may open those
connections (verified certificate naming Microsoft, TLS versions from the policy).
"""

from __future__ import annotations

import socket
import ssl
import warnings
from pathlib import Path

import pytest

from kemi_o365.lab.certs import make_leaf
from kemi_o365.lab.demo import SCENARIOS, cucm_uas, wait_rtpengine_empty
from kemi_o365.lab.sipp import SippProcess, start_sipp
from kemi_o365.sipmsg import SipMessage, StreamReader
from tests.e2e.conftest import Lab, lab_policy_data, running_lab

pytestmark = pytest.mark.e2e

EXTENSION = "10048"


def _cucm_uas(lab: Lab, scenario: str) -> SippProcess:
    """SIPp as CUCM, answering on cucm.address:cucm.port over TCP."""
    return cucm_uas(lab.policy, lab.root / f"sipp-{scenario}", scenario)


def _received_by_cucm(proc_messages: list[SipMessage], method: str) -> SipMessage:
    return next(m for m in proc_messages if m.is_request and m.method == method)


def test_play_on_phone_call_reaches_cucm_as_plain_rtp(lab: Lab) -> None:
    with _cucm_uas(lab, "cucm-answers") as cucm:
        outcome = lab.peer.call(lab.microsoft_listener, to_user=EXTENSION, sbc_fqdn=lab.policy.sbc.fqdn)
        result = cucm.wait(20)
    assert outcome.final.status == 200, outcome.final
    assert result.ok, result.describe()
    invite = _received_by_cucm(result.received(), "INVITE")
    assert invite.ruri.startswith(f"sip:{EXTENSION}@{lab.policy.cucm.address}:{lab.policy.cucm.port}")
    audio = [ln for ln in invite.sdp_lines if ln.startswith("m=audio")]
    assert len(audio) == 1 and audio[0].split()[2] == "RTP/AVP"
    assert not [ln for ln in invite.sdp_lines if ln.startswith("a=crypto")]
    assert [ln for ln in invite.sdp_lines if ln.startswith("c=")] == [
        f"c=IN IP4 {lab.policy.sbc.internal.address}"
    ]
    # CUCM's plain-RTP answer reaches Microsoft as SRTP from the SBC's public address.
    assert outcome.answer_sdp is not None
    answer = outcome.answer_sdp.replace("\r\n", "\n").split("\n")
    assert any(ln.startswith("m=audio") and " RTP/SAVP " in ln for ln in answer)
    assert len([ln for ln in answer if ln.startswith("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:")]) == 1
    assert f"c=IN IP4 {lab.policy.sbc.external.advertised_address}" in answer
    assert outcome.bye is not None and outcome.bye.status == 200
    assert wait_rtpengine_empty(lab.policy) == []


def test_message_waiting_notify_reaches_cucm(lab: Lab) -> None:
    with _cucm_uas(lab, "cucm-mwi") as cucm:
        final = lab.peer.notify_mwi(lab.microsoft_listener, to_user=EXTENSION, sbc_fqdn=lab.policy.sbc.fqdn)
        result = cucm.wait(20)
    assert final.status == 200, final
    assert result.ok, result.describe()
    notify = _received_by_cucm(result.received(), "NOTIFY")
    assert notify.get("Event") == "message-summary"
    assert "Messages-Waiting: yes" in notify.body


def test_reinvite_from_microsoft_on_its_own_connection(lab: Lab) -> None:
    with start_sipp(
        SCENARIOS / "ms-reinvite" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=20,
    ) as cucm:
        ack = lab.peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "ACK", timeout=10)
        final = lab.peer.reinvite(ack.msg.get("Call-ID"), target=lab.microsoft_listener)
        result = cucm.wait(20)
    assert final.status == 200, final
    assert result.ok, result.describe()
    # The re-INVITE came from the peer on a connection the SBC did not open.
    sent = [s for s in lab.peer.sent if s.msg.is_request and s.msg.method == "INVITE"]
    assert sent and sent[-1].conn.local != ack.conn.local
    reinvite = [m for m in result.received() if m.is_request and m.method == "INVITE"]
    assert len(reinvite) == 1
    assert not [ln for ln in reinvite[0].sdp_lines if ln.startswith("a=crypto")]
    assert any(ln.startswith("m=audio") and " RTP/AVP " in ln for ln in reinvite[0].sdp_lines)
    assert any(" RTP/SAVP " in ln for ln in final.sdp_lines if ln.startswith("m=audio"))
    assert wait_rtpengine_empty(lab.policy) == []


def _tls_client(
    lab: Lab, cert: Path | None, key: Path | None, version: ssl.TLSVersion | None = None
) -> ssl.SSLSocket:
    pki = lab.root / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
            ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions; the SBC must refuse
    raw = socket.create_connection(lab.microsoft_listener, timeout=5, source_address=("127.0.0.3", 0))
    try:
        return ctx.wrap_socket(raw, server_hostname=lab.policy.sbc.fqdn)
    except BaseException:
        raw.close()
        raise


def _options_over(sock: ssl.SSLSocket, lab: Lab) -> SipMessage:
    port = sock.getsockname()[1]
    request = SipMessage(
        f"OPTIONS sip:{lab.policy.sbc.fqdn}:{lab.policy.sbc.external.port};transport=tls SIP/2.0",
        [
            ("Via", f"SIP/2.0/TLS 127.0.0.3:{port};branch=z9hG4bK-probe-{port}"),
            ("Max-Forwards", "70"),
            ("From", "<sip:probe@127.0.0.3>;tag=probe"),
            ("To", f"<sip:{lab.policy.sbc.fqdn}>"),
            ("Call-ID", f"probe-{port}@127.0.0.3"),
            ("CSeq", "1 OPTIONS"),
        ],
    )
    sock.sendall(request.to_bytes())
    reader = StreamReader()
    while True:
        data = sock.recv(65535)
        assert data, "connection closed without an answer"
        for msg in reader.feed(data):
            return msg


def test_microsoft_certificate_is_admitted(lab: Lab) -> None:
    pki = lab.root / "pki"
    with _tls_client(lab, pki / "ms.crt", pki / "ms.key") as sock:
        assert _options_over(sock, lab).status == 200


def test_a_certificate_naming_someone_else_is_refused_403(lab: Lab) -> None:
    pki = lab.root / "pki"
    cert, key = make_leaf(pki, (pki / "ca.crt", pki / "ca.key"), "intruder.example.org")
    with _tls_client(lab, cert, key) as sock:
        assert _options_over(sock, lab).status == 403


def test_a_client_without_certificate_cannot_connect(lab: Lab) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), _tls_client(lab, None, None) as sock:
        _options_over(sock, lab)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_policy_tls_versions_are_accepted(lab: Lab, version: ssl.TLSVersion) -> None:
    pki = lab.root / "pki"
    with _tls_client(lab, pki / "ms.crt", pki / "ms.key", version) as sock:
        assert sock.version() == version.name.replace("_", ".")
        assert _options_over(sock, lab).status == 200


def test_tls_1_1_is_refused_by_default(lab: Lab) -> None:
    pki = lab.root / "pki"
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        _tls_client(lab, pki / "ms.crt", pki / "ms.key", ssl.TLSVersion.TLSv1_1) as sock,
    ):
        _options_over(sock, lab)


def test_tls_1_1_is_admitted_only_when_the_policy_lists_it(tmp_path: Path) -> None:
    data = lab_policy_data()
    data["sbc"]["external"]["tls_versions"] = ["TLSv1.1", "TLSv1.2", "TLSv1.3"]
    with running_lab(tmp_path, data) as lab:
        pki = lab.root / "pki"
        with _tls_client(lab, pki / "ms.crt", pki / "ms.key", ssl.TLSVersion.TLSv1_1) as sock:
            assert sock.version() == "TLSv1.1"
            assert _options_over(sock, lab).status == 200
