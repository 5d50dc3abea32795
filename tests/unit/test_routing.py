"""routing.decide and routing.on_reply: message facts plus the lab policy in, one decision out."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from kemi_o365 import routing, topology
from kemi_o365.decision import (
    Decision,
    Drop,
    FailedBranch,
    Failover,
    GiveUp,
    HeaderEdits,
    Media,
    MediaAction,
    NgControl,
    RelayCancel,
    RelayInDialog,
    RelayToCucm,
    RelayToMicrosoft,
    ReplyAction,
    Respond,
)
from kemi_o365.media import (
    DEFAULT_ANSWER_TO_CUCM,
    DEFAULT_ANSWER_TO_MICROSOFT,
    DEFAULT_OFFER_TO_CUCM,
    DEFAULT_OFFER_TO_MICROSOFT,
    OTHER_SDES_SUITES,
    anonymous_origin,
    flag_string,
)
from kemi_o365.policy.model import Policy, Transport
from kemi_o365.request import Method, Reply, Request, Side
from tests.helpers import lab_policy

MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
TO_URI = f"sip:87000@{MS_FQDN}"
SBC_FQDN = "sbc-o365.example.com"

# What CUCM offers (seed 000): plain RTP/AVP.
CUCM_SDP = (
    "v=0\r\no=CiscoSystemsCCM-SIP 94213 1 IN IP4 127.0.0.1\r\ns=SIP Call\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 31182 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
)


# Toward CUCM: plain RTP, ICE gone, only CUCM's codecs (cucm.codecs default): fits a UDP leg.
OFFER_TO_CUCM = (
    *DEFAULT_OFFER_TO_CUCM,
    "codec-strip=all",
    "codec-except=PCMU",
    "codec-except=PCMA",
    "codec-except=telephone-event",
)

# Microsoft's SDP: SRTP, plus the media-level c= line private to its network (seed 000).
MS_SDP = (
    "v=0\r\no=- 85 0 IN IP4 127.0.0.3\r\ns=session\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    "m=audio 54532 RTP/SAVP 0 101\r\nc=IN IP4 127.0.0.25\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:FHoHEZk7wM6b/frTeX+fzQ/K0PtuAvfIzRqjol9K\r\n"
)
# The same body once the policy's strip_answer_prefixes removed the private c= line, byte for byte.
MS_SDP_STRIPPED = (
    "v=0\r\no=- 85 0 IN IP4 127.0.0.3\r\ns=session\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n"
    "m=audio 54532 RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:FHoHEZk7wM6b/frTeX+fzQ/K0PtuAvfIzRqjol9K\r\n"
)

DELETE = Media(MediaAction.DELETE)
DIALOG_CALL_ID = "1-3487@127.0.0.4"
# A BYE's delete goes to rtpengine's ng socket (lab.yaml's control address, rtpengine_timeout_ms), so
# the call record gets the final counts from its reply.
BYE_DELETE = Media(MediaAction.DELETE, f"call-id={DIALOG_CALL_ID}", report=NgControl("127.0.0.1", 22230, 0.5))
# CUCM's SDP as rtpengine gets it toward Microsoft: o= names no product (media.anonymous_origin).
CUCM_SDP_ANON = CUCM_SDP.replace("o=CiscoSystemsCCM-SIP ", "o=- ")
# Toward Microsoft, CUCM's Via always goes and the User-Agent is the SBC's (topology hiding); these
# test requests carry no other header, so nothing else changes (tests/unit/test_topology.py does).
HIDE_REQUEST = HeaderEdits(("Via",), ("User-Agent: kemi-o365",))
CUCM_VIA = "SIP/2.0/TCP 127.0.0.4:26012;branch=z9hG4bK-1"
STASH = f"Via: {CUCM_VIA}\r\n"  # kept with the transaction for the replies
HIDE_REPLY = HeaderEdits((), ("Server: kemi-o365",))
DELAYED_OFFER = Respond(488, "Not Acceptable Here (delayed offer: enable early offer on the CUCM trunk)")


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return lab_policy(tmp_path_factory.mktemp("policy"))


def request(**changes: object) -> Request:
    """The seed's initial INVITE from CUCM over TCP; `changes` override single facts."""
    base = Request(
        method=Method.INVITE,
        ruri_user="87000",
        ruri_host="pstn-o365.example.com",
        from_user="10048",
        source_ip="127.0.0.4",
        source_port=26012,
        transport=Transport.TCP,
        side=Side.CUCM,
        to_tag=False,
        has_sdp=True,
        sdp=CUCM_SDP,
        max_forwards=70,
        headers=(("Via", CUCM_VIA),),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def in_dialog(method: Method, side: Side, **changes: object) -> Request:
    facts: dict[str, object] = {
        "method": method,
        "side": side,
        "to_tag": True,
        "routed_to_us": True,
        "has_sdp": False,
        "sdp": "",
        "ruri_user": "87000",
        "ruri_host": MS_FQDN if side is Side.CUCM else "127.0.0.1",
        "source_ip": "127.0.0.4" if side is Side.CUCM else "127.0.0.3",
        "transport": Transport.TCP if side is Side.CUCM else Transport.TLS,
        "call_id": DIALOG_CALL_ID,
    }
    if side is Side.MICROSOFT:
        facts.update(MICROSOFT_TLS)
    facts.update(changes)
    return request(**facts)


# A request over a mutual-TLS connection whose client certificate verified and names Microsoft.
MICROSOFT_TLS: dict[str, object] = {
    "side": Side.MICROSOFT,
    "source_ip": "127.0.0.3",
    "transport": Transport.TLS,
    "tls_verified": True,
    "tls_peer_names": (MS_FQDN,),
}


def from_microsoft(**changes: object) -> Request:
    """An initial request Microsoft starts (Play on Phone INVITE by default)."""
    facts: dict[str, object] = {**MICROSOFT_TLS, "ruri_user": "10048", "ruri_host": "sbc-o365.example.com"}
    facts["sdp"] = MS_SDP
    facts.update(changes)
    return request(**facts)


# --- the initial INVITE from CUCM ------------------------------------------------------------------


def test_policy_uses_the_default_flag_sets(policy: Policy) -> None:
    # lab.yaml names no flags, so the tests below can spell the expected flags from media.py.
    assert policy.microsoft.offer_flags == DEFAULT_OFFER_TO_MICROSOFT
    assert policy.microsoft.answer_flags == DEFAULT_ANSWER_TO_CUCM


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.UDP])
def test_invite_from_cucm_is_relayed_to_microsoft(policy: Policy, transport: Transport) -> None:
    decision = routing.decide(request(transport=transport, call_id="1-3487@127.0.0.4"), policy)
    masked = topology.masker(policy).mask("1-3487@127.0.0.4")
    assert decision == RelayToMicrosoft(
        request_uri=f"sip:87000@{MS_FQDN}:5061;transport=tls",
        proxy_set=1,
        proxies=1,
        to_uri=TO_URI,
        send_socket="tls:127.0.0.2:5061",
        advertised_host=SBC_FQDN,
        advertised_port=5061,
        # One entry: the internal one is added back only on the replies toward CUCM.
        record_route=f"{SBC_FQDN}:5061;transport=tls;r2=on;mcid",
        media=Media(MediaAction.OFFER, flag_string(DEFAULT_OFFER_TO_MICROSOFT), CUCM_SDP_ANON),
        # Exchange UM: the numbers stay CUCM's; the From host becomes the SBC's FQDN.
        from_uri=f"sip:10048@{SBC_FQDN}",
        edits=HeaderEdits(("Replaces", "Via", "Call-ID"), ("User-Agent: kemi-o365", f"Call-ID: {masked}")),
        stash=STASH,
        tls_server_id=MS_FQDN,  # the TLS client profile whose SNI is the proxy's FQDN
    )


