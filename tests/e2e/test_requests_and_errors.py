"""Requests that must not become calls, and failures that must release media, on the real stack."""

from __future__ import annotations

import time

import pytest

from kemi_o365 import rtpengine_ng
from kemi_o365.lab.demo import SCENARIOS, wait_rtpengine_empty
from kemi_o365.lab.sipp import run_sipp
from tests.e2e import sipclient
from tests.e2e.conftest import Lab
from tests.summary import report

pytestmark = pytest.mark.e2e

MS_HOST = "pstn-o365.example.com"


def _cucm(lab: Lab) -> tuple[str, int]:
    return lab.policy.sbc.internal.address, lab.policy.sbc.internal.port


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_options_to_the_sbc_get_200(lab: Lab, transport: str) -> None:
    replies = sipclient.send(sipclient.request("OPTIONS", f"sip:{MS_HOST}"), _cucm(lab), transport=transport)
    assert [r.status for r in replies] == [200]
    assert not lab.peer.received, "OPTIONS must be answered by the SBC, not relayed"


def test_invite_matching_no_rule_gets_404_and_is_not_relayed(lab: Lab) -> None:
    invite = sipclient.request("INVITE", "sip:87000@pstn-o365.example.com.evil.example.net", body="v=0\r\n")
    replies = sipclient.send(invite, _cucm(lab), transport="tcp")
    assert replies[-1].status == 404
    assert not lab.peer.received


def test_invite_from_a_stranger_gets_403(lab: Lab) -> None:
    invite = sipclient.request("INVITE", f"sip:87000@{MS_HOST}", src_ip="127.0.0.9", body="v=0\r\n")
    replies = sipclient.send(invite, _cucm(lab), transport="udp", src_ip="127.0.0.9")
    assert [r.status for r in replies][-1] == 403
    assert not lab.peer.received


def test_max_forwards_zero_gets_483(lab: Lab) -> None:
    invite = sipclient.request("INVITE", f"sip:87000@{MS_HOST}", max_forwards=0, body="v=0\r\n")
    replies = sipclient.send(invite, _cucm(lab), transport="udp")
    assert replies[-1].status == 483
    assert not lab.peer.received


def test_delayed_offer_is_refused_clearly(lab: Lab) -> None:
    replies = sipclient.send(sipclient.request("INVITE", f"sip:87000@{MS_HOST}"), _cucm(lab), transport="tcp")
    final = replies[-1]
    assert final.status == 488
    assert "early offer" in final.start_line
    assert not lab.peer.received


def test_rejected_call_releases_the_media_session(lab: Lab) -> None:
    lab.peer.answer_code = (486, "Busy Here")
    result = run_sipp(
        SCENARIOS / "seed-call" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=10,
    )
    assert not result.ok  # the scenario wants a 200
    assert any(not m.is_request and m.status == 486 for m in result.received()), result.describe()
    assert wait_rtpengine_empty(lab.policy) == []


def test_dead_rtpengine_fails_the_call_fast_with_503(lab: Lab) -> None:
    rtp = lab.policy.rtpengine
    assert rtpengine_ng.ping(rtp.control_address, rtp.control_port)
    proc = lab.stack.procs["rtpengine"]
    proc.terminate()
    proc.wait(10)
    started = time.monotonic()
    result = run_sipp(
        SCENARIOS / "seed-call" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=10,
    )
    finals = [m for m in result.received() if not m.is_request and m.status >= 200]
    elapsed = time.monotonic() - started
    assert [m.status for m in finals] == [503], result.describe()
    assert not lab.peer.received, "no INVITE may reach Microsoft without a media relay"
    # One rtpengine timeout (policy: kamailio.rtpengine_timeout_ms) plus SIPp's own start and stop.
    assert elapsed < lab.policy.kamailio.rtpengine_timeout_ms / 1000 + 2.0, elapsed
    report(
        f"dead rtpengine: CUCM's INVITE answered {finals[0].status} {finals[0].start_line.split(' ', 2)[2]} "
        f"in {elapsed:.2f} s including SIPp (rtpengine timeout "
        f"{lab.policy.kamailio.rtpengine_timeout_ms} ms), nothing sent to Microsoft"
    )


def test_malformed_request_gets_400_from_sanity_and_is_not_relayed(lab: Lab) -> None:
    invite = sipclient.request("INVITE", f"sip:87000@{MS_HOST}", body="v=0\r\n")
    invite.set("CSeq", "1 BYE")  # RFC 3261 §8.1.1.5: the CSeq method must match the request method
    replies = sipclient.send(invite, _cucm(lab), transport="udp")
    assert [r.status for r in replies] == [400]
    assert not lab.peer.received
