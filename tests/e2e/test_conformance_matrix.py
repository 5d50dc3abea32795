"""The negative matrix: for every Exchange UM rule, Microsoft's peer refuses an INVITE that breaks it,
and the same kind of INVITE from CUCM arrives through the SBC fixed and is accepted.

The matrix is printed at the end of the test session (conftest: pytest_terminal_summary).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from kemi_o365.lab.certs import make_leaf
from kemi_o365.lab.demo import SCENARIOS, place_seed_call, wait_rtpengine_empty
from kemi_o365.lab.sipp import run_sipp
from kemi_o365.lab.variants import VARIANTS, Variant, variant_scenario
from kemi_o365.policy.model import Profile
from kemi_o365.rules import InviteView, evaluate, rules_for
from kemi_o365.sipmsg import SipMessage, StreamReader, parse, uri_host
from tests.e2e.conftest import MATRIX, Lab

pytestmark = pytest.mark.e2e

UM = Profile.EXCHANGE_UM
CERTIFICATE_RULE = "certificate-subject-exact"


def _edit_sdp(msg: SipMessage, edit: Callable[[list[str]], list[str]]) -> SipMessage:
    out = parse(msg.to_bytes())
    out.body = "\r\n".join(edit(out.sdp_lines)) + "\r\n"
    return out


def _add(*lines: str) -> Callable[[SipMessage], SipMessage]:
    return lambda m: _edit_sdp(m, lambda sdp: [*sdp, *lines])


def _plain_rtp(msg: SipMessage) -> SipMessage:
    def edit(sdp: list[str]) -> list[str]:
        return [ln.replace("RTP/SAVP", "RTP/AVP") for ln in sdp if not ln.startswith("a=crypto")]

    return _edit_sdp(msg, edit)


def _suite(msg: SipMessage) -> SipMessage:
    return _edit_sdp(
        msg, lambda sdp: [ln.replace("AES_CM_128_HMAC_SHA1_80", "AES_256_CM_HMAC_SHA1_80") for ln in sdp]
    )


def _unauthenticated(msg: SipMessage) -> SipMessage:
    return _edit_sdp(
        msg, lambda sdp: [f"{ln} UNAUTHENTICATED_SRTP" if ln.startswith("a=crypto") else ln for ln in sdp]
    )


def _to_other_host(msg: SipMessage) -> SipMessage:
    out = parse(msg.to_bytes())
    out.set("To", "<sip:87000@cucm-cluster.example.org>")
    return out


# How an INVITE the SBC would send is broken for each rule, to send straight to Microsoft's peer.
DEFECTS: dict[str, Callable[[SipMessage], SipMessage]] = {
    "to-host-is-destination": _to_other_host,
    "srtp-required": _plain_rtp,
    "crypto-suite-aes-cm-128-hmac-sha1-80": _suite,
    "srtp-authenticated": _unauthenticated,
    "no-rtcp-mux": _add("a=rtcp-mux"),
    "no-ice": _add(
        "a=ice-ufrag:F7gI",
        "a=ice-pwd:x9cml/YzichV2+XlhiMu8g",
        "a=candidate:1 1 UDP 1 127.0.0.4 6000 typ host",
    ),
}

# The CUCM INVITE variants that break each rule if relayed unchanged (the seed INVITE breaks SRTP).
THROUGH: dict[str, tuple[Variant | None, ...]] = {
    CERTIFICATE_RULE: (None,),
    "srtp-required": (None, *(v for v in VARIANTS if v.breaks == "srtp-required")),
    **{v.breaks: (v,) for v in VARIANTS if v.breaks != "srtp-required"},
}


def test_every_exchange_um_rule_is_in_the_matrix() -> None:
    names = {rule.name for rule in rules_for(UM)}
    assert names == {*DEFECTS, CERTIFICATE_RULE}
    assert names == set(THROUGH)


def _fresh_ids(msg: SipMessage) -> SipMessage:
    out = parse(msg.to_bytes())
    out.set("Call-ID", f"direct-{os.urandom(6).hex()}@127.0.0.2")
    out.remove("Record-Route")
    out.set("Via", f"SIP/2.0/TLS 127.0.0.2:5061;branch=z9hG4bK{os.urandom(8).hex()}")
    return out


def _send_direct(lab: Lab, invite: SipMessage, cert: Path, key: Path) -> SipMessage:
    """Send an INVITE straight to Microsoft's peer over mutual TLS, as an SBC would; the final answer."""
    proxy = lab.policy.microsoft.proxies[0]
    assert proxy.address is not None
    ctx = ssl.create_default_context(cafile=str(lab.root / "pki" / "ca.crt"))
    ctx.load_cert_chain(cert, key)
    reader = StreamReader()
    with (
        socket.create_connection(
            (proxy.address, lab.peer.port), timeout=5, source_address=("127.0.0.2", 0)
        ) as raw,
        ctx.wrap_socket(raw, server_hostname=proxy.fqdn) as sock,
    ):
        sock.sendall(invite.to_bytes())
        while True:
            data = sock.recv(65535)
            assert data, "the peer closed the connection without a final answer"
            finals = [m for m in reader.feed(data) if not m.is_request and m.status >= 200]
            if finals:
                return finals[0]


