"""The adapter and the handler object, run against the KSR double: which KSR calls, in which order.

The double refuses any function, arity or argument type the installed Kamailio 5.6.3 does not have,
so these tests also prove every call the adapter makes on these paths exists as written.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kemi_o365 import calls, kemi, ksr_adapter, routing, rtpengine_ng, topology
from kemi_o365.decision import Respond
from kemi_o365.media import DEFAULT_ANSWER_TO_CUCM, DEFAULT_OFFER_TO_MICROSOFT, flag_string
from kemi_o365.policy.model import Policy
from kemi_o365.request import Side
from tests.helpers import lab_policy
from tests.ksr_double import KsrDouble, install

ROOT = Path(__file__).resolve().parents[2]
KAMAILIO_CFG = ROOT / "kamailio" / "kamailio.cfg"

MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
SBC_FQDN = "sbc-o365.example.com"
CALL_ID = "a1b2c3d4@127.0.0.1"

CUCM_SDP = (
    "v=0\r\no=CiscoSystemsCCM-SIP 94213 1 IN IP4 127.0.0.1\r\ns=SIP Call\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 31182 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
)
MS_SDP = (
    "v=0\r\no=- 85 0 IN IP4 127.0.0.3\r\ns=session\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    "m=audio 54532 RTP/SAVP 0 101\r\nc=IN IP4 127.0.0.25\r\na=rtpmap:0 PCMU/8000\r\n"
)
MS_SDP_STRIPPED = (
    "v=0\r\no=- 85 0 IN IP4 127.0.0.3\r\ns=session\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    "m=audio 54532 RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
)

# CUCM's headers as $msg(hdrs) shows them: every one of them names CUCM's network somewhere.
CUCM_HEADERS = (
    "INVITE sip:87000@pstn-o365.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 127.0.0.4:26012;branch=z9hG4bK-1\r\n"
    'From: "10048" <sip:10048@127.0.0.4>;tag=94213\r\n'
    "To: <sip:87000@pstn-o365.example.com>\r\n"
    f"Call-ID: {CALL_ID}\r\n"
    "CSeq: 101 INVITE\r\n"
    "Contact: <sip:10048@127.0.0.4:26012;transport=tcp>\r\n"
    "User-Agent: Cisco-CUCM9.1\r\n"
    'P-Asserted-Identity: "10048" <sip:10048@127.0.0.4>\r\n'
    "Remote-Party-ID: <sip:10048@127.0.0.4>;party=calling\r\n"
    'Call-Info: <sip:127.0.0.4:26012>;method="NOTIFY"\r\n'
    "Cisco-Guid: 3357373952-0000065536\r\n"
    "Max-Forwards: 70\r\n"
)

# What read_request fetches from Kamailio for an initial INVITE with SDP; their order is not part of
# the contract, their presence is.
REQUEST_READS = Counter(
    {
        # $rb $pr $rm $rU $rd $fU $ci, and $msg(hdrs) from CUCM (topology hiding); $Ri $Rp $si were
        # read before (who sent it, on which listener) and are not read again
        "pv.gete": 8,
        "pv.geti": 1,  # $sp
        "siputils.has_totag": 1,
        "textops.has_body_type": 1,
        "hdr.gete": 1,
        "is_OPTIONS": 1,  # CUCM's OPTIONS pings take a shorter path (test_cucm_ping_*)
    }
)

Call = tuple[str, tuple[Any, ...]]

# CUCM's Route in a dialog it started: both entries ours, marked "Call-ID masked toward Microsoft".
MASKED_ROUTE = (
    "<sip:127.0.0.1:5060;transport=tcp;r2=on;lr;ftag=94213;mcid>,"
    f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;lr;ftag=94213;mcid>"
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return lab_policy(tmp_path_factory.mktemp("policy"))


def _fresh(double: KsrDouble) -> KsrDouble:
    double.reset()
    return double


@pytest.fixture
def ksr() -> Iterator[KsrDouble]:
    double = _fresh(install())
    yield double
    _fresh(double)


@pytest.fixture
def handler(policy: Policy) -> kemi.Kamailio:
    return kemi.Kamailio(policy)


# What rtpengine answers a BYE's delete: the session's final counts (shape of rtpengine 10.5's reply).
DELETE_REPLY: dict[str, object] = {
    "result": "ok",
    "tags": {
        "caller-tag": {"medias": [{"streams": [{"flags": ["RTP"], "stats": {"packets": 250, "errors": 1}}]}]},
        "callee-tag": {"medias": [{"streams": [{"flags": ["RTP"], "stats": {"packets": 240, "errors": 0}}]}]},
    },
}


@pytest.fixture(autouse=True)
def ng_socket(monkeypatch: pytest.MonkeyPatch, ksr: KsrDouble, policy: Policy) -> list[dict[str, object]]:
    """rtpengine's ng socket as the adapter reaches it directly (the BYE's delete): each command is
    recorded among the KSR calls, in order, as ("ng.<command>", (call-id,))."""
    sent: list[dict[str, object]] = []
    rtp = policy.rtpengine

    def send(host: str, port: int, message: dict[str, object], timeout: float = 1.0) -> Answer:
        assert (host, port) == (rtp.control_address, rtp.control_port)
        assert timeout == policy.kamailio.rtpengine_timeout_ms / 1000
        sent.append(message)
        ksr.calls.append((f"ng.{message['command']}", (message["call-id"],)))
        assert {"from-tag", "to-tag"} <= set(message)  # without them rtpengine sends no statistics
        return Answer(ksr, DELETE_REPLY)

    monkeypatch.setattr(rtpengine_ng, "send_json", send)
    return sent


class Answer:
    """rtpengine's answer to a command sent without waiting; reading it is recorded as ng.reply."""

    def __init__(self, ksr: KsrDouble, reply: dict[str, object] | Exception) -> None:
        self._ksr, self._reply = ksr, reply

    def reply(self) -> dict[str, object]:
        self._ksr.calls.append(("ng.reply", ()))
        if isinstance(self._reply, Exception):
            raise self._reply
        return self._reply


