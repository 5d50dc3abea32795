"""Topology hiding: what of CUCM's network a message toward Microsoft may still carry (nothing)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kemi_o365 import routing, topology
from kemi_o365.decision import HeaderEdits, RelayInDialog, RelayToMicrosoft
from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy, Transport
from kemi_o365.request import Method, Reply, Request, Side
from tests.helpers import lab_policy, lab_policy_text

SBC_FQDN = "sbc-o365.example.com"
MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
CUCM = "192.0.2.5"
CALL_ID = f"a1b2c3d4-1@{CUCM}"

# A CUCM INVITE as it arrives (seed 000 shape), with an internal address CUCM really uses.
CUCM_HEADERS = f"""INVITE sip:87000@pstn-o365.example.com SIP/2.0
Via: SIP/2.0/TCP {CUCM}:5060;branch=z9hG4bK1a2b3c
v: SIP/2.0/TCP 192.0.2.6:5060;branch=z9hG4bK99
From: "10048 - Armstrong, Clint" <sip:10048@{CUCM}>;tag=94213~3cc4
To: <sip:87000@pstn-o365.example.com>
i: {CALL_ID}
CSeq: 101 INVITE
m: <sip:10048@{CUCM}:5060;transport=tcp>;+u.sip!devicename.ccm.cisco.com="SEP0011"
User-Agent: Cisco-CUCM9.1
P-Asserted-Identity: "10048" <sip:10048@{CUCM}>
Remote-Party-ID: "10048" <sip:10048@{CUCM}>;party=calling;screen=yes
Call-Info: <urn:x-cisco-remotecc:callinfo>; security= NotAuthenticated,
 <sip:{CUCM}:5060>;method="NOTIFY;Event=telephone-event"
Cisco-Guid: 3357373952-0000065536-0000032693-0872546314
X-Cisco-Recording: <sip:rec@{CUCM}>
Diversion: <sip:10049@{CUCM}>;reason=unconditional
Max-Forwards: 70
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    # CUCM on an address of its own network, as in a real deployment.
    cucm = {"sources: [127.0.0.4/32]": "sources: [127.0.0.4/32, 192.0.2.0/24]"}
    return lab_policy(tmp_path_factory.mktemp("policy"), cucm)


def cucm_invite(**changes: object) -> Request:
    facts: dict[str, object] = {
        "method": Method.INVITE,
        "ruri_user": "87000",
        "ruri_host": "pstn-o365.example.com",
        "from_user": "10048",
        "source_ip": CUCM,
        "source_port": 5060,
        "transport": Transport.TCP,
        "side": Side.CUCM,
        "to_tag": False,
        "has_sdp": True,
        "sdp": "v=0\r\n",
        "max_forwards": 70,
        "call_id": CALL_ID,
        "headers": topology.parse_headers(CUCM_HEADERS.replace("\n", "\r\n")),
    }
    facts.update(changes)
    return Request(**facts)  # type: ignore[arg-type]


def applied(headers: tuple[tuple[str, str], ...], edits: HeaderEdits) -> list[tuple[str, str]]:
    """The headers as Kamailio sends them after the edits' lumps."""
    removed = {topology.canonical(n) for n in edits.remove}
    kept = [(n, v) for n, v in headers if topology.canonical(n) not in removed]
    lines = [*edits.insert, *(f"{n}: {v}" for n, v in kept), *edits.add]
    return [(ln.split(":", 1)[0], ln.split(":", 1)[1].strip()) for ln in lines]


def leaks(headers: list[tuple[str, str]]) -> list[str]:
    internal = re.compile(r"192\.0\.2\.\d+|cisco|devicename|SEP0011", re.I)
    return [f"{n}: {v}" for n, v in headers if internal.search(f"{n}: {v}")]


