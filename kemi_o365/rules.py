"""What Microsoft rejects in an INVITE, and why: one table of rules, each with its source.

Rule: this is the only place these facts live. The lab's Microsoft peer enforces exactly these rules
(and names the failing one in a Warning header), `kemi-o365 preflight` checks a captured INVITE against
them, and the README's table is generated from them (a test keeps it in sync).

The Exchange UM rules come from the seed write-ups, found by trial and error against Exchange Online UM
(seed 000: clinta.github.io/diy-sbs-for-office-365-unified-messaging/; seed 003:
blog.kloud.com.au/2013/11/28/acme-packet-sbc-for-office-365-um-with-cucm/). The Teams Direct Routing
rules are only those where /work/shared/design/MICROSOFT-NOTES.md gives the response code; documented
requirements without a known response (delayed offer, E.164, SIPS URIs...) are left out on purpose,
so the peer never invents an answer Microsoft may not give.

Pure functions, no I/O: safe to import anywhere.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from kemi_o365.policy.model import Profile
from kemi_o365.sipmsg import SipMessage, uri_host, uri_of

__all__ = ["RULES", "InviteView", "Rule", "Violation", "evaluate", "markdown_table", "rules_for"]

_UM = frozenset({Profile.EXCHANGE_UM})
_TEAMS = frozenset({Profile.TEAMS_DIRECT_ROUTING})
_BOTH = frozenset({Profile.EXCHANGE_UM, Profile.TEAMS_DIRECT_ROUTING})

_SEED_000 = "seed 000_cbe866ecd25117ec.txt (clinta.github.io/diy-sbs-for-office-365-unified-messaging/)"
_SEED_003 = (
    "seed 003_3fc048349e5003f6.txt "
    "(blog.kloud.com.au/2013/11/28/acme-packet-sbc-for-office-365-um-with-cucm/)"
)

_SUITE = "AES_CM_128_HMAC_SHA1_80"
# RFC 4568 §6.3.x session parameters that switch off SRTP authentication or encryption.
_WEAKENING_PARAMS = ("UNAUTHENTICATED_SRTP", "UNENCRYPTED_SRTP")
# Every ICE attribute (RFC 8839 §5): a=ice-ufrag/-pwd/-options/-lite/-mismatch, candidates.
_ICE_PREFIXES = ("a=ice-", "a=candidate", "a=remote-candidates", "a=end-of-candidates")


@dataclass(frozen=True)
class InviteView:
    """An INVITE as Microsoft received it, with what Microsoft knew about its sender."""

    msg: SipMessage
    """The INVITE as Microsoft received it."""
    destination_host: str | None = None
    """The host the INVITE was addressed to (UM forwarding address / proxy FQDN); None: unknown."""
    tls_client_names: tuple[str, ...] | None = None
    """CN first ("" when the certificate has none), then the SAN DNS names; None: unknown (a file)."""
    expected_sbc_fqdn: str | None = None
    """The FQDN Microsoft has configured for this SBC (UM IP gateway address / paired SBC)."""


@dataclass(frozen=True)
class Rule:
    """One thing Microsoft checks, the answer it gives when the check fails, and who says so."""

    name: str
    """kebab-case, unique; what the peer's Warning header names."""
    profiles: frozenset[Profile]
    checks: str
    """One sentence: what it checks."""
    code: int
    """403 or 488."""
    reason: str
    """Microsoft's reason phrase."""
    source: str
    """Where the fact comes from (seed file, MICROSOFT-NOTES section, URL as given there)."""
    test: Callable[[InviteView], str | None]
    """None: passes or not applicable (an input is unknown); a string: why it fails, quoting the line."""


@dataclass(frozen=True)
class Violation:
    rule: Rule
    detail: str


# ----- SDP helpers ----------------------------------------------------------------------------


def _audio_section(msg: SipMessage) -> tuple[str, list[str]] | None:
    """The first m=audio line and the lines of its media section (up to the next m=)."""
    lines = msg.sdp_lines
    for i, line in enumerate(lines):
        if line.startswith("m=audio "):
            section: list[str] = []
            for rest in lines[i + 1 :]:
                if rest.startswith("m="):
                    break
                section.append(rest)
            return line, section
    return None