def script_request(
    ksr: KsrDouble,
    method: str,
    *,
    side: str = "cucm",
    sdp: str = "",
    in_dialog: bool = False,
    routed: bool = True,
    ruri_user: str = "87000",
    ruri_host: str = "pstn-o365.example.com",
    max_forwards: str = "70",
    route: str = "",
) -> None:
    """A request as Kamailio would present it: $-variables, headers and module return codes."""
    cucm = side == "cucm"
    headers = CUCM_HEADERS + (f"Route: {route}\r\n" if route else "")
    ksr.vars.update(
        {
            "$rm": method,
            "$Ri": "127.0.0.1" if cucm else "127.0.0.2",
            "$Rp": 5060 if cucm else 5061,
            "$si": "127.0.0.4" if cucm else "127.0.0.3",
            "$sp": 26012 if cucm else 40123,
            "$pr": "tcp" if cucm else "tls",
            "$rU": ruri_user,
            "$rd": ruri_host,
            "$ci": CALL_ID,
            "$fU": "10048",
            "$msg(hdrs)": headers if cucm else "",
            # Microsoft's side is mutual TLS: its certificate names the Microsoft proxy.
            "$tls_peer_subject_cn": "" if cucm else MS_FQDN,
            "$tls_peer_san_hostname": "" if cucm else MS_FQDN,
        }
    )
    if sdp:
        ksr.vars["$rb"] = sdp
    ksr.headers["Max-Forwards"] = max_forwards
    ksr.returns.update(
        {
            "siputils.has_totag": 1 if in_dialog else -1,
            "rr.loose_route": 1 if routed else -1,
            "textops.has_body_type": 1 if sdp else -1,
            "textops.has_body": 1 if sdp else -1,
            "is_ACK": lambda: ksr.vars["$rm"] == "ACK",
            # A new request: no transaction exists yet (tm returns -1 for both).
            "tmx.t_precheck_trans": -1,
            "tm.t_check_trans": -1,
            "tls.is_peer_verified": 1,
        }
    )


def script_reply(ksr: KsrDouble, status: int, method: str, *, side: str, sdp: str = "") -> None:
    microsoft = side == "microsoft"
    ksr.vars.update(
        {
            "$rs": status,
            "$rm": method,
            "$Ri": "127.0.0.2" if microsoft else "127.0.0.1",
            "$Rp": 5061 if microsoft else 5060,
            "$ci": CALL_ID,
        }
    )
    if sdp:
        ksr.vars["$rb"] = sdp
    ksr.returns["textops.has_body_type"] = 1 if sdp else -1


def bookkeeping(call: Call) -> bool:
    """Calls made for metrics and call records (operations.py, tested on their own below), not routing."""
    name, args = call
    if name in ("info", "dispatcher.ds_is_active_uri") or (
        name == "pv.gete" and args[0] in ("$fu", "$tu", "$ft", "$tt")
    ):
        return True
    return name.startswith("htable.sht_") and args[0] in (ksr_adapter.CALLS_TABLE, ksr_adapter.STATE_TABLE)


def routing_calls(ksr: KsrDouble) -> list[Call]:
    return [c for c in ksr.calls if not bookkeeping(c)]


def after(ksr: KsrDouble, name: str) -> list[Call]:
    """The calls from the first call of `name` on (reads before it are checked separately)."""
    calls = routing_calls(ksr)
    names = [n for n, _ in calls]
    assert name in names, f"{name} never called; calls: {names}"
    return calls[names.index(name) :]


def actions(ksr: KsrDouble) -> list[Call]:
    """Every call except reads of the message (pv/hdr getters and has_* tests)."""
    reads = {
        "pv.gete",
        "pv.geti",
        "hdr.gete",
        "siputils.has_totag",
        "textops.has_body_type",
        "textops.has_body",
        "is_OPTIONS",
        "rr.loose_route",
        "tls.is_peer_verified",
        "tm.t_is_canceled",
        "warn",  # refusal log lines; test_refusals_are_logged checks them
    }
    return [c for c in routing_calls(ksr) if c[0] not in reads and c[0] != "sanity.sanity_check"]


def errors(ksr: KsrDouble) -> list[str]:
    return [str(args[0]) for name, args in ksr.calls if name == "err"]


# --- (a) the seed INVITE from CUCM --------------------------------------------------------------------


def test_seed_invite_from_cucm(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)

    def select_proxy(_set: int, _alg: int) -> int:
        ksr.vars["$dd"] = MS_FQDN  # the next hop the dispatcher picked
        return 1

    ksr.returns["dispatcher.ds_select_dst"] = select_proxy
    rc = handler.ksr_request_route(None)

    assert rc == 1
    assert type(rc) is int
    calls = routing_calls(ksr)
    names = [n for n, _ in calls]
    # Who sent it, on which listener; CUCM is a known source, so pike is not asked; then sanity.
    assert calls[:4] == [
        ("pv.gete", ("$Ri",)),
        ("pv.geti", ("$Rp",)),
        ("pv.gete", ("$si",)),
        ("sanity.sanity_check", (18407, 7)),
    ]
    first_action = names.index("tmx.t_precheck_trans")
    reads = Counter(names[4:first_action])
    assert reads == REQUEST_READS, reads
    assert "rr.loose_route" not in names  # an initial request: no Route of ours to consume
    # The transaction checks, then everything that shapes the request, then the relay, in this order.
    assert calls[first_action:] == [
        ("tmx.t_precheck_trans", ()),
        ("tm.t_check_trans", ()),
        ("maxfwd.process_maxfwd", (70,)),
        # o= without CUCM's product name (topology hiding), handed to rtpengine as the body to read.
        ("pv.sets", ("$var(kemi_o365_sdp)", CUCM_SDP.replace("o=CiscoSystemsCCM-SIP ", "o=- "))),
        ("rtpengine.rtpengine_offer", (flag_string(DEFAULT_OFFER_TO_MICROSOFT),)),
        ("uac.uac_replace_to_uri", (f"sip:87000@{MS_FQDN}",)),
        ("uac.uac_replace_from_uri", (f"sip:10048@{SBC_FQDN}",)),
        # One Record-Route entry: the internal one never reaches Microsoft.
        ("rr.record_route_preset_one", (f"{SBC_FQDN}:5061;transport=tls;r2=on;mcid",)),
        *HIDING,
        ("seturi", (f"sip:87000@{MS_FQDN}:5061;transport=tls",)),
        # The dispatcher picks the healthy proxy with the highest priority as the next hop.
        ("dispatcher.ds_select_dst", (1, 8)),
        ("corex.set_send_socket", ("tls:127.0.0.2:5061",)),
        ("set_advertised_address", (SBC_FQDN,)),
        ("set_advertised_port", ("5061",)),
        # Not paused by an earlier 503 + Retry-After (the htable has no entry for it).
        ("pv.gete", ("$du",)),
        ("htable.sht_gete", ("ms_hold", "")),
        ("pv.gete", ("$dd",)),
        ("tls.set_connect_server_id", (MS_FQDN,)),
        ("pv.sets", ("$xavp(tls=>server_name)", MS_FQDN)),
        ("tm.t_on_failure", ("ksr_failure_microsoft",)),
        ("tm.t_on_reply", ("ksr_onreply_initial",)),
        ("tm.t_relay", ()),
    ]
    assert errors(ksr) == []


