"""The rule table: each rule passes the seed's INVITE and fails a seed-like one with an exact reason."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kemi_o365.policy.model import Profile
from kemi_o365.rules import RULES, InviteView, Rule, evaluate, markdown_table, rules_for
from kemi_o365.sipmsg import SipMessage

REPO = Path(__file__).resolve().parents[2]
SBC_FQDN = "sbc-o365.example.com"
FORWARDING = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
CRYPTO = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:Rt5s9b1WdrBKIoygx4q3Tx8Zog/+Qt1/UTEmxr9x"
MLINE = "m=audio 31182 RTP/SAVP 0 101"
# Seed 000's offer as it reached Microsoft (addresses filled in with documentation ones).
SEED_SDP = [
    "v=0",
    "o=CiscoSystemsCCM-SIP 94213 1 IN IP4 203.0.113.5",
    "s=SIP Call",
    "c=IN IP4 203.0.113.5",
    "t=0 0",
    MLINE,
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    CRYPTO,
]
CONTACT = f"<sip:10048@{SBC_FQDN}:5061;transport=tls>"
TO = f"<sip:87000@{FORWARDING}>"


def seed_invite(
    *,
    sdp: list[str] | None = None,
    to: str = TO,
    contact: str = CONTACT,
    record_route: str | None = f"<sip:{SBC_FQDN}:5061;transport=tls;r2=on;lr>",
) -> SipMessage:
    headers = [("Record-Route", record_route)] if record_route else []
    headers += [
        ("To", to),
        ("Via", f"SIP/2.0/TLS {SBC_FQDN}:5061;branch=z9hG4bKf5ce.0"),
        ("From", '"10048 - Armstrong, Clint" <sip:10048@198.51.100.7>;tag=94213'),
        ("Call-ID", "c81d7600-5db10c85-9501-3402000a@198.51.100.7"),
        ("CSeq", "101 INVITE"),
        ("Contact", contact),
        ("Max-Forwards", "70"),
        ("Content-Type", "application/sdp"),
    ]
    body = "" if sdp == [] else "\r\n".join(SEED_SDP if sdp is None else sdp) + "\r\n"
    return SipMessage(f"INVITE sip:87000@{FORWARDING};transport=tls SIP/2.0", headers, body)


def seed_view(msg: SipMessage | None = None, **kw: object) -> InviteView:
    base = InviteView(
        msg=msg or seed_invite(),
        destination_host=FORWARDING,
        tls_client_names=(SBC_FQDN, SBC_FQDN),
        expected_sbc_fqdn=SBC_FQDN,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def rule(name: str) -> Rule:
    return next(r for r in RULES if r.name == name)


def sdp_with(*extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    return [ln for ln in SEED_SDP if ln not in drop] + list(extra)


def sdp_replace(old: str, new: str) -> list[str]:
    return [new if ln == old else ln for ln in SEED_SDP]


# (rule, failing view, exact detail)
FAILING: list[tuple[str, InviteView, str]] = [
    (
        "certificate-subject-exact",
        seed_view(tls_client_names=("*.example.com", "*.example.com")),
        f"certificate subject CN '*.example.com' is a wildcard; expected exactly '{SBC_FQDN}'",
    ),
    (
        "certificate-subject-exact",
        seed_view(tls_client_names=("SBC-O365.example.com",)),
        "certificate subject CN 'SBC-O365.example.com' differs in case from 'sbc-o365.example.com' "
        "(compared case-sensitively)",
    ),
    (
        "certificate-subject-exact",
        seed_view(tls_client_names=("other.example.com", SBC_FQDN)),
        f"certificate subject CN 'other.example.com' is not '{SBC_FQDN}'",
    ),
    (
        "certificate-subject-exact",
        seed_view(tls_client_names=("", SBC_FQDN)),
        f"client certificate has no subject CN; expected exactly '{SBC_FQDN}'",
    ),
    (
        "certificate-subject-exact",
        seed_view(tls_client_names=()),
        f"no client certificate name was presented; expected subject CN exactly '{SBC_FQDN}'",
    ),
    (
        "sbc-address-is-fqdn",
        seed_view(seed_invite(contact="<sip:10048@203.0.113.5:5061;transport=tls>")),
        "Contact host '203.0.113.5' is an IP address, not the SBC FQDN: "
        "'Contact: <sip:10048@203.0.113.5:5061;transport=tls>'",
    ),
    (
        "sbc-address-is-fqdn",
        seed_view(seed_invite(record_route="<sip:203.0.113.5:5061;transport=tls;lr>, <sip:x.example;lr>")),
        "Record-Route host '203.0.113.5' is an IP address, not the SBC FQDN: "
        "'Record-Route: <sip:203.0.113.5:5061;transport=tls;lr>'",
    ),
    (
        "contact-is-paired-sbc-fqdn",
        seed_view(seed_invite(contact="<sip:10048@sbc2.example.com:5061;transport=tls>")),
        f"Contact host 'sbc2.example.com' is not the paired SBC FQDN '{SBC_FQDN}': "
        "'Contact: <sip:10048@sbc2.example.com:5061;transport=tls>'",
    ),
    (
        "certificate-covers-contact-fqdn",
        seed_view(tls_client_names=("*.other.example", "a.b.example.com")),
        f"Contact host '{SBC_FQDN}' is not covered by the client certificate names "
        "('*.other.example', 'a.b.example.com')",
    ),
    (
        "to-host-is-destination",
        seed_view(seed_invite(to="<sip:87000@sbc-o365.example.com>")),
        f"To host 'sbc-o365.example.com' is not the destination '{FORWARDING}': "
        "'To: <sip:87000@sbc-o365.example.com>'",
    ),
    (
        "srtp-required",
        seed_view(seed_invite(sdp=sdp_replace(MLINE, "m=audio 31182 RTP/AVP 0 101"))),
        "audio is offered as RTP/AVP, not RTP/SAVP: 'm=audio 31182 RTP/AVP 0 101'",
    ),
    (
        "srtp-required",
        seed_view(seed_invite(sdp=sdp_with(drop=(CRYPTO,)))),
        f"no a=crypto line under '{MLINE}'",
    ),
    (
        "srtp-required",
        seed_view(seed_invite(sdp=[])),
        "the INVITE carries no SDP offer, so it offers no SRTP",
    ),
    (
        "srtp-required",
        seed_view(seed_invite(sdp=[ln for ln in SEED_SDP if not ln.startswith(("m=", "a="))])),
        "the SDP offer has no m=audio line",
    ),
    (
        "crypto-suite-aes-cm-128-hmac-sha1-80",
        seed_view(seed_invite(sdp=sdp_replace(CRYPTO, CRYPTO.replace("_80", "_32")))),
        "no a=crypto line offers AES_CM_128_HMAC_SHA1_80: "
        "'a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:Rt5s9b1WdrBKIoygx4q3Tx8Zog/+Qt1/UTEmxr9x'",
    ),
    (
        "srtp-authenticated",
        seed_view(seed_invite(sdp=sdp_replace(CRYPTO, CRYPTO + " UNAUTHENTICATED_SRTP"))),
        f"a=crypto carries UNAUTHENTICATED_SRTP: '{CRYPTO} UNAUTHENTICATED_SRTP'",
    ),
    (
        "srtp-authenticated",
        seed_view(seed_invite(sdp=sdp_replace(CRYPTO, CRYPTO + " UNENCRYPTED_SRTP"))),
        f"a=crypto carries UNENCRYPTED_SRTP: '{CRYPTO} UNENCRYPTED_SRTP'",
    ),
    (
        "no-rtcp-mux",
        seed_view(seed_invite(sdp=sdp_with("a=rtcp-mux"))),
        "rtcp-mux is offered: 'a=rtcp-mux'",
    ),
    *(
        (
            "no-ice",
            seed_view(seed_invite(sdp=sdp_with(line))),
            f"ICE attribute offered: '{line}'",
        )
        for line in (
            "a=ice-ufrag:8hhY",
            "a=ice-pwd:asd88fgpdd777uzjYhagZg",
            "a=ice-options:trickle",
            "a=ice-lite",
            "a=candidate:1 1 UDP 2130706431 203.0.113.5 31182 typ host",
            "a=remote-candidates:1 203.0.113.9 40000",
        )
    ),
    (
        "no-zero-connection-address",
        seed_view(seed_invite(sdp=sdp_replace("c=IN IP4 203.0.113.5", "c=IN IP4 0.0.0.0"))),
        "c= address 0.0.0.0 (RFC 2543 hold): 'c=IN IP4 0.0.0.0'",
    ),
]


def test_the_seed_invite_passes_every_rule() -> None:
    view = seed_view()
    for r in RULES:
        assert r.test(view) is None, r.name
    for profile in Profile:
        assert evaluate(view, profile) == []


@pytest.mark.parametrize(("name", "view", "detail"), FAILING, ids=[f[0] for f in FAILING])
def test_rule_fails_with_exact_detail(name: str, view: InviteView, detail: str) -> None:
    assert rule(name).test(view) == detail


def test_every_rule_has_a_failing_case() -> None:
    assert {f[0] for f in FAILING} == {r.name for r in RULES}


@pytest.mark.parametrize(
    ("name", "view"),
    [
        # Unknown inputs: a rule that needs them does not guess.
        ("certificate-subject-exact", seed_view(tls_client_names=None)),
        ("certificate-subject-exact", seed_view(tls_client_names=("*.example.com",), expected_sbc_fqdn=None)),
        ("to-host-is-destination", seed_view(seed_invite(to="<sip:87000@elsewhere>"), destination_host=None)),
        ("certificate-covers-contact-fqdn", seed_view(tls_client_names=None)),
        ("contact-is-paired-sbc-fqdn", seed_view(expected_sbc_fqdn=None)),
        # What a rule does not look at is another rule's business.
        ("crypto-suite-aes-cm-128-hmac-sha1-80", seed_view(seed_invite(sdp=sdp_with(drop=(CRYPTO,))))),
        ("crypto-suite-aes-cm-128-hmac-sha1-80", seed_view(seed_invite(sdp=[]))),
        (
            "contact-is-paired-sbc-fqdn",
            seed_view(seed_invite(contact="<sip:10048@203.0.113.5:5061;transport=tls>")),
        ),
        (
            "certificate-covers-contact-fqdn",
            seed_view(seed_invite(contact="<sip:10048@203.0.113.5:5061;transport=tls>")),
        ),
        # Allowed variants.
        ("to-host-is-destination", seed_view(seed_invite(to=f"<sip:87000@{FORWARDING.upper()}>"))),
        ("contact-is-paired-sbc-fqdn", seed_view(expected_sbc_fqdn=SBC_FQDN.upper())),
        ("certificate-covers-contact-fqdn", seed_view(tls_client_names=("x", "*.EXAMPLE.com"))),
        (
            "crypto-suite-aes-cm-128-hmac-sha1-80",
            seed_view(
                seed_invite(sdp=sdp_with(CRYPTO.replace("crypto:1 AES_CM_128_HMAC_SHA1_80", "crypto:2 X")))
            ),
        ),
        ("no-rtcp-mux", seed_view(seed_invite(sdp=sdp_with("a=rtcp:31183")))),
        ("sbc-address-is-fqdn", seed_view(seed_invite(record_route=None))),
    ],
)
def test_rule_passes_or_does_not_apply(name: str, view: InviteView) -> None:
    assert rule(name).test(view) is None


def test_names_are_unique_kebab_case_and_fields_are_filled() -> None:
    assert len({r.name for r in RULES}) == len(RULES)
    for r in RULES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", r.name), r.name
        assert r.profiles
        assert (r.code, r.reason) in ((403, "Forbidden"), (488, "Not Acceptable Here"))
        assert r.checks.endswith(".")
        assert r.source


def test_rules_per_profile() -> None:
    assert [r.name for r in rules_for(Profile.EXCHANGE_UM)] == [
        "certificate-subject-exact",
        "to-host-is-destination",
        "srtp-required",
        "crypto-suite-aes-cm-128-hmac-sha1-80",
        "srtp-authenticated",
        "no-rtcp-mux",
        "no-ice",
    ]
    assert [r.name for r in rules_for(Profile.TEAMS_DIRECT_ROUTING)] == [
        "sbc-address-is-fqdn",
        "contact-is-paired-sbc-fqdn",
        "certificate-covers-contact-fqdn",
        "srtp-required",
        "no-zero-connection-address",
    ]


def test_sources_are_precise() -> None:
    um = {r.name: r.source for r in rules_for(Profile.EXCHANGE_UM)}
    assert um["certificate-subject-exact"].startswith("seed 000_cbe866ecd25117ec.txt")
    assert "item 1" in um["certificate-subject-exact"]
    assert "§1.9" in um["certificate-subject-exact"]
    for name, item in (
        ("to-host-is-destination", 2),
        ("srtp-required", 3),
        ("no-rtcp-mux", 4),
        ("no-ice", 5),
    ):
        assert "seed 000_cbe866ecd25117ec.txt (clinta.github.io/" in um[name]
        assert f"item {item}" in um[name]
    for name in ("crypto-suite-aes-cm-128-hmac-sha1-80", "srtp-authenticated"):
        assert um[name].startswith("seed 003_3fc048349e5003f6.txt (blog.kloud.com.au/")
    for r in rules_for(Profile.TEAMS_DIRECT_ROUTING):
        assert "MICROSOFT-NOTES §" in r.source


def test_evaluate_keeps_table_order_and_profile() -> None:
    msg = seed_invite(
        to="<sip:87000@wrong.example>",
        sdp=sdp_with("a=rtcp-mux", "a=ice-ufrag:x", drop=(CRYPTO,)),
        contact="<sip:10048@203.0.113.5;transport=tls>",
    )
    view = seed_view(msg, tls_client_names=("*.example.com",))
    um = evaluate(view, Profile.EXCHANGE_UM)
    assert [v.rule.name for v in um] == [
        "certificate-subject-exact",
        "to-host-is-destination",
        "srtp-required",
        "no-rtcp-mux",
        "no-ice",
    ]
    assert um[0].rule.code == 403
    assert um[2].detail == f"no a=crypto line under '{MLINE}'"
    teams = evaluate(view, Profile.TEAMS_DIRECT_ROUTING)
    assert [v.rule.name for v in teams] == ["sbc-address-is-fqdn", "srtp-required"]


def test_markdown_table_has_one_row_per_rule() -> None:
    table = markdown_table()
    lines = table.splitlines()
    assert table.endswith("\n")
    assert lines[0] == "| Rule | Profiles | Microsoft answers | What it checks | Source |"
    assert lines[1] == "| --- | --- | --- | --- | --- |"
    assert len(lines) == 2 + len(RULES)
    for line, r in zip(lines[2:], RULES, strict=True):
        assert line.startswith(f"| `{r.name}` | ")
        assert f"| {r.code} {r.reason} |" in line
        assert line.count(" | ") == 4  # no stray cell separators from the text
    srtp = next(ln for ln in lines if "`srtp-required`" in ln)
    assert "| exchange-um, teams-direct-routing |" in srtp
    um = markdown_table(Profile.EXCHANGE_UM).splitlines()
    assert len(um) == 2 + len(rules_for(Profile.EXCHANGE_UM))


def test_readme_holds_exactly_the_generated_table() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- rules-table:start -->\n", "<!-- rules-table:end -->"
    assert readme.count(start) == 1
    assert readme.count(end) == 1
    between = readme.split(start, 1)[1].split(end, 1)[0]
    assert between == markdown_table(), "README table is stale: run python -m kemi_o365.rules --markdown"
    section = readme.index("## What Microsoft rejects, and why")
    assert section < readme.index(start) < readme.index("## What it does not do (yet)")


def test_module_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kemi_o365.rules", "--markdown"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=REPO,
    )
    assert done.stdout == markdown_table()