@pytest.mark.parametrize("host", ["pstn-o365.example.com", "pstn2-o365.example.com", "PSTN-O365.Example.COM"])
def test_every_host_matching_the_srv_pattern_goes_to_microsoft(policy: Policy, host: str) -> None:
    assert isinstance(routing.decide(request(ruri_host=host), policy), RelayToMicrosoft)


def test_offer_toward_microsoft_makes_srtp_without_ice_dtls_or_rtcp_mux(policy: Policy) -> None:
    decision = routing.decide(request(), policy)
    assert isinstance(decision, RelayToMicrosoft)
    assert decision.media.action is MediaAction.OFFER
    assert decision.media.sdp == CUCM_SDP_ANON  # only o='s username differs from CUCM's body
    flags = decision.media.flags.split(" ")
    for flag in ("RTP/SAVP", "ICE=remove", "DTLS=off", "rtcp-mux-demux"):
        assert flag in flags
    # Both directions in this order: rtpengine takes the first as the offerer's interface.
    assert flags.index("direction=internal") + 1 == flags.index("direction=external")
    # Only AES_CM_128_HMAC_SHA1_80 is offered: every other suite is excluded, that one never.
    assert "SDES-no-AES_CM_128_HMAC_SHA1_80" not in flags
    assert {f"SDES-no-{suite}" for suite in OTHER_SDES_SUITES} <= set(flags)