def _crypto_lines(msg: SipMessage) -> list[str]:
    return [ln for ln in msg.sdp_lines if ln.startswith("a=crypto:")]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _first_value(msg: SipMessage, header: str) -> str | None:
    """The first value of a header that may hold several comma-separated name-addrs."""
    value = msg.get(header)
    if not value:
        return None
    # Commas inside <> or quotes are not separators (RFC 3261 §7.3.1).
    depth, quoted = 0, False
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "<>":
            depth += 1 if ch == "<" else -1
        elif ch == "," and not quoted and depth == 0:
            return value[:i].strip()
    return value.strip()


def _name_covers(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4.3 matching as Teams does it: case-insensitive, a wildcard stands for one label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


# ----- the checks -----------------------------------------------------------------------------


def _certificate_subject_exact(view: InviteView) -> str | None:
    if view.tls_client_names is None or view.expected_sbc_fqdn is None:
        return None
    want = view.expected_sbc_fqdn
    if not view.tls_client_names:
        return f"no client certificate name was presented; expected subject CN exactly '{want}'"
    cn = view.tls_client_names[0]
    if cn == want:
        return None
    if not cn:
        return f"client certificate has no subject CN; expected exactly '{want}'"
    if cn.startswith("*."):
        return f"certificate subject CN '{cn}' is a wildcard; expected exactly '{want}'"
    if cn.lower() == want.lower():
        return f"certificate subject CN '{cn}' differs in case from '{want}' (compared case-sensitively)"
    return f"certificate subject CN '{cn}' is not '{want}'"


def _sbc_address_is_fqdn(view: InviteView) -> str | None:
    # Only the first Contact value counts, and Microsoft routes on the top Record-Route (NOTES §1.4).
    for header in ("Contact", "Record-Route"):
        value = _first_value(view.msg, header)
        if value is None:
            continue
        host = uri_host(uri_of(value))
        if _is_ip(host):
            return f"{header} host '{host}' is an IP address, not the SBC FQDN: '{header}: {value}'"
    return None


def _contact_is_paired_fqdn(view: InviteView) -> str | None:
    contact = _first_value(view.msg, "Contact")
    if view.expected_sbc_fqdn is None or contact is None:
        return None
    host = uri_host(uri_of(contact))
    if _is_ip(host) or host.lower() == view.expected_sbc_fqdn.lower():
        return None  # an IP is the rule above's finding; DNS names compare case-insensitively
    return (
        f"Contact host '{host}' is not the paired SBC FQDN '{view.expected_sbc_fqdn}': 'Contact: {contact}'"
    )


def _certificate_covers_contact(view: InviteView) -> str | None:
    contact = _first_value(view.msg, "Contact")
    if view.tls_client_names is None or contact is None:
        return None
    host = uri_host(uri_of(contact))
    if _is_ip(host):
        return None
    names = [n for n in view.tls_client_names if n]
    if any(_name_covers(n, host) for n in names):
        return None
    listed = ", ".join(f"'{n}'" for n in names) or "none"
    return f"Contact host '{host}' is not covered by the client certificate names ({listed})"


def _to_host_is_destination(view: InviteView) -> str | None:
    if view.destination_host is None:
        return None
    to = view.msg.get("To")
    host = uri_host(uri_of(to))
    # Host names compare case-insensitively (RFC 3261 §19.1.4).
    if host.lower() == view.destination_host.lower():
        return None
    return f"To host '{host}' is not the destination '{view.destination_host}': 'To: {to}'"


def _srtp_required(view: InviteView) -> str | None:
    if not view.msg.body.strip():
        return "the INVITE carries no SDP offer, so it offers no SRTP"
    audio = _audio_section(view.msg)
    if audio is None:
        return "the SDP offer has no m=audio line"
    mline, section = audio
    fields = mline.split()
    proto = fields[2] if len(fields) > 2 else ""
    if proto != "RTP/SAVP":
        return f"audio is offered as {proto or 'nothing'}, not RTP/SAVP: '{mline}'"
    if not any(ln.startswith("a=crypto:") for ln in section):
        return f"no a=crypto line under '{mline}'"
    return None


def _crypto_suite(view: InviteView) -> str | None:
    audio = _audio_section(view.msg)
    if audio is None:
        return None
    cryptos = [ln for ln in audio[1] if ln.startswith("a=crypto:")]
    if not cryptos:
        return None  # no SDES at all is srtp-required's finding
    if any(len(ln.split()) > 1 and ln.split()[1] == _SUITE for ln in cryptos):
        return None
    return f"no a=crypto line offers {_SUITE}: '{cryptos[0]}'"


def _no_weakened_srtp(view: InviteView) -> str | None:
    for line in _crypto_lines(view.msg):
        # a=crypto:<tag> <suite> <key-params> [<session-param> ...] (RFC 4568 §9.1)
        for param in line.split()[3:]:
            if param in _WEAKENING_PARAMS:
                return f"a=crypto carries {param}: '{line}'"
    return None


def _no_rtcp_mux(view: InviteView) -> str | None:
    for line in view.msg.sdp_lines:
        if line.startswith("a=rtcp-mux"):  # also a=rtcp-mux-only (RFC 8858)
            return f"rtcp-mux is offered: '{line}'"
    return None


def _no_ice(view: InviteView) -> str | None:
    for line in view.msg.sdp_lines:
        if line.startswith(_ICE_PREFIXES):
            return f"ICE attribute offered: '{line}'"
    return None


def _no_zero_connection_address(view: InviteView) -> str | None:
    for line in view.msg.sdp_lines:
        fields = line.split()
        if line.startswith("c=") and fields[-1].split("/")[0] == "0.0.0.0":
            return f"c= address 0.0.0.0 (RFC 2543 hold): '{line}'"
    return None


# ----- the table ------------------------------------------------------------------------------

# Order matters: the peer answers with the first violation. Identity (403) before media (488), as a
# server authenticates the sender before it reads the offer.
RULES: tuple[Rule, ...] = (
    Rule(
        name="certificate-subject-exact",
        profiles=_UM,
        checks=(
            "The subject CN of the SBC's TLS client certificate equals the SBC FQDN configured in the "
            "UM IP gateway exactly (case-sensitive); a wildcard certificate never matches."
        ),
        code=403,
        reason="Forbidden",
        source=(
            f"{_SEED_000} item 1; MICROSOFT-NOTES §1.9 (Exchange 2013 'Configuration notes for "
            "supported session border controllers', technet JJ673565: case-sensitive)"
        ),
        test=_certificate_subject_exact,
    ),
    Rule(
        name="sbc-address-is-fqdn",
        profiles=_TEAMS,
        checks="The first Contact and the top Record-Route name the SBC by FQDN, not by IP address.",
        code=403,
        reason="Forbidden",
        source=(
            "MICROSOFT-NOTES §1.3 (direct-routing-protocols-sip.md 'Contact header'), §1.4 "
            "('Contact and Record-Route headers considerations'), §4"
        ),
        test=_sbc_address_is_fqdn,
    ),
    Rule(
        name="contact-is-paired-sbc-fqdn",
        profiles=_TEAMS,
        checks="The host of the first Contact is the FQDN the SBC was paired with (case-insensitive).",
        code=403,
        reason="Forbidden",
        source=(
            "MICROSOFT-NOTES §1.4 (direct-routing-protocols-sip.md 'Processing the incoming request'), "
            "§4 (MS 'SIP response code 403': 510532 'No trunk config was found')"
        ),
        test=_contact_is_paired_fqdn,
    ),
    Rule(
        name="certificate-covers-contact-fqdn",
        profiles=_TEAMS,
        checks=(
            "The Contact FQDN matches the client certificate's CN or a SAN DNS name "
            "(case-insensitive; a wildcard covers exactly one label)."
        ),
        code=403,
        reason="Forbidden",
        source=(
            "MICROSOFT-NOTES §1.2 (direct-routing-protocols-sip.md steps 1-3; direct-routing-plan.md "
            "'Public trusted certificate'), §4"
        ),
        test=_certificate_covers_contact,
    ),
    Rule(
        name="to-host-is-destination",
        profiles=_UM,
        checks="The host of the To URI equals the host the INVITE was sent to (the UM forwarding address).",
        code=488,
        reason="Not Acceptable Here",
        source=f"{_SEED_000} item 2; MICROSOFT-NOTES §1.9",
        test=_to_host_is_destination,
    ),
    Rule(
        name="srtp-required",
        profiles=_BOTH,
        checks="The INVITE offers SDP whose first m=audio line is RTP/SAVP with at least one a=crypto line.",
        code=488,
        reason="Not Acceptable Here",
        source=(
            f"{_SEED_000} item 3; MICROSOFT-NOTES §1.7 (direct-routing-protocols-media.md "
            "'SRTP requirements'; MS 'SIP response code 488': 531000 SrtpEncryptionRequired), §1.9"
        ),
        test=_srtp_required,
    ),
    Rule(
        name="crypto-suite-aes-cm-128-hmac-sha1-80",
        profiles=_UM,
        checks=f"An a=crypto line of the audio stream offers {_SUITE}.",
        code=488,
        reason="Not Acceptable Here",
        source=(
            f"{_SEED_003}: the working SDES profile's crypto-list and the successful call's a=crypto line; "
            "MICROSOFT-NOTES §1.9"
        ),
        test=_crypto_suite,
    ),
    Rule(
        name="srtp-authenticated",
        profiles=_UM,
        checks="No a=crypto line carries the UNAUTHENTICATED_SRTP or UNENCRYPTED_SRTP session parameter.",
        code=488,
        reason="Not Acceptable Here",
        source=f"{_SEED_003}: UNAUTHENTICATED_SRTP got '488 Not Acceptable Here'; MICROSOFT-NOTES §1.9",
        test=_no_weakened_srtp,
    ),
    Rule(
        name="no-rtcp-mux",
        profiles=_UM,
        checks="The SDP offer has no a=rtcp-mux attribute.",
        code=488,
        reason="Not Acceptable Here",
        source=f"{_SEED_000} item 4; MICROSOFT-NOTES §1.7, §1.9",
        test=_no_rtcp_mux,
    ),
    Rule(
        name="no-ice",
        profiles=_UM,
        checks=(
            "The SDP offer has no ICE attribute (a=ice-ufrag, a=ice-pwd, a=ice-options, a=ice-lite, "
            "a=candidate, a=remote-candidates)."
        ),
        code=488,
        reason="Not Acceptable Here",
        source=f"{_SEED_000} item 5; MICROSOFT-NOTES §1.9",
        test=_no_ice,
    ),
    Rule(
        name="no-zero-connection-address",
        profiles=_TEAMS,
        checks="No c= line holds 0.0.0.0 (RFC 2543 hold); Teams understands hold only as a=inactive.",
        code=488,
        reason="Not Acceptable Here",
        source=(
            "MICROSOFT-NOTES §1.5 (direct-routing-protocols.md 'Deviations from the RFCs'; "
            "MS 'SIP response code 488': 531052), §4"
        ),
        test=_no_zero_connection_address,
    ),
)

if len({r.name for r in RULES}) != len(RULES):  # pragma: no cover - a table edit mistake
    raise RuntimeError("rule names must be unique")


def rules_for(profile: Profile) -> tuple[Rule, ...]:
    """The rules of one profile, in table order."""
    return tuple(r for r in RULES if profile in r.profiles)


def evaluate(view: InviteView, profile: Profile) -> list[Violation]:
    """Every rule of `profile` that the INVITE breaks, in RULES order (Microsoft answers the first)."""
    out: list[Violation] = []
    for rule in rules_for(profile):
        detail = rule.test(view)
        if detail is not None:
            out.append(Violation(rule, detail))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(profile: Profile | None = None) -> str:
    """The README's table: one row per rule (of `profile`, or all), ending with a newline."""
    rules = RULES if profile is None else rules_for(profile)
    rows = [
        "| Rule | Profiles | Microsoft answers | What it checks | Source |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rule in rules:
        profiles = ", ".join(p.value for p in Profile if p in rule.profiles)
        rows.append(
            f"| `{rule.name}` | {profiles} | {rule.code} {_cell(rule.reason)} "
            f"| {_cell(rule.checks)} | {_cell(rule.source)} |"
        )
    return "\n".join(rows) + "\n"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kemi_o365.rules", description="Print the table of what Microsoft rejects."
    )
    parser.add_argument("--markdown", action="store_true", required=True, help="print the README table")
    parser.add_argument("--profile", choices=[p.value for p in Profile], help="only this profile's rules")
    args = parser.parse_args(argv)
    print(markdown_table(Profile(args.profile) if args.profile else None), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
