"""Media really flows: CUCM's RTP becomes SRTP at Microsoft and back, proven by decrypting it.

CUCM sends a 1000 Hz PCMU tone, Microsoft's peer an 1800 Hz one (SRTP with its own key); each side
checks what arrives. Counts and frequencies are printed at the end of the session.
"""

from __future__ import annotations

import pytest

from kemi_o365.lab.media_call import CUCM_TONE_HZ, MICROSOFT_TONE_HZ, MediaPlan, crypto_key, run_media_call
from kemi_o365.sipmsg import SipMessage
from tests.e2e.conftest import MATRIX, Lab

pytestmark = pytest.mark.e2e


def _invites_at_microsoft(lab: Lab) -> list[SipMessage]:
    return [r.msg for r in lab.peer.received if r.msg.is_request and r.msg.method == "INVITE"]


def test_audio_dtmf_and_rtcp_both_ways(lab: Lab) -> None:
    out = run_media_call(lab.policy, lab.peer, lab.root / "sipp", plan=MediaPlan(talk_s=2.0))
    MATRIX.media += out.lines()
    assert out.problems == [], out.problems
    cucm, ms = out.cucm, out.microsoft
    # At Microsoft: every packet decrypted and authenticated with the key the SBC offered.
    assert ms.packets_received == cucm.packets_sent == ms.authenticated > 0
    assert ms.auth_failures == 0 and ms.lost == 0 and ms.max_seq_gap == 0
    assert set(ms.payload_types) == {0, 101}  # PCMU, and the DTMF digit as telephone-event
    assert ms.tone_hz is not None and abs(ms.tone_hz - CUCM_TONE_HZ) <= 2
    assert ms.level_dbov is not None and -14 <= ms.level_dbov <= -10
    assert ms.dtmf_digits == "5"
    assert ms.srtcp_authenticated >= 1  # CUCM's RTCP arrives as SRTCP
    # At CUCM: plain RTP, nothing lost, Microsoft's tone and digit.
    assert cucm.packets_received == ms.packets_sent > 0
    assert cucm.auth_failures == 0 and cucm.lost == 0 and cucm.max_seq_gap == 0
    assert set(cucm.payload_types) == {0, 101}
    assert cucm.tone_hz is not None and abs(cucm.tone_hz - MICROSOFT_TONE_HZ) <= 2
    assert cucm.dtmf_digits == "1"
    assert cucm.rtcp_accepted >= 1  # Microsoft's SRTCP arrives as plain RTCP
    assert out.call.rtpengine_left == []


def test_hold_and_resume_keep_the_srtp_stream_decryptable(lab: Lab) -> None:
    phase = 1.2  # talk, hold (CUCM re-INVITEs a=sendonly), resume (a=sendrecv): each this long
    plan = MediaPlan(talk_s=3 * phase, cucm_dtmf=((2.6 * phase, "7"),), microsoft_dtmf=())
    out = run_media_call(
        lab.policy, lab.peer, lab.root / "sipp", plan=plan, scenario="hold-resume", call_seconds=phase
    )
    MATRIX.media += [f"hold/resume: {line}" for line in out.lines()]
    invites = _invites_at_microsoft(lab)
    assert [ln for inv in invites for ln in inv.sdp_lines if ln.startswith("a=send")] == [
        "a=sendrecv",
        "a=sendonly",
        "a=sendrecv",
    ]
    # The same SRTP key and no rtcp-mux in every offer: Microsoft never has to re-key or re-mux.
    assert len({crypto_key(inv) for inv in invites}) == 1
    assert not [ln for inv in invites for ln in inv.sdp_lines if ln.startswith("a=rtcp-mux")]
    ms = out.microsoft
    assert ms.auth_failures == 0 and ms.srtcp_auth_failures == 0
    assert len(ms.ssrcs) == 1 and ms.lost == 0
    # Media still flowed after the resume: the digit CUCM sent in the last phase arrived, decrypted.
    assert ms.dtmf_digits == "7"
    assert ms.packets_received == out.cucm.packets_sent
    assert out.call.sipp.ok, out.call.sipp.describe()
    assert out.call.rtpengine_left == []