def test_an_initial_invite_carries_nothing_of_cucm(policy: Policy) -> None:
    decision = routing.decide(cucm_invite(), policy)
    assert isinstance(decision, RelayToMicrosoft)
    out = applied(cucm_invite().headers, decision.edits)
    # The SBC's own Via, From and To are written by tm/uac, not by these edits; From's host is the FQDN.
    out = [(n, v) for n, v in out if n.lower() not in ("from", "to")]
    assert leaks(out) == []
    assert decision.from_uri == f"sip:10048@{SBC_FQDN}"
    assert ("P-Asserted-Identity", f'"10048" <sip:10048@{SBC_FQDN}>') in out
    assert ("Diversion", f"<sip:10049@{SBC_FQDN}>;reason=unconditional") in out
    assert ("User-Agent", "kemi-o365") in out
    # Both of CUCM's Vias (one compact) wait for the replies, in order.
    assert decision.stash == (
        f"Via: SIP/2.0/TCP {CUCM}:5060;branch=z9hG4bK1a2b3c\r\n"
        "Via: SIP/2.0/TCP 192.0.2.6:5060;branch=z9hG4bK99\r\n"
    )


def test_call_id_and_contact_are_masked_and_come_back(policy: Policy) -> None:
    decision = routing.decide(cucm_invite(), policy)
    assert isinstance(decision, RelayToMicrosoft)
    (call_id,) = [line for line in decision.edits.add if line.startswith("Call-ID: ")]
    token = call_id.removeprefix("Call-ID: ")
    masker = topology.masker(policy)
    assert masker.unmask(token) == CALL_ID
    (contact,) = [line for line in decision.edits.add if line.startswith("Contact: ")]
    m = re.fullmatch(rf"Contact: <sip:{SBC_FQDN}:5061;transport=tls;kemi=(kx1-[A-Za-z0-9_-]+)>", contact)
    assert m, contact
    assert masker.unmask(m.group(1)) == f"sip:10048@{CUCM}:5060;transport=tcp"
    # Deterministic: every message of the dialog carries the same token.
    assert masker.mask(CALL_ID) == token


