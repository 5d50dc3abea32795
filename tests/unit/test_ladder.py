"""ASCII SIP ladders and the one-line message labels drawn on them."""

from __future__ import annotations

import pytest

from kemi_o365.lab.ladder import LadderEvent, describe, events_from_trace, render_ladder, sdp_summary
from kemi_o365.sipmsg import SipMessage, parse

CUCM, SBC, MS = "CUCM (SIPp)", "SBC (Kamailio)", "Microsoft (TLS peer)"
COLUMNS = [CUCM, SBC, MS]

# What CUCM sends (seed 000_cbe866ecd25117ec before the SBC rewrote it): RTP/AVP, no crypto, ptime.
CUCM_INVITE = parse(
    "INVITE sip:87000@pstn-o365.example.com;transport=tcp SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 127.0.0.1:26012;branch=z9hG4bK1fd3fd816943\r\n"
    "CSeq: 101 INVITE\r\n"
    "Content-Type: application/sdp\r\n\r\n"
    "v=0\r\no=CiscoSystemsCCM-SIP 94213 1 IN IP4 127.0.0.1\r\ns=SIP Call\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 31182 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\na=ptime:20\r\n"
)

# Microsoft's answer in the seed ("OK with Answer"), addresses redacted as in the seed.
MS_200 = parse(
    "SIP/2.0 200 OK\r\n"
    "To: <sip:87000@pstn-o365.example.com>;tag=ee195713eb\r\n"
    "CSeq: 101 INVITE\r\n"
    "CONTENT-TYPE: application/sdp\r\n\r\n"
    "v=0\r\no=- 85 0 IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 54532 RTP/SAVP 0 101\r\nc=IN IP4 127.0.0.1\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16,36\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:FHoHEZk7wM6b/frTeX+fzQ/K0PtuAvfIzRqjol9K\r\n"
)


def test_describe_requests_and_responses() -> None:
    assert (
        describe(CUCM_INVITE) == "INVITE sip:87000@pstn-o365.example.com (SDP RTP/AVP, PCMU telephone-event)"
    )
    assert describe(MS_200) == "200 OK (SDP RTP/SAVP, crypto, PCMU telephone-event)"
    bye_ok = SipMessage("SIP/2.0 200 OK", [("CSeq", "102 BYE")])
    assert describe(bye_ok) == "200 OK (BYE)"
    ack = SipMessage("ACK sip:127.0.0.1:26011;transport=TCP SIP/2.0", [("CSeq", "101 ACK")])
    assert describe(ack) == "ACK sip:127.0.0.1"
    reject = SipMessage("SIP/2.0 488 Not Acceptable Here", [("CSeq", "101 INVITE")])
    assert describe(reject) == "488 Not Acceptable Here"


def test_sdp_summary_flags_what_microsoft_rejects() -> None:
    offer = SipMessage(
        "INVITE sip:87000@x SIP/2.0",
        [("Content-Type", "application/sdp")],
        "v=0\r\na=ice-ufrag:abcd\r\nm=audio 4000 RTP/SAVPF 8 9\r\na=rtcp-mux\r\na=sendonly\r\n"
        "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
    )
    # Session-level ICE applies to every stream; static payload types are named without a=rtpmap.
    assert sdp_summary(offer) == (
        "SDP RTP/SAVPF, ICE, rtcp-mux, sendonly, PCMA G722; video RTP/AVP, port 0, ICE, H264"
    )
    assert sdp_summary(SipMessage("BYE sip:a@b SIP/2.0", [("CSeq", "1 BYE")])) == ""


def _rows(text: str) -> list[str]:
    return text.splitlines()


def test_arrows_point_the_right_way_in_order() -> None:
    events = [
        LadderEvent(100.000, CUCM, SBC, "INVITE"),
        LadderEvent(100.004, SBC, MS, "INVITE srtp"),
        LadderEvent(100.250, MS, SBC, "200 OK srtp"),
        LadderEvent(100.251, SBC, CUCM, "200 OK"),
    ]
    text = render_ladder(COLUMNS, events, width=90)
    rows = _rows(text)
    header = rows[0]
    xs = [header.index(name) + len(name) // 2 for name in COLUMNS]
    # Every column name sits over its lifeline.
    assert all(rows[1][x] == "|" for x in xs)

    arrows = [r for r in rows if r.startswith("+")]
    assert [r.split()[0] for r in arrows] == ["+0.000", "+0.004", "+0.250", "+0.251"]
    cucm, sbc, ms = xs
    # CUCM -> SBC: dashes from CUCM's lifeline, head just before the SBC's.
    assert arrows[0][cucm] == "|" and arrows[0][cucm + 1] == "-" and arrows[0][sbc - 1] == ">"
    assert set(arrows[0][cucm + 1 : sbc - 1]) == {"-"}
    assert arrows[0][sbc + 1 : ms].strip() == ""  # nothing drawn beyond the target
    # SBC -> Microsoft
    assert arrows[1][sbc + 1] == "-" and arrows[1][ms - 1] == ">"
    assert arrows[1][cucm + 1 : sbc].strip() == ""
    # Microsoft -> SBC and SBC -> CUCM: heads on the left.
    assert arrows[2][sbc + 1] == "<" and arrows[2][ms - 1] == "-"
    assert arrows[3][cucm + 1] == "<" and arrows[3][sbc - 1] == "-"
    # Each label is on the row just above its arrow, between the two lifelines.
    for label, arrow in (("INVITE", 0), ("INVITE srtp", 1), ("200 OK srtp", 2), ("200 OK", 3)):
        above = rows[rows.index(arrows[arrow]) - 1]
        start = above.index(label)
        lo, hi = sorted((xs[[0, 1, 2, 1][arrow]], xs[[1, 2, 1, 0][arrow]]))
        assert lo < start and start + len(label) <= hi, (label, above)
    assert text.isascii()
    assert all(len(r) <= 90 for r in rows)


def test_self_events_notes_and_long_labels() -> None:
    long = "INVITE sip:87000@pstn-o365.example.com (SDP RTP/SAVP, crypto, PCMU telephone-event)"
    events = [
        LadderEvent(5.0, SBC, SBC, "rtpengine offer"),
        LadderEvent(5.5, SBC, MS, long, note="TLS 5061"),
    ]
    rows = _rows(render_ladder(COLUMNS, events, width=100))
    assert rows[2].startswith("+0.000") and "| * rtpengine offer" in rows[2]
    assert long in rows[3]  # too wide for the gap: kept whole, shifted to stay inside the page
    assert rows[4].startswith("+0.500") and rows[4].rstrip().endswith(">|")
    assert "(TLS 5061)" in rows[5]
    assert all(len(r) <= 100 for r in rows)


def test_unknown_column_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown column 'Teams'"):
        render_ladder(COLUMNS, [LadderEvent(0, CUCM, "Teams", "INVITE")])
    assert render_ladder(COLUMNS, []).splitlines()[0].startswith("time")


def test_events_from_a_sipp_trace() -> None:
    trace = [(10.0, "sent", CUCM_INVITE), (10.2, "received", MS_200)]
    events = events_from_trace(trace, CUCM, SBC)
    assert [(e.src, e.dst) for e in events] == [(CUCM, SBC), (SBC, CUCM)]
    assert events[1].label.startswith("200 OK (SDP RTP/SAVP, crypto")
    text = render_ladder([CUCM, SBC], events, width=120)
    assert "RTP/AVP" in text and "+0.200" in text