def _hiding_calls() -> list[Call]:
    masker = topology.Masker(topology_key())
    return [
        ("hdr.remove", ("Replaces",)),
        ("hdr.remove", ("User-Agent",)),
        ("hdr.remove", ("P-Asserted-Identity",)),
        ("hdr.remove", ("Remote-Party-ID",)),
        ("hdr.remove", ("Call-Info",)),
        ("hdr.remove", ("Cisco-Guid",)),
        ("hdr.remove", ("Via",)),
        ("hdr.remove", ("Call-ID",)),
        ("hdr.remove", ("Contact",)),
        # Every added header in one lump (one KSR call), in the order routing decided.
        (
            "hdr.append",
            (
                f'P-Asserted-Identity: "10048" <sip:10048@{SBC_FQDN}>\r\n'
                "User-Agent: kemi-o365\r\n"
                f"Call-ID: {masker.mask(CALL_ID)}\r\n"
                f"Contact: <sip:{SBC_FQDN}:5061;transport=tls;kemi="
                f"{masker.mask('sip:10048@127.0.0.4:26012;transport=tcp')}>\r\n",
            ),
        ),
        # CUCM's Via waits with the transaction, for the replies.
        ("pv.sets", ("$avp(kemi_o365_via)", "Via: SIP/2.0/TCP 127.0.0.4:26012;branch=z9hG4bK-1\r\n")),
    ]


_KEY: list[bytes] = []


def topology_key() -> bytes:
    return _KEY[0]


@pytest.fixture(autouse=True)
def _remember_key(policy: Policy) -> None:
    _KEY[:] = [policy.topology.key]


class _Hiding:
    """The hiding calls, built when compared (the key comes from the test's policy)."""

    def __init__(self, *, initial: bool) -> None:
        self.initial = initial

    def __iter__(self) -> Iterator[Call]:
        calls = _hiding_calls()
        # Replaces is Microsoft's rule for initial INVITEs only.
        return iter(calls if self.initial else calls[1:])


HIDING = _Hiding(initial=True)
IN_DIALOG_HIDING = _Hiding(initial=False)