def test_a_token_not_made_by_this_sbc_is_not_unmasked(policy: Policy, tmp_path: Path) -> None:
    token = topology.masker(policy).mask(CALL_ID)
    assert topology.masker(policy).unmask(token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None
    assert topology.masker(policy).unmask("1-3487@127.0.0.4") is None  # Microsoft's own Call-ID
    # Another SBC (another private key, so another masking key) cannot read it.
    assert topology.Masker(bytes(64)).unmask(token) is None


def test_replies_toward_cucm_get_their_vias_call_id_and_internal_route_back(policy: Policy) -> None:
    masker = topology.masker(policy)
    stash = f"Via: SIP/2.0/TCP {CUCM}:5060;branch=z9hG4bK1a2b3c\r\n"
    rr = f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;mcid;ftag=94213;vst=AAA;lr>"
    reply = Reply(
        status=180,
        cseq_method=Method.INVITE,
        side=Side.MICROSOFT,
        has_sdp=False,
        call_id=masker.mask(CALL_ID),
        headers=(("Record-Route", "<sip:sip-du.pstnhub.example.net;lr>"), ("Record-Route", rr)),
        stash=stash,
    )
    action = routing.on_reply(reply, policy, initial=True)
    assert action.edits.insert == (f"Via: SIP/2.0/TCP {CUCM}:5060;branch=z9hG4bK1a2b3c",)
    assert action.edits.remove == ("Call-ID",)
    assert action.edits.add == (
        f"Call-ID: {CALL_ID}",
        # Appended last: the route set CUCM records is Microsoft's, the SBC's external, then internal.
        "Record-Route: <sip:127.0.0.1:5060;transport=tcp;r2=on;mcid;ftag=94213;vst=AAA;lr>",
    )


def test_replies_from_cucm_to_microsoft_lose_the_internal_route_and_cucm_headers(policy: Policy) -> None:
    headers = (
        ("Record-Route", "<sip:127.0.0.1:5060;transport=tcp;r2=on;lr>"),
        ("Record-Route", f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;lr>, <sip:ms.example.net;lr>"),
        ("Contact", f"<sip:10048@{CUCM}:5060;transport=tcp>"),
        ("Server", "Cisco-CUCM9.1"),
        ("Remote-Party-ID", f"<sip:10048@{CUCM}>"),
    )
    reply = Reply(
        200, Method.INVITE, Side.CUCM, has_sdp=False, call_id="ms-call@example.net", headers=headers
    )
    action = routing.on_reply(reply, policy, initial=True)
    out = applied(headers, action.edits)
    assert leaks(out) == []
    routes = [v for n, v in out if n == "Record-Route"]
    assert routes == [f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;lr>", "<sip:ms.example.net;lr>"]
    assert ("Server", "kemi-o365") in out
    assert "Call-ID" not in action.edits.remove  # Microsoft's own Call-ID stays as it is


def test_in_dialog_request_from_microsoft_gets_cucm_call_id_and_replies_are_masked_again(
    policy: Policy,
) -> None:
    masker = topology.masker(policy)
    bye = cucm_invite(
        method=Method.BYE,
        side=Side.MICROSOFT,
        transport=Transport.TLS,
        source_ip="127.0.0.3",
        to_tag=True,
        routed_to_us=True,
        has_sdp=False,
        tls_verified=True,
        tls_peer_names=(MS_FQDN,),
        call_id=masker.mask(CALL_ID),
        headers=(),
    )
    decision = routing.decide(bye, policy)
    assert isinstance(decision, RelayInDialog)
    assert decision.edits == HeaderEdits(("Call-ID",), (f"Call-ID: {CALL_ID}",))
    assert decision.mask_replies
    # rtpengine knows the call by CUCM's Call-ID.
    assert decision.media is not None and f"call-id={CALL_ID}" in decision.media.flags
    ok = Reply(200, Method.BYE, Side.CUCM, has_sdp=False, call_id=CALL_ID, mask_call_id=True)
    assert f"Call-ID: {masker.mask(CALL_ID)}" in routing.on_reply(ok, policy, initial=False).edits.add


def test_in_dialog_request_from_cucm_masks_only_in_dialogs_cucm_started(policy: Policy) -> None:
    bye = cucm_invite(
        method=Method.BYE,
        to_tag=True,
        routed_to_us=True,
        ruri_host=MS_FQDN,
        has_sdp=False,
        masked_dialog=True,
    )
    started_by_cucm = routing.decide(bye, policy)
    assert isinstance(started_by_cucm, RelayInDialog)
    assert "Call-ID" in started_by_cucm.edits.remove
    # From is uac's to restore (its Record-Route parameter); Via and CUCM's own headers go here.
    assert leaks(applied(bye.headers, started_by_cucm.edits)) == [
        f'From: "10048 - Armstrong, Clint" <sip:10048@{CUCM}>;tag=94213~3cc4'
    ]
    # In a dialog Microsoft started the Call-ID is Microsoft's own: it goes back unchanged.
    theirs = dataclasses.replace(bye, masked_dialog=False, call_id="ms-1@example.net")
    started_by_microsoft = routing.decide(theirs, policy)
    assert isinstance(started_by_microsoft, RelayInDialog)
    assert "Call-ID" not in started_by_microsoft.edits.remove
    assert "Via" in started_by_microsoft.edits.remove


def test_header_values_parse_with_folding_and_compact_names() -> None:
    parsed = topology.parse_headers(CUCM_HEADERS.replace("\n", "\r\n"))
    assert topology.values(parsed, "Call-ID") == [CALL_ID]
    assert len(topology.values(parsed, "via")) == 2
    (info,) = topology.values(parsed, "Call-Info")
    assert info.endswith('<sip:192.0.2.5:5060>;method="NOTIFY;Event=telephone-event"')


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<sip:10048@192.0.2.5:5060;user=phone>", "<sip:10048@sbc.example>"[:-1] + ";user=phone>"),
        ('"A" <sips:192.0.2.5>', '"A" <sips:sbc.example>'),
        ("<tel:+4420794601>", "<tel:+4420794601>"),
        ("<sip:a@[2001:db8::1]:5060>, <sip:b@203.0.113.1>", "<sip:a@sbc.example>, <sip:b@sbc.example>"),
    ],
)
def test_rewrite_host(value: str, expected: str) -> None:
    assert topology.rewrite_host(value, "sbc.example") == expected


def test_policy_names_the_headers_to_drop_and_rewrite(tmp_path: Path) -> None:
    custom = lab_policy(
        tmp_path,
        {
            "kamailio:\n": "topology_hiding:\n  drop_headers: [X-Site-*, Call-Info]\n"
            "  rewrite_host: [P-Asserted-Identity]\n  user_agent: null\nkamailio:\n"
        },
    )
    th = custom.topology
    assert th.drop.fullmatch("x-site-id") and th.drop.fullmatch("call-info")
    assert not th.drop.fullmatch("remote-party-id")
    assert th.rewrite_host == frozenset({"p-asserted-identity"})
    assert th.user_agent is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("  drop_headers: [Via]\n", "topology_hiding.drop_headers[0]: 'via' is part of the SIP dialog"),
        ("  drop_headers: [Call*]\n", "topology_hiding.drop_headers[0]: 'call*' is part of the SIP dialog"),
        ("  drop_headers: ['bad header']\n", "topology_hiding.drop_headers[0]: expected a header name"),
        (
            "  drop_headers: [Diversion]\n  rewrite_host: [Diversion]\n",
            "topology_hiding.rewrite_host: 'diversion' is also in drop_headers",
        ),
        ("  colour: blue\n", "topology_hiding.colour: unknown key"),
    ],
)
def test_bad_topology_section_names_line_and_key(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        lab_policy(tmp_path, {"kamailio:\n": "topology_hiding:\n" + section + "kamailio:\n"})
    text = str(err.value)
    assert message in text, text
    assert re.search(r"\.yaml:\d+: topology_hiding", text), text


def test_masking_key_follows_the_private_key(tmp_path: Path) -> None:
    first = lab_policy(tmp_path)
    (tmp_path / "policy.yaml").write_text(lab_policy_text(tmp_path / "pki"))
    again = load_policy(tmp_path / "policy.yaml")
    assert again.topology.key == first.topology.key  # every worker and every restart agree
    (tmp_path / "pki" / "sbc.key").write_text("a renewed key\n")
    renewed = load_policy(tmp_path / "policy.yaml")
    assert renewed.topology.key != first.topology.key


def test_header_block_reads_the_same_with_and_without_folded_lines() -> None:
    # The start line is skipped, blanks around names and values go, a folded line joins its header.
    block = (
        "INVITE sip:87000@ms.example.com SIP/2.0\r\n"
        "Via : SIP/2.0/TCP 127.0.0.4:5060;branch=z9hG4bK1  \r\n"
        "v:SIP/2.0/TCP 127.0.0.5\r\n"
        "Max-Forwards:70\r\n"
        "Subject:\r\n"
        "Call-ID: a@b\r\n"
    )
    plain = topology.parse_headers(block)
    assert plain == (
        ("Via", "SIP/2.0/TCP 127.0.0.4:5060;branch=z9hG4bK1"),
        ("v", "SIP/2.0/TCP 127.0.0.5"),
        ("Max-Forwards", "70"),
        ("Subject", ""),
        ("Call-ID", "a@b"),
    )
    folded = topology.parse_headers(block + "Call-Info: <sip:x>;\r\n  purpose=icon\r\n")
    assert folded == (*plain, ("Call-Info", "<sip:x>; purpose=icon"))


@pytest.mark.parametrize(
    ("route", "masked"),
    [
        ("<sip:127.0.0.1:5060;transport=tcp;r2=on;lr;ftag=1;mcid>,<sip:sbc.example.com;lr;mcid>", True),
        ("<sip:127.0.0.1:5060;lr;MCID=1>", True),
        ("<sip:127.0.0.1:5060;lr;ftag=1>", False),  # a dialog Microsoft started
        ("<sip:127.0.0.1:5060;lr;mcidx>", False),
        ("<sip:127.0.0.1:5060;lr>,<sip:sbc.example.com;lr;mcid>", False),  # only the first entry counts
        (None, False),
    ],
)
def test_route_marks_a_masked_dialog(route: str | None, masked: bool) -> None:
    block = "BYE sip:x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.4\r\n" + (f"Route: {route}\r\n" if route else "")
    assert topology.route_has_param(topology.parse_headers(block), "mcid") is masked