def _good_invite(lab: Lab) -> SipMessage:
    """What the SBC sends Microsoft for the seed call (accepted, so every rule passes)."""
    outcome = place_seed_call(lab.policy, lab.peer, lab.root / "sipp-seed")
    invite = outcome.invite_at_microsoft()
    assert outcome.sipp.ok and invite is not None
    return invite


@pytest.mark.parametrize("rule", sorted(DEFECTS))
def test_peer_refuses_an_invite_that_breaks_the_rule(lab: Lab, rule: str) -> None:
    broken = _fresh_ids(DEFECTS[rule](_good_invite(lab)))
    pki = lab.root / "pki"
    final = _send_direct(lab, broken, pki / "sbc.crt", pki / "sbc.key")
    expected = next(r for r in rules_for(UM) if r.name == rule)
    assert (final.status, final.start_line.split(" ", 2)[2]) == (expected.code, expected.reason)
    assert f'"{rule}: ' in final.get("Warning")
    MATRIX.direct[rule] = f"{final.status} {expected.reason}, Warning names {rule}"


def test_peer_refuses_a_wildcard_certificate_with_403(lab: Lab) -> None:
    pki = lab.root / "pki"
    cert, key = make_leaf(pki, (pki / "ca.crt", pki / "ca.key"), lab.policy.sbc.fqdn, wildcard=True)
    final = _send_direct(lab, _fresh_ids(_good_invite(lab)), cert, key)
    assert final.status == 403
    assert f'"{CERTIFICATE_RULE}: ' in final.get("Warning")
    MATRIX.direct[CERTIFICATE_RULE] = (
        f"403 Forbidden (wildcard certificate), Warning names {CERTIFICATE_RULE}"
    )


@pytest.mark.parametrize(
    ("rule", "variant"),
    [(rule, v) for rule, variants in sorted(THROUGH.items()) for v in variants],
    ids=lambda x: x if isinstance(x, str) else (x.name if x else "seed INVITE"),
)
def test_the_same_kind_of_invite_from_cucm_arrives_fixed(
    lab: Lab, rule: str, variant: Variant | None
) -> None:
    scenario = (
        variant_scenario(variant, lab.root / "scenarios") if variant else SCENARIOS / "seed-call" / "uac.xml"
    )
    before = len(lab.peer.received)
    result = run_sipp(
        scenario,
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp",
        timeout_s=15,
    )
    assert result.ok, result.describe()
    sent_by_cucm = next(m for m in result.sent() if m.is_request and m.method == "INVITE")
    at_ms = next(r for r in lab.peer.received[before:] if r.msg.is_request and r.msg.method == "INVITE")
    destination = uri_host(at_ms.msg.ruri)
    # Relayed unchanged, CUCM's INVITE would break the rule ...
    if rule != CERTIFICATE_RULE:
        unchanged = evaluate(InviteView(sent_by_cucm, destination_host=destination), UM)
        assert rule in {v.rule.name for v in unchanged}
    # ... through the SBC it breaks nothing, and Microsoft answered 200.
    names = (at_ms.conn.cert_cn or "", *at_ms.conn.san_dns)
    view = InviteView(at_ms.msg, destination, names, lab.policy.sbc.fqdn)
    assert evaluate(view, UM) == []
    assert not lab.peer.violations
    if variant is not None and variant.name.startswith("second m= line"):
        assert any(ln.startswith("m=video 0 ") for ln in at_ms.msg.sdp_lines)
    assert wait_rtpengine_empty(lab.policy) == []
    label = variant.name if variant else "the seed INVITE"
    MATRIX.through.setdefault(rule, []).append(f"{label}: 200 OK, 0 violations")