def test_nothing_of_cucm_leaves_toward_microsoft(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    handler.ksr_request_route(None)
    written = " ".join(str(a) for name, args in ksr.calls if name in ("hdr.append", "seturi") for a in args)
    assert "127.0.0.4" not in written and "Cisco" not in written
    removed = {args[0] for name, args in ksr.calls if name == "hdr.remove"}
    assert {"Via", "Call-ID", "Contact", "Remote-Party-ID", "Call-Info", "Cisco-Guid"} <= removed


def test_unreachable_microsoft_is_503_after_trying_each_proxy_once(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["tm.t_relay"] = -478  # the TLS connection could not be opened
    assert handler.ksr_request_route(None) == 1
    names = ksr.names()
    assert names.count("tm.t_relay") == 1  # the lab policy has one proxy
    assert [n for n, _ in routing_calls(ksr)][-2:] == ["sl.send_reply", "rtpengine.rtpengine_delete0"]
    assert ("sl.send_reply", (503, "No Microsoft Proxy Reachable")) in ksr.calls


@pytest.mark.parametrize(
    ("precheck", "check"),
    [(1, 0), (-1, 0)],
    ids=["being processed (precheck)", "retransmission (t_check_trans 0)"],
)
def test_retransmitted_invite_stops_before_rtpengine(
    ksr: KsrDouble, handler: kemi.Kamailio, precheck: int, check: int
) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["tmx.t_precheck_trans"] = precheck
    ksr.returns["tm.t_check_trans"] = check
    assert handler.ksr_request_route(None) == 1
    assert after(ksr, "tmx.t_precheck_trans") == [("tmx.t_precheck_trans", ()), ("tm.t_check_trans", ())]


def test_insane_request_stops_at_sanity(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["sanity.sanity_check"] = -1
    assert handler.ksr_request_route(None) == 1
    assert ksr.calls[-1] == ("sanity.sanity_check", (18407, 7))
    assert "sl.sl_send_reply" not in ksr.names()  # sanity answered it itself


def test_a_stranger_is_counted_by_pike_and_refused(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.vars["$si"] = "127.0.0.9"
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr)[:3] == [
        ("htable.sht_gete", ("ipban", "127.0.0.9")),
        ("pike.pike_check_req", ()),
        ("sl.sl_send_reply", (403, "Forbidden")),
    ]


def test_a_flooding_stranger_is_banned_and_gets_no_answer(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.vars["$si"] = "127.0.0.9"
    ksr.returns["pike.pike_check_req"] = -2  # pike: over the limit
    assert handler.ksr_request_route(None) == 1
    assert ("htable.sht_setxi", ("ipban", "127.0.0.9", 1, 300)) in ksr.calls
    assert not {"sl.sl_send_reply", "sl.send_reply", "sanity.sanity_check"} & set(ksr.names())
    (log,) = [args[0] for name, args in ksr.calls if name == "warn"]
    assert log == "kemi-o365: flood from 127.0.0.9: no answers to it for 300 s\n"
    # While banned, nothing is asked of pike and nothing is answered.
    ksr.reset()
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.vars["$si"] = "127.0.0.9"
    ksr.returns["htable.sht_gete"] = "1"
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("htable.sht_gete", ("ipban", "127.0.0.9"))]


def test_microsoft_side_is_not_counted_by_pike(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "OPTIONS", side="microsoft", ruri_host="127.0.0.2")
    assert handler.ksr_request_route(None) == 1
    assert "pike.pike_check_req" not in ksr.names()


# --- (b) rtpengine refuses the offer -------------------------------------------------------------------


@pytest.mark.parametrize("rc", [-1, -2])
def test_rtpengine_failure_answers_503_and_does_not_relay(
    ksr: KsrDouble, handler: kemi.Kamailio, rc: int
) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["rtpengine.rtpengine_offer"] = rc

    result = handler.ksr_request_route(None)

    assert result == 1
    assert type(result) is int
    assert after(ksr, "rtpengine.rtpengine_offer")[:2] == [
        ("rtpengine.rtpengine_offer", (flag_string(DEFAULT_OFFER_TO_MICROSOFT),)),
        ("sl.sl_send_reply", (503, "Media Relay Unavailable")),
    ]
    assert [n for n, _ in routing_calls(ksr)][-2:] == [
        "pv.gete",
        "err",
    ]  # the Call-ID is read for the log line
    assert "tm.t_relay" not in ksr.names()
    assert "rr.record_route_preset_one" not in ksr.names()
    (message,) = errors(ksr)
    assert CALL_ID in message
    assert "rtpengine_offer" in message
    # One answer only: the 503, not a 500 on top of it.
    assert "sl.send_reply" not in ksr.names()


# --- (c) OPTIONS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["cucm", "microsoft"])
def test_options_is_answered_200_and_nothing_else(ksr: KsrDouble, handler: kemi.Kamailio, side: str) -> None:
    script_request(ksr, "OPTIONS", side=side, ruri_host="127.0.0.1")
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("sl.sl_send_reply", (200, "OK"))]


def test_refusals_are_logged_with_source_and_side(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.vars["$si"] = "127.0.0.9"
    assert handler.ksr_request_route(None) == 1
    logs = [args[0] for name, args in ksr.calls if name == "warn"]
    assert logs == [
        f"kemi-o365: 403 Forbidden to INVITE from 127.0.0.9:26012 on the cucm side (Call-ID {CALL_ID})\n"
    ]


def test_unknown_listener_is_refused(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.vars["$Rp"] = 5080
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr)[-1] == ("sl.sl_send_reply", (403, "Forbidden"))


def test_delayed_offer_is_refused_488(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE")
    assert handler.ksr_request_route(None) == 1
    assert [name for name, _ in actions(ksr)] == ["sl.sl_send_reply"]
    assert actions(ksr)[0][1][0] == 488


def test_max_forwards_zero_is_refused_483(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP, max_forwards=" 0 ")
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("sl.sl_send_reply", (483, "Too Many Hops"))]


# --- (d) replies -----------------------------------------------------------------------------------------


def test_200_with_sdp_from_microsoft_is_answered_with_the_stripped_sdp(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_reply(ksr, 200, "INVITE", side="microsoft", sdp=MS_SDP)

    rc = handler.ksr_onreply_initial(None)

    assert rc == 1
    assert type(rc) is int
    assert after(ksr, "pv.sets") == [
        ("pv.sets", ("$var(kemi_o365_sdp)", MS_SDP_STRIPPED)),
        ("rtpengine.rtpengine_answer", (flag_string(DEFAULT_ANSWER_TO_CUCM),)),
    ]
    assert "sl.send_reply" not in ksr.names()


def test_reply_reads_status_and_cseq_method(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_reply(ksr, 486, "INVITE", side="microsoft")
    assert handler.ksr_onreply_initial(None) == 1
    assert ("pv.geti", ("$rs",)) in ksr.calls
    # A failed initial INVITE may still fail over: the failure route, not the reply, releases media.
    assert actions(ksr) == []


def test_provisional_from_microsoft_is_remembered_for_the_failure_route(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_reply(ksr, 180, "INVITE", side="microsoft")
    assert handler.ksr_onreply_initial(None) == 1
    assert ("pv.seti", ("$avp(kemi_o365_prov)", 1)) in ksr.calls


@pytest.mark.parametrize(
    ("status", "provisional", "fails_over"),
    [(503, 0, True), (408, 0, True), (603, 0, False), (503, 1, False)],
)
def test_failure_route_fails_over_or_releases_media(
    ksr: KsrDouble, handler: kemi.Kamailio, status: int, provisional: int, fails_over: bool
) -> None:
    ksr.vars.update({"$T_reply_code": status, "$avp(kemi_o365_prov)": provisional, "$dd": "sip2.example.net"})
    ksr.returns["tm.t_is_canceled"] = -1
    assert handler.ksr_failure_microsoft(None) == 1
    if fails_over:
        assert actions(ksr) == [
            ("dispatcher.ds_mark_dst_state", ("ip",)),
            ("dispatcher.ds_next_dst", ()),
            ("corex.set_send_socket", ("tls:127.0.0.2:5061",)),
            ("set_advertised_address", (SBC_FQDN,)),
            ("set_advertised_port", ("5061",)),
            ("htable.sht_gete", ("ms_hold", "")),
            ("tls.set_connect_server_id", ("sip2.example.net",)),
            ("pv.sets", ("$xavp(tls=>server_name)", "sip2.example.net")),
            ("tm.t_on_failure", ("ksr_failure_microsoft",)),
            ("tm.t_on_reply", ("ksr_onreply_initial",)),
            ("tm.t_relay", ()),
        ]
    else:
        assert actions(ksr) == [("rtpengine.rtpengine_delete0", ())]


def test_options_pings_get_the_sbc_contact(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    ksr.vars["$rm"] = "OPTIONS"
    ksr.returns["hdr.is_present"] = -1
    assert handler.ksr_tm_event(None, "tm:local-request") == 1
    assert ("hdr.append", (f"Contact: <sip:{SBC_FQDN}:5061;transport=tls>\r\n",)) in ksr.calls


@pytest.mark.parametrize(
    "callback", ["ksr_onreply_initial", "ksr_onreply_in_dialog", "ksr_onreply_late_offer"]
)
def test_100_trying_costs_one_read_and_changes_nothing(
    ksr: KsrDouble, handler: kemi.Kamailio, callback: str
) -> None:
    # tm never relays a 100 (hop by hop): reading the rest of it would be work for nothing.
    script_reply(ksr, 100, "INVITE", side="microsoft")
    assert getattr(handler, callback)(None) == 1
    assert ksr.calls == [("pv.geti", ("$rs",))]


def test_cucm_ping_is_answered_from_a_few_reads(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "OPTIONS", sdp="")
    assert handler.ksr_request_route(None) == 1
    assert ksr.calls[-1] == ("sl.sl_send_reply", (200, "OK"))
    # Who sent it, sanity, then only what the answer depends on: no full read of the request.
    assert len(routing_calls(ksr)) <= 10, ksr.names()
    assert "pv.gete" not in [n for n, a in ksr.calls if a and a[0] in ("$rU", "$rd", "$fU", "$ci")]


@pytest.mark.parametrize(
    ("headers", "answer"),
    [
        ({}, (200, "OK")),
        ({"Require": "100rel"}, (420, "Bad Extension")),
        ({"Max-Forwards": "0"}, (200, "OK")),  # OPTIONS may be answered at Max-Forwards 0 (RFC 3261 §11)
        ({"Max-Forwards": "x"}, (400, "Bad Request (Max-Forwards is not a number)")),
        ({"Max-Forwards": "300"}, (400, "Bad Request (Max-Forwards above 255)")),
    ],
)
def test_cucm_ping_answers_as_the_full_path_does(
    ksr: KsrDouble, handler: kemi.Kamailio, policy: Policy, headers: dict[str, str], answer: tuple[int, str]
) -> None:
    script_request(ksr, "OPTIONS", sdp="")
    ksr.headers.update(headers)
    assert handler.ksr_request_route(None) == 1
    replies = [a for n, a in ksr.calls if n == "sl.sl_send_reply"]
    assert replies == [answer]
    # The same answer as deciding on the whole request.
    full = routing.decide(ksr_adapter.read_request(policy, "127.0.0.4", Side.CUCM), policy)
    assert isinstance(full, Respond) and (full.code, full.reason) == answer


def test_ping_from_a_stranger_takes_the_full_path(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "OPTIONS", sdp="")
    ksr.vars["$si"] = "192.0.2.77"
    assert handler.ksr_request_route(None) == 1
    assert ("sl.sl_send_reply", (403, "Forbidden")) in ksr.calls
    assert any("kemi-o365: 403" in a[0] for n, a in ksr.calls if n == "warn")


def test_failed_reinvite_keeps_the_media_session(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_reply(ksr, 488, "INVITE", side="microsoft")
    assert handler.ksr_onreply_in_dialog(None) == 1
    assert actions(ksr) == []


def test_rtpengine_answer_failure_is_logged_not_raised(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_reply(ksr, 200, "INVITE", side="microsoft", sdp=MS_SDP)
    ksr.returns["rtpengine.rtpengine_answer"] = -1
    assert handler.ksr_onreply_initial(None) == 1
    (message,) = errors(ksr)
    assert CALL_ID in message
    # A reply is never answered: no sl reply from a tm onreply callback.
    assert not {"sl.send_reply", "sl.sl_send_reply"} & set(ksr.names())


# --- (e) in-dialog requests ------------------------------------------------------------------------------


def test_bye_from_cucm_in_dialog(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    # A dialog CUCM started: our Route says Microsoft knows its Call-ID masked.
    script_request(ksr, "BYE", in_dialog=True, ruri_host=MS_FQDN, route=MASKED_ROUTE)

    assert handler.ksr_request_route(None) == 1

    names = ksr.names()
    assert names.index("siputils.has_totag") < names.index("rr.loose_route")
    assert after(ksr, "tmx.t_precheck_trans") == [
        ("tmx.t_precheck_trans", ()),
        ("tm.t_check_trans", ()),
        ("maxfwd.process_maxfwd", (70,)),
        ("ng.delete", (CALL_ID,)),
        *IN_DIALOG_HIDING,
        ("tls.set_connect_server_id", (MS_FQDN,)),
        ("pv.sets", ("$xavp(tls=>server_name)", MS_FQDN)),
        ("setdsturi", ("sip:127.0.0.3:5061;transport=tls",)),
        ("set_advertised_address", (SBC_FQDN,)),
        ("set_advertised_port", ("5061",)),
        ("tm.t_on_reply", ("ksr_onreply_in_dialog",)),
        ("tm.t_relay", ()),
    ]


def test_bye_from_microsoft_in_dialog(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "BYE", side="microsoft", in_dialog=True, ruri_host="127.0.0.1")
    assert handler.ksr_request_route(None) == 1
    assert after(ksr, "ng.delete") == [
        ("ng.delete", (CALL_ID,)),
        ("tm.t_on_reply", ("ksr_onreply_in_dialog",)),
        ("tm.t_relay", ()),
    ]


def test_bye_record_carries_the_counts_rtpengine_gave_back_on_delete(
    ksr: KsrDouble, handler: kemi.Kamailio, ng_socket: list[dict[str, object]]
) -> None:
    script_request(ksr, "BYE", in_dialog=True, ruri_host=MS_FQDN)
    state = calls.start_state(CALL_ID, "sip:10048@cucm", "sip:87000@ms", "to_microsoft", 1000.0)
    ksr.returns["htable.sht_gete"] = lambda table, key: state if table == ksr_adapter.CALLS_TABLE else ""
    ksr.vars.update({"$ft": "caller-tag", "$tt": "callee-tag"})

    assert handler.ksr_request_route(None) == 1

    # One round trip, no query before the delete, and its answer read only once the BYE is relayed.
    assert [m["command"] for m in ng_socket] == ["delete"]
    names = ksr.names()
    assert names.index("ng.delete") < names.index("tm.t_relay") < names.index("ng.reply")
    (line,) = [args[0] for name, args in ksr.calls if name == "info" and "call-record" in args[0]]
    record = json.loads(line.split("call-record ", 1)[1])
    assert record["media"] == {
        "rtp_from_caller": 250,
        "rtp_from_callee": 240,
        "rtp_errors": 1,
        "rtcp_packets": 0,
        "lost": 0,
    }
    assert record["hung_up_by"] == "cucm"


def test_bye_record_without_rtpengine_answer_has_no_media(
    ksr: KsrDouble, handler: kemi.Kamailio, monkeypatch: pytest.MonkeyPatch
) -> None:
    def silent(*args: object, **kwargs: object) -> Answer:
        return Answer(ksr, rtpengine_ng.NgError("rtpengine at 127.0.0.1:1 did not answer 'delete'"))

    monkeypatch.setattr(rtpengine_ng, "send_json", silent)
    script_request(ksr, "BYE", in_dialog=True, ruri_host=MS_FQDN)
    state = calls.start_state(CALL_ID, "sip:10048@cucm", "sip:87000@ms", "to_microsoft", 1000.0)
    ksr.returns["htable.sht_gete"] = lambda table, key: state if table == ksr_adapter.CALLS_TABLE else ""

    assert handler.ksr_request_route(None) == 1

    assert "tm.t_relay" in ksr.names()  # the BYE still goes through
    (line,) = [args[0] for name, args in ksr.calls if name == "info" and "call-record" in args[0]]
    assert json.loads(line.split("call-record ", 1)[1])["media"] is None


def test_bye_not_routed_to_us_is_refused(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "BYE", in_dialog=True, routed=False, ruri_host=MS_FQDN)
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("sl.sl_send_reply", (404, "Not Here"))]


def test_ack_in_dialog_is_relayed_without_a_transaction(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "ACK", in_dialog=True, ruri_host=MS_FQDN, route=MASKED_ROUTE)
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [
        ("is_ACK", ()),
        # Hidden as any request toward Microsoft, but CUCM's Via is not kept: nothing answers an ACK.
        *[c for c in IN_DIALOG_HIDING if c[0] != "pv.sets"],
        ("tls.set_connect_server_id", (MS_FQDN,)),
        ("pv.sets", ("$xavp(tls=>server_name)", MS_FQDN)),
        ("setdsturi", ("sip:127.0.0.3:5061;transport=tls",)),
        ("set_advertised_address", (SBC_FQDN,)),
        ("set_advertised_port", ("5061",)),
        ("tm.t_relay", ()),
    ]


def test_reinvite_from_microsoft_offers_the_stripped_sdp(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", side="microsoft", in_dialog=True, sdp=MS_SDP, ruri_host="127.0.0.1")
    assert handler.ksr_request_route(None) == 1
    sets = [args for name, args in ksr.calls if name == "pv.sets"]
    assert sets == [("$var(kemi_o365_sdp)", MS_SDP_STRIPPED)]
    names = ksr.names()
    assert names.index("pv.sets") < names.index("rtpengine.rtpengine_offer") < names.index("tm.t_relay")
    assert ("tm.t_on_reply", ("ksr_onreply_in_dialog",)) in ksr.calls


def test_reinvite_refused_by_rtpengine_is_answered(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    # Every INVITE needs a final response (RFC 3261): a re-INVITE whose offer rtpengine refuses is not
    # relayed, so the SBC must answer it itself, as it does for an initial INVITE (503).
    script_request(ksr, "INVITE", in_dialog=True, sdp=CUCM_SDP, ruri_host=MS_FQDN)
    ksr.returns["rtpengine.rtpengine_offer"] = -1
    assert handler.ksr_request_route(None) == 1
    assert "tm.t_relay" not in ksr.names()
    replies = [args for name, args in ksr.calls if name in ("sl.sl_send_reply", "sl.send_reply")]
    assert len(replies) == 1, replies
    assert replies[0][0] >= 500
    assert CALL_ID in errors(ksr)[0]


def test_cancel_releases_media_then_relays(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "CANCEL")
    ksr.returns["tm.t_check_trans"] = 1  # the INVITE transaction it cancels was found
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [
        ("tm.t_check_trans", ()),
        ("rtpengine.rtpengine_delete0", ()),
        ("tm.t_relay", ()),
    ]


# --- (f) unexpected exceptions ---------------------------------------------------------------------------


def test_unexpected_exception_is_logged_and_answered_500(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)

    def boom(route: str) -> int:
        raise RuntimeError("record_route_preset exploded")

    ksr.returns["rr.record_route_preset_one"] = boom

    rc = handler.ksr_request_route(None)

    assert rc == 1
    assert type(rc) is int
    assert "tm.t_relay" not in ksr.names()
    logged = errors(ksr)
    assert logged, "nothing logged"
    assert CALL_ID in logged[0]
    assert "RuntimeError: record_route_preset exploded" in logged[0]
    assert ("sl.send_reply", (500, "Internal Server Error")) in ksr.calls
    # The offer rtpengine already accepted is released: no session outlives a refused request.
    assert ksr.names()[-2:] == ["sl.send_reply", "rtpengine.rtpengine_delete0"]


def test_exception_on_an_ack_sends_no_reply(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "ACK", in_dialog=True, ruri_host=MS_FQDN)
    ksr.returns["setdsturi"] = _raise
    assert handler.ksr_request_route(None) == 1
    assert errors(ksr)
    assert not {"sl.send_reply", "sl.sl_send_reply"} & set(ksr.names())


def test_exception_in_a_reply_callback_is_logged_not_answered(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_reply(ksr, 200, "INVITE", side="microsoft", sdp=MS_SDP)
    ksr.returns["pv.sets"] = _raise
    assert handler.ksr_onreply_initial(None) == 1
    assert CALL_ID in errors(ksr)[0]
    assert "sl.send_reply" not in ksr.names()


def test_failing_500_is_logged_not_raised(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["rr.record_route_preset_one"] = _raise
    ksr.returns["sl.send_reply"] = _raise
    assert handler.ksr_request_route(None) == 1
    assert any("could not send 500" in m for m in errors(ksr))


def _raise(*args: object) -> object:
    raise RuntimeError(f"scripted failure {args!r}")


def test_failed_seturi_stops_the_relay(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    # Kamailio's core seturi/setdsturi return a Python bool (api_list ret "bool"), False on failure;
    # the adapter must not relay an INVITE whose Request-URI could not be set.
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["seturi"] = False
    assert handler.ksr_request_route(None) == 1
    assert "tm.t_relay" not in ksr.names()
    assert ("sl.send_reply", (500, "Internal Server Error")) in ksr.calls


def test_no_microsoft_proxy_available_is_503_and_releases_media(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)
    ksr.returns["dispatcher.ds_select_dst"] = -1
    assert handler.ksr_request_route(None) == 1
    assert "tm.t_relay" not in ksr.names()
    assert ("sl.sl_send_reply", (503, "No Microsoft Proxy Available")) in ksr.calls
    assert ("rtpengine.rtpengine_delete0", ()) in ksr.calls


# --- (g) every callback returns the int 1 (KAMAILIO-NOTES P2) ---------------------------------------------


def callbacks() -> list[str]:
    return sorted(n for n, _ in inspect.getmembers(kemi.Kamailio, inspect.isfunction) if n.startswith("ksr_"))


@pytest.mark.parametrize("name", callbacks())
@pytest.mark.parametrize("trouble", ["none", "exception", "rtpengine"])
def test_every_callback_returns_int_1(
    ksr: KsrDouble, handler: kemi.Kamailio, name: str, trouble: str
) -> None:
    if name.startswith("ksr_onreply"):
        script_reply(ksr, 200, "INVITE", side="microsoft", sdp=MS_SDP)
    else:
        script_request(ksr, "INVITE", sdp=CUCM_SDP)
    if trouble == "exception":
        ksr.returns["pv.sets"] = _raise
    elif trouble == "rtpengine":
        ksr.returns["rtpengine.rtpengine_offer"] = -1
        ksr.returns["rtpengine.rtpengine_answer"] = -1
    args: tuple[object, ...] = (None, "tm:local-request") if name == "ksr_tm_event" else (None,)
    rc = getattr(handler, name)(*args)
    assert type(rc) is int, f"{name} returned {rc!r}"
    assert rc == 1


def test_child_init_returns_an_int(handler: kemi.Kamailio) -> None:
    for rank in (-1, 0, 1, 7):
        assert type(handler.child_init(rank)) is int


def test_core_callbacks_exist() -> None:
    assert callable(getattr(kemi.Kamailio, "ksr_request_route", None))


# --- callback names used by the adapter (KAMAILIO-NOTES P1) ---------------------------------------------


def _string_constants(tree: ast.Module) -> dict[str, str]:
    out: dict[str, str] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            out[node.targets[0].id] = node.value.value
    return out


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def tm_route_names(module_file: Path) -> set[str]:
    """Every callback name the module can pass to KSR.tm.t_on_*, following one level of helper.

    A name reaches t_on_* either as a literal/constant argument or through a helper's parameter
    (`_relay(ONREPLY_INITIAL)` -> `KSR.tm.t_on_reply(onreply)`); both are resolved here.
    """
    tree = ast.parse(module_file.read_text())
    constants = _string_constants(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    names: set[str] = set()
    unresolved: list[str] = []
    # helper name -> index of the parameter it forwards to t_on_*
    forwarders: dict[str, int] = {}

    def resolve(arg: ast.expr, where: ast.FunctionDef | None) -> None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in constants:
            names.add(constants[arg.id])
        elif isinstance(arg, ast.Name) and where is not None and arg.id in [a.arg for a in where.args.args]:
            forwarders[where.name] = [a.arg for a in where.args.args].index(arg.id)
        else:
            unresolved.append(ast.unparse(arg))

    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [None]:
        body = ast.walk(func) if func is not None else iter(tree.body)
        for node in body:
            if isinstance(node, ast.Call) and _callee(node).startswith("t_on_") and node.args:
                resolve(node.args[0], func)
    for call in calls:
        index = forwarders.get(_callee(call))
        if index is not None and len(call.args) > index:
            resolve(call.args[index], None)
    assert not unresolved, f"t_on_* names that cannot be checked statically: {unresolved}"
    return names


def test_tm_callback_names_are_real_methods() -> None:
    names = tm_route_names(Path(ksr_adapter.__file__))
    assert {ksr_adapter.ONREPLY_INITIAL, ksr_adapter.ONREPLY_IN_DIALOG} <= names
    for name in sorted(names):
        method = getattr(kemi.Kamailio, name, None)
        assert callable(method), f"t_on_* callback {name!r} is not a method of kemi.Kamailio"


def test_tm_callback_constants_are_real_methods() -> None:
    module = Path(ksr_adapter.__file__)
    constants = _string_constants(ast.parse(module.read_text()))
    routes = {k: v for k, v in constants.items() if re.match(r"ON(REPLY|FAILURE|BRANCH)", k)}
    assert set(routes) >= {"ONREPLY_INITIAL", "ONREPLY_IN_DIALOG"}
    for const, name in routes.items():
        assert callable(getattr(kemi.Kamailio, name, None)), f"{const}={name!r} names no Kamailio method"


# --- kamailio.cfg agrees with the Python side ------------------------------------------------------------


def _cfg() -> str:
    # Drop comment lines (but keep '#!' preprocessor directives).
    lines = KAMAILIO_CFG.read_text().splitlines()
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith("#") or ln.lstrip().startswith("#!"))


@pytest.mark.parametrize(
    ("param", "default"),
    [("onsend_route_callback", "ksr_onsend_route"), ("reply_route_callback", "ksr_reply_route")],
)
def test_core_callbacks_are_disabled_or_defined(param: str, default: str) -> None:
    match = re.search(rf'^\s*kemi\.{param}\s*=\s*"([^"]*)"', _cfg(), re.MULTILINE)
    name = match.group(1) if match else default
    assert name == "none" or callable(getattr(kemi.Kamailio, name, None)), (
        f'kemi.{param} is "{name}" but kemi.Kamailio has no such method (KAMAILIO-NOTES P1)'
    )


def test_read_sdp_pv_matches_the_adapter() -> None:
    found = re.findall(r'^\s*modparam\("rtpengine",\s*"read_sdp_pv",\s*"([^"]+)"\)', _cfg(), re.MULTILINE)
    assert found == [ksr_adapter.SDP_PV]


def test_microsoft_in_dialog_request_uri_is_restored_before_loose_route(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_request(ksr, "BYE", side="microsoft", in_dialog=True, ruri_host=SBC_FQDN)
    cucm_contact = "sip:10048@127.0.0.4:26012;transport=tcp"
    ksr.vars[ksr_adapter.CONTACT_TOKEN_PV] = topology.Masker(topology_key()).mask(cucm_contact)
    assert handler.ksr_request_route(None) == 1
    names = ksr.names()
    # Restored first: a Request-URI naming the SBC would send loose_route down its strict-router path.
    assert names.index("seturi") < names.index("rr.loose_route")
    assert ("seturi", (cucm_contact,)) in ksr.calls


def test_a_contact_token_that_is_not_ours_leaves_the_request_uri_alone(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_request(ksr, "BYE", side="microsoft", in_dialog=True, ruri_host=SBC_FQDN)
    ksr.vars[ksr_adapter.CONTACT_TOKEN_PV] = "kx1-forgedforgedforgedforgedforged"
    assert handler.ksr_request_route(None) == 1
    assert "seturi" not in ksr.names()


def test_a_paused_proxy_is_skipped_and_the_pause_is_recorded(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    ksr.vars.update(
        {
            "$T_reply_code": 503,
            "$T_rpl($hdr(Retry-After))": "30 (maintenance)",
            "$du": "sip:sip.example.net:5061;transport=tls",
            "$dd": "sip2.example.net",
        }
    )
    ksr.returns["tm.t_is_canceled"] = -1
    assert handler.ksr_failure_microsoft(None) == 1
    # RFC 3261 §20.33: Retry-After seconds (a comment may follow) pause the proxy that sent it.
    assert ("htable.sht_setxi", ("ms_hold", "sip:sip.example.net:5061;transport=tls", 1, 30)) in ksr.calls


# --- malformed input that Kamailio's parser accepts ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"max_forwards": "seventy"}, "Bad Request (Max-Forwards is not a number)"),
        ({"max_forwards": "9999"}, "Bad Request (Max-Forwards above 255)"),
        ({"sdp": CUCM_SDP + "a=x:\0\r\n"}, "Bad Request (NUL byte in the SDP)"),
    ],
)
def test_malformed_requests_get_400_and_touch_nothing(
    ksr: KsrDouble, handler: kemi.Kamailio, change: dict[str, str], reason: str
) -> None:
    script_request(ksr, "INVITE", **{"sdp": CUCM_SDP, **change})  # type: ignore[arg-type]
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("sl.sl_send_reply", (400, reason))]


def test_a_body_that_is_not_utf8_gets_400(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    script_request(ksr, "INVITE", sdp=CUCM_SDP)

    def undecodable(name: str) -> str:
        if name == "$rb":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return str(ksr.vars.get(name, ""))

    ksr.returns["pv.gete"] = undecodable
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [("sl.sl_send_reply", (400, "Bad Request (SDP is not UTF-8 text)"))]
    assert errors(ksr) == []


def test_options_requiring_an_extension_gets_420_with_unsupported(
    ksr: KsrDouble, handler: kemi.Kamailio
) -> None:
    script_request(ksr, "OPTIONS", ruri_host="127.0.0.1")
    ksr.headers["Require"] = "nothingSupported, foo"
    assert handler.ksr_request_route(None) == 1
    assert actions(ksr) == [
        ("hdr.append_to_reply", ("Unsupported: nothingSupported, foo\r\n",)),
        ("sl.sl_send_reply", (420, "Bad Extension")),
    ]


def test_replies_no_transaction_knows_are_dropped(ksr: KsrDouble, handler: kemi.Kamailio) -> None:
    # tm calls on_sl_reply only for such replies: each is dropped, never forwarded by its Via.
    script_reply(ksr, 200, "INVITE", side="microsoft", sdp=MS_SDP)
    assert handler.ksr_stray_reply(None, "on_sl_reply") == 1
    assert ksr.names() == ["set_drop"]


def test_replies_reach_python_through_tm_only() -> None:
    """No core reply route (it would run Python for every reply); tm's on_sl_reply names the
    handler's method for replies no transaction knows."""
    cfg = _cfg()
    assert re.search(r'^\s*kemi\.reply_route_callback\s*=\s*"none"', cfg, re.MULTILINE)
    match = re.search(r'^\s*modparam\("tm",\s*"on_sl_reply",\s*"([^"]+)"\)', cfg, re.MULTILINE)
    assert match, "tm's on_sl_reply is not set: stray replies would be forwarded by their Via"
    assert callable(getattr(kemi.Kamailio, match.group(1), None)), match.group(1)