@dataclass(frozen=True)
class Case:
    name: str
    req: Request
    want: Decision


CASES = [
    Case("host not matching", request(ruri_host="other.example.com"), Respond(404, "Not Found")),
    # The pattern must match the whole host (fullmatch), not a prefix of an attacker's name.
    Case("host with suffix", request(ruri_host="pstn-o365.example.com.evil.net"), Respond(404, "Not Found")),
    Case("host with prefix", request(ruri_host="xpstn-o365.example.com"), Respond(404, "Not Found")),
    Case("delayed offer", request(has_sdp=False, sdp=""), DELAYED_OFFER),
    Case("source outside cucm.sources", request(source_ip="192.0.2.99"), Respond(403, "Forbidden")),
    Case("unparsable source", request(source_ip="not-an-ip"), Respond(403, "Forbidden")),
    Case("unknown side", request(side=Side.UNKNOWN), Respond(403, "Forbidden")),
    Case(
        "unknown side OPTIONS", request(side=Side.UNKNOWN, method=Method.OPTIONS), Respond(403, "Forbidden")
    ),
    Case("max-forwards 0", request(max_forwards=0), Respond(483, "Too Many Hops")),
    Case(
        "max-forwards 0 in dialog",
        in_dialog(Method.BYE, Side.MICROSOFT, max_forwards=0),
        Respond(483, "Too Many Hops"),
    ),
    Case("max-forwards 0 OPTIONS", request(method=Method.OPTIONS, max_forwards=0), Respond(200, "OK")),
    # Max-Forwards 1 is still forwardable: the request goes on to the next check (here: no SDP -> 488).
    Case("max-forwards 1", request(max_forwards=1, has_sdp=False, sdp=""), DELAYED_OFFER),
    Case("max-forwards absent", request(max_forwards=None, has_sdp=False, sdp=""), DELAYED_OFFER),
    Case("OPTIONS from CUCM", request(method=Method.OPTIONS, has_sdp=False, sdp=""), Respond(200, "OK")),
    Case(
        "OPTIONS from Microsoft",
        from_microsoft(method=Method.OPTIONS, has_sdp=False, sdp=""),
        Respond(200, "OK"),
    ),
    Case("CANCEL from CUCM", request(method=Method.CANCEL, has_sdp=False, sdp=""), RelayCancel(DELETE)),
    Case(
        "initial INVITE from Microsoft (Play on Phone) goes to CUCM as plain RTP",
        from_microsoft(),
        RelayToCucm(
            request_uri="sip:10048@127.0.0.4:5060;transport=tcp",
            destination="sip:127.0.0.4:5060;transport=tcp",
            send_socket="tcp:127.0.0.1:5060",
            record_route=(
                "127.0.0.1:5060;transport=tcp;r2=on",
                "sbc-o365.example.com:5061;transport=tls;r2=on",
            ),
            media=Media(
                MediaAction.OFFER,
                flag_string((*OFFER_TO_CUCM, "direction=external", "direction=internal")),
                MS_SDP_STRIPPED,
            ),
        ),
    ),
    Case(
        "message-waiting NOTIFY from Microsoft goes to CUCM without media or Record-Route",
        from_microsoft(method=Method.NOTIFY, has_sdp=False, sdp=""),
        RelayToCucm(
            request_uri="sip:10048@127.0.0.4:5060;transport=tcp",
            destination="sip:127.0.0.4:5060;transport=tcp",
            send_socket="tcp:127.0.0.1:5060",
            record_route=None,
            media=None,
        ),
    ),
    Case(
        "REGISTER from Microsoft", from_microsoft(method=Method.REGISTER), Respond(405, "Method Not Allowed")
    ),
    Case(
        "INVITE from Microsoft without SDP",
        from_microsoft(has_sdp=False, sdp=""),
        Respond(488, "Not Acceptable Here (no SDP offer)"),
    ),
    Case(
        "Microsoft side, certificate not verified",
        from_microsoft(tls_verified=False),
        Respond(403, "Forbidden"),
    ),
    Case(
        "Microsoft side, certificate names someone else",
        from_microsoft(tls_peer_names=("sbc.attacker.example.org",)),
        Respond(403, "Forbidden"),
    ),
    Case(
        "Microsoft side, wildcard covers one label only",
        from_microsoft(tls_peer_names=("x.y.um.example.net",)),
        Respond(403, "Forbidden"),
    ),
    Case(
        "Microsoft side, address outside the listed networks",
        from_microsoft(source_ip="127.0.0.9"),
        Respond(403, "Forbidden"),
    ),
    Case("Microsoft side, not TLS", from_microsoft(transport=Transport.TCP), Respond(403, "Forbidden")),
    Case(
        "in-dialog BYE from Microsoft over an unverified connection",
        in_dialog(Method.BYE, Side.MICROSOFT, tls_verified=False),
        Respond(403, "Forbidden"),
    ),
    Case(
        "ACK outside dialog",
        request(method=Method.ACK, has_sdp=False, sdp=""),
        Drop("ACK outside any dialog"),
    ),
    Case("REGISTER", request(method=Method.REGISTER, has_sdp=False, sdp=""), Respond(404, "Not Found")),
    Case(
        "in-dialog ACK not routed to us",
        in_dialog(Method.ACK, Side.CUCM, routed_to_us=False),
        Drop("ACK with no Route to this SBC"),
    ),
    Case(
        "in-dialog BYE not routed to us",
        in_dialog(Method.BYE, Side.CUCM, routed_to_us=False),
        Respond(404, "Not Here"),
    ),
    Case(
        "in-dialog re-INVITE not routed to us",
        in_dialog(Method.INVITE, Side.MICROSOFT, routed_to_us=False, has_sdp=True, sdp=MS_SDP),
        Respond(404, "Not Here"),
    ),
    Case(
        "BYE from CUCM",
        in_dialog(Method.BYE, Side.CUCM),
        RelayInDialog(
            media=BYE_DELETE,
            destination="sip:127.0.0.3:5061;transport=tls",
            advertise=(SBC_FQDN, 5061),
            edits=HIDE_REQUEST,
            stash=STASH,
            tls_server_id=MS_FQDN,
        ),
    ),
    Case(
        "BYE from CUCM to an unpinned host",
        in_dialog(Method.BYE, Side.CUCM, ruri_host="sip.other.example.net"),
        RelayInDialog(
            media=BYE_DELETE, destination=None, advertise=(SBC_FQDN, 5061), edits=HIDE_REQUEST, stash=STASH
        ),
    ),
    Case(
        "BYE from Microsoft",
        in_dialog(Method.BYE, Side.MICROSOFT),
        RelayInDialog(BYE_DELETE, None, None),
    ),
    Case(
        "re-INVITE from CUCM",
        in_dialog(Method.INVITE, Side.CUCM, has_sdp=True, sdp=CUCM_SDP),
        RelayInDialog(
            media=Media(MediaAction.OFFER, flag_string(DEFAULT_OFFER_TO_MICROSOFT), CUCM_SDP_ANON),
            destination="sip:127.0.0.3:5061;transport=tls",
            advertise=(SBC_FQDN, 5061),
            edits=HIDE_REQUEST,
            stash=STASH,
            tls_server_id=MS_FQDN,
        ),
    ),
    Case(
        "re-INVITE from Microsoft",
        in_dialog(Method.INVITE, Side.MICROSOFT, has_sdp=True, sdp=MS_SDP),
        RelayInDialog(
            media=Media(MediaAction.OFFER, flag_string(OFFER_TO_CUCM), MS_SDP_STRIPPED),
            destination=None,
            advertise=None,
        ),
    ),
    Case(
        "UPDATE with SDP from Microsoft",
        in_dialog(Method.UPDATE, Side.MICROSOFT, has_sdp=True, sdp=MS_SDP),
        RelayInDialog(
            Media(MediaAction.OFFER, flag_string(OFFER_TO_CUCM), MS_SDP_STRIPPED),
            None,
            None,
        ),
    ),
    Case(
        "re-INVITE without SDP from Microsoft",
        in_dialog(Method.INVITE, Side.MICROSOFT),
        RelayInDialog(media=None, destination=None, advertise=None, late_offer=True),
    ),
    Case(
        "ACK with SDP from CUCM (answer to a delayed-offer re-INVITE)",
        in_dialog(Method.ACK, Side.CUCM, has_sdp=True, sdp=CUCM_SDP),
        RelayInDialog(
            Media(MediaAction.ANSWER, flag_string(DEFAULT_ANSWER_TO_MICROSOFT), CUCM_SDP_ANON),
            "sip:127.0.0.3:5061;transport=tls",
            (SBC_FQDN, 5061),
            edits=HIDE_REQUEST,
            stash="",  # nothing answers an ACK: CUCM's Via is not kept
            tls_server_id=MS_FQDN,
        ),
    ),
    Case(
        "INFO from Microsoft",
        in_dialog(Method.INFO, Side.MICROSOFT, has_sdp=False),
        RelayInDialog(media=None, destination=None, advertise=None),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(policy: Policy, case: Case) -> None:
    assert routing.decide(case.req, policy) == case.want


def test_reinvite_from_microsoft_hands_rtpengine_the_stripped_sdp(policy: Policy) -> None:
    decision = routing.decide(in_dialog(Method.INVITE, Side.MICROSOFT, has_sdp=True, sdp=MS_SDP), policy)
    assert isinstance(decision, RelayInDialog)
    assert decision.media is not None
    assert decision.media.sdp == MS_SDP_STRIPPED
    assert "c=IN IP4 127.0.0.25" not in decision.media.sdp
    flags = decision.media.flags.split(" ")
    assert "RTP/AVP" in flags
    assert "RTP/SAVP" not in flags


# --- replies ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyCase:
    name: str
    reply: Reply
    initial: bool
    want: ReplyAction


def ms_reply(status: int, method: Method = Method.INVITE, sdp: str = "") -> Reply:
    return Reply(status=status, cseq_method=method, side=Side.MICROSOFT, has_sdp=bool(sdp), sdp=sdp)


def cucm_reply(status: int, method: Method = Method.INVITE, sdp: str = "") -> Reply:
    return Reply(status=status, cseq_method=method, side=Side.CUCM, has_sdp=bool(sdp), sdp=sdp)


ANSWER_TO_CUCM = Media(MediaAction.ANSWER, flag_string(DEFAULT_ANSWER_TO_CUCM), MS_SDP_STRIPPED)
NOTHING = ReplyAction(None)

REPLY_CASES = [
    ReplyCase("200 with SDP from Microsoft", ms_reply(200, sdp=MS_SDP), True, ReplyAction(ANSWER_TO_CUCM)),
    # A provisional other than 100 from Microsoft ends the chance to fail over (MICROSOFT-NOTES §1.8).
    ReplyCase(
        "183 with SDP from Microsoft",
        ms_reply(183, sdp=MS_SDP),
        True,
        ReplyAction(ANSWER_TO_CUCM, provisional=True),
    ),
    ReplyCase("200 with SDP to a re-INVITE", ms_reply(200, sdp=MS_SDP), False, ReplyAction(ANSWER_TO_CUCM)),
    ReplyCase("100 Trying", ms_reply(100), True, NOTHING),
    ReplyCase("180 without SDP", ms_reply(180), True, ReplyAction(None, provisional=True)),
    ReplyCase("200 without SDP", ms_reply(200), True, NOTHING),
    # The failure route decides about a failed initial INVITE (it may fail over): nothing here.
    ReplyCase("486 to the initial INVITE", ms_reply(486), True, NOTHING),
    ReplyCase("488 to the initial INVITE", ms_reply(488, sdp=MS_SDP), True, NOTHING),
    # A refused re-INVITE leaves the call up: its media session must survive.
    ReplyCase("488 to a re-INVITE", ms_reply(488), False, NOTHING),
    ReplyCase("491 to a re-INVITE from CUCM", cucm_reply(491), False, ReplyAction(None, HIDE_REPLY)),
    ReplyCase("200 to BYE", ms_reply(200, Method.BYE), False, NOTHING),
    ReplyCase("200 to BYE from CUCM", cucm_reply(200, Method.BYE), False, ReplyAction(None, HIDE_REPLY)),
    ReplyCase("481 to BYE", ms_reply(481, Method.BYE), False, NOTHING),
    ReplyCase("200 to CANCEL", ms_reply(200, Method.CANCEL), True, NOTHING),
    ReplyCase("500 to UPDATE", ms_reply(500, Method.UPDATE), False, NOTHING),
    ReplyCase(
        "200 with SDP from CUCM (answer to a Microsoft re-INVITE)",
        cucm_reply(200, sdp=CUCM_SDP),
        False,
        ReplyAction(
            Media(MediaAction.ANSWER, flag_string(DEFAULT_ANSWER_TO_MICROSOFT), CUCM_SDP_ANON),
            HIDE_REPLY,
        ),
    ),
    ReplyCase(
        "180 without SDP from CUCM (a call Microsoft started)",
        cucm_reply(180),
        True,
        ReplyAction(None, HIDE_REPLY),
    ),
]


@pytest.mark.parametrize("case", REPLY_CASES, ids=[c.name for c in REPLY_CASES])
def test_on_reply(policy: Policy, case: ReplyCase) -> None:
    assert routing.on_reply(case.reply, policy, initial=case.initial) == case.want


def test_answer_sdp_keeps_crlf_line_endings(policy: Policy) -> None:
    action = routing.on_reply(ms_reply(200, sdp=MS_SDP), policy, initial=True)
    assert action.media is not None
    assert action.media.sdp == MS_SDP_STRIPPED
    assert action.media.sdp.endswith("\r\n")
    assert "\n" not in action.media.sdp.replace("\r\n", "")


def test_answer_sdp_with_lf_only_line_endings(policy: Policy) -> None:
    lf = MS_SDP.replace("\r\n", "\n")
    action = routing.on_reply(ms_reply(200, sdp=lf), policy, initial=True)
    assert action.media is not None
    assert action.media.sdp == MS_SDP_STRIPPED.replace("\r\n", "\n")


# --- the pure-core rule -----------------------------------------------------------------------------

FORBIDDEN_IMPORTS = {"KSR", "socket", "os", "time", "logging"}


def test_routing_is_pure() -> None:
    source = Path(routing.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found: the parse is wrong"
    assert not imported & FORBIDDEN_IMPORTS, f"routing.py imports {sorted(imported & FORBIDDEN_IMPORTS)}"
    # No dynamic imports either.
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    assert not names & {"__import__", "open", "print", "importlib"}


# --- a re-INVITE without SDP (CUCM's mid-call delayed offer) -----------------------------------------


def test_delayed_offer_reinvite_from_cucm_offers_in_the_200_and_answers_in_the_ack(policy: Policy) -> None:
    # CUCM re-INVITEs mid-call without SDP (delayed offer); Microsoft then offers in its 200 OK and
    # CUCM answers in the ACK. rtpengine must see offer (200) then answer (ACK): an answer with no
    # offer before it is applied to the wrong exchange.
    reinvite = routing.decide(in_dialog(Method.INVITE, Side.CUCM), policy)
    assert isinstance(reinvite, RelayInDialog)
    assert reinvite.late_offer  # the adapter arms the late-offer reply callback for it
    ok = routing.on_reply(ms_reply(200, sdp=MS_SDP), policy, initial=False, late_offer=reinvite.late_offer)
    ack = routing.decide(in_dialog(Method.ACK, Side.CUCM, has_sdp=True, sdp=CUCM_SDP), policy)
    assert isinstance(ack, RelayInDialog)
    steps = [m for m in (reinvite.media, ok.media, ack.media) if m is not None]
    assert [m.action for m in steps] == [MediaAction.OFFER, MediaAction.ANSWER]
    offer, answer = steps
    assert offer.flags == flag_string(OFFER_TO_CUCM)
    assert offer.sdp == MS_SDP_STRIPPED
    assert answer.flags == flag_string(DEFAULT_ANSWER_TO_MICROSOFT)


def test_numbers_are_translated_both_ways_for_teams(tmp_path: Path) -> None:
    numbers = """  numbers:
    user_phone: true
    to_microsoft:
      - {match: '(\\d{5})', replace: '+442079460\\1'}
    from_microsoft:
      - {match: '\\+442079460(\\d{5})', replace: '\\1'}
  x_ms_sbc: kemi-o365/Kamailio-5.6/0.1.0
  allow: [INVITE, ACK, CANCEL, BYE, OPTIONS, NOTIFY]
"""
    teams = lab_policy(
        tmp_path, {"  allowed_media: [audio]": "  allowed_media: [audio]\n" + numbers.rstrip("\n")}
    )
    out = routing.decide(request(ruri_user="87000", from_user="10048"), teams)
    assert isinstance(out, RelayToMicrosoft)
    assert out.request_uri == f"sip:+44207946087000@{MS_FQDN}:5061;transport=tls;user=phone"
    assert out.from_uri == f"sip:+44207946010048@{SBC_FQDN};user=phone"
    assert out.edits.remove[:2] == ("Replaces", "Allow")
    assert out.edits.add[:2] == (
        "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, NOTIFY",
        "X-MS-SBC: kemi-o365/Kamailio-5.6/0.1.0",
    )
    back = routing.decide(from_microsoft(ruri_user="+44207946010048"), teams)
    assert isinstance(back, RelayToCucm)
    assert back.request_uri == "sip:10048@127.0.0.4:5060;transport=tcp"
    # A number no rule matches passes unchanged.
    other = routing.decide(from_microsoft(ruri_user="+15550100"), teams)
    assert isinstance(other, RelayToCucm) and other.request_uri.startswith("sip:+15550100@")


TEAMS_MEDIA = "  codecs: [PCMU, G722, telephone-event]\n  hold: inactive"


def test_teams_offer_prunes_codecs_and_sends_hold_as_inactive(tmp_path: Path) -> None:
    teams = lab_policy(
        tmp_path,
        {"  allowed_media: [audio]": "  allowed_media: [audio]\n" + TEAMS_MEDIA},
    )
    hold = CUCM_SDP + "a=sendonly\r\n"
    out = routing.decide(in_dialog(Method.INVITE, Side.CUCM, has_sdp=True, sdp=hold), teams)
    assert isinstance(out, RelayInDialog) and out.media is not None
    flags = out.media.flags.split()
    assert flags[-5:] == [
        "codec-strip=all",
        "codec-except=PCMU",
        "codec-except=G722",
        "codec-except=telephone-event",
        "replace-zero-address",
    ]
    assert out.media.sdp is not None
    assert "a=inactive\r\n" in out.media.sdp and "a=sendonly" not in out.media.sdp
    # Exchange UM (the lab policy) keeps CUCM's direction and codecs.
    um = routing.decide(
        in_dialog(Method.INVITE, Side.CUCM, has_sdp=True, sdp=hold), lab_policy(tmp_path / "um")
    )
    assert isinstance(um, RelayInDialog) and um.media is not None
    assert um.media.sdp == anonymous_origin(hold) and "codec-strip=all" not in um.media.flags


@pytest.mark.parametrize(
    ("branch", "toward_microsoft", "fails_over"),
    [
        (FailedBranch(408, provisional_seen=False, canceled=False), True, True),  # no answer in time
        (FailedBranch(503, provisional_seen=False, canceled=False), True, True),
        (FailedBranch(504, provisional_seen=False, canceled=False), True, True),
        (FailedBranch(477, provisional_seen=False, canceled=False), True, True),  # TLS/TCP send failure
        (FailedBranch(603, provisional_seen=False, canceled=False), True, False),  # declined: never retry
        (FailedBranch(486, provisional_seen=False, canceled=False), True, False),
        (FailedBranch(503, provisional_seen=True, canceled=False), True, False),  # it had rung already
        (FailedBranch(487, provisional_seen=False, canceled=True), True, False),  # CUCM cancelled
        (FailedBranch(503, provisional_seen=False, canceled=False), False, False),  # toward CUCM
    ],
)
def test_failover_follows_microsofts_rules(
    policy: Policy, branch: FailedBranch, toward_microsoft: bool, fails_over: bool
) -> None:
    action = routing.on_failure(branch, policy, toward_microsoft=toward_microsoft)
    expected = Failover("tls:127.0.0.2:5061", SBC_FQDN, 5061, 1) if fails_over else GiveUp(DELETE)
    assert action == expected


@pytest.mark.parametrize(("status", "retry_after", "hold"), [(503, 30, 30), (503, None, 0), (504, 30, 0)])
def test_retry_after_on_503_pauses_that_proxy(
    policy: Policy, status: int, retry_after: int | None, hold: int
) -> None:
    branch = FailedBranch(status, provisional_seen=False, canceled=False, retry_after=retry_after)
    action = routing.on_failure(branch, policy, toward_microsoft=True)
    assert isinstance(action, Failover)
    assert action.hold_s == hold


def test_microsofts_own_sdp_extensions_do_not_reach_cucm(policy: Policy) -> None:
    extras = (
        "b=CT:10000000\r\na=x-ssrc-range:1-2\r\na=label:main-audio\r\n"
        "a=rtcp-fb:* x-message app\r\na=rtcp-rsize\r\n"
    )
    out = routing.decide(from_microsoft(sdp=MS_SDP + extras), policy)
    assert isinstance(out, RelayToCucm) and out.media is not None and out.media.sdp is not None
    assert out.media.sdp == MS_SDP_STRIPPED


@pytest.mark.parametrize(
    "via",
    [
        "SIP/2.0/TCP 203.0.113.9:5060;branch=z9hG4bK-1",  # not the address it came from
        "SIP/2.0/TCP 127.0.0.4:26012;branch=z9hG4bK-1;rport",  # Kamailio would add rport=
        "SIP/2.0/TCP 127.0.0.4;received=203.0.113.1;branch=z9hG4bK-1",
        "SIP/2.0/TCP cucm-pub.corp.example:5060;branch=z9hG4bK-1",  # a name, not an address
    ],
)
def test_a_via_kamailio_would_annotate_is_refused_not_leaked(policy: Policy, via: str) -> None:
    # Kamailio writes received=/rport= into the top Via as it forwards; that Via is the one the SBC
    # takes off toward Microsoft, so the annotation would land in the request as stray text.
    decision = routing.decide(request(headers=(("Via", via),)), policy)
    assert decision == routing.VIA_REFUSED
    assert (
        routing.decide(in_dialog(Method.BYE, Side.CUCM, headers=(("Via", via),)), policy)
        == routing.VIA_REFUSED
    )
