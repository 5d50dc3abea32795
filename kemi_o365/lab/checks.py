"""What a correct seed call looks like on each side of the SBC, as checks that name what is wrong.

Used by the demo's verdict and by the end-to-end tests, which also assert the same facts one by one.
"""

from __future__ import annotations

import base64
import binascii
import re

from kemi_o365.policy.model import Policy
from kemi_o365.sipmsg import SipMessage, uri_host, uri_of

ICE_ATTRIBUTES = ("a=ice-", "a=candidate", "a=remote-candidates", "a=end-of-candidates")
_CRYPTO = re.compile(r"^a=crypto:\d+ (\S+) inline:([A-Za-z0-9+/=]+)(\|\S+)?(.*)$")


def _lines(msg: SipMessage, prefix: str) -> list[str]:
    return [ln for ln in msg.sdp_lines if ln.startswith(prefix)]


def _sdp_addresses(msg: SipMessage) -> set[str]:
    found = set()
    for ln in msg.sdp_lines:
        if ln.startswith(("c=IN IP4 ", "o=")):
            found.add(ln.split()[-1])
    return found


def crypto_problems(msg: SipMessage) -> list[str]:
    """Exactly one SDES line, AES_CM_128_HMAC_SHA1_80, a 30-byte key, no session parameters."""
    lines = _lines(msg, "a=crypto:")
    if len(lines) != 1:
        return [f"expected exactly one a=crypto line, found {len(lines)}"]
    m = _CRYPTO.match(lines[0])
    if not m:
        return [f"a=crypto line not understood: {lines[0]!r}"]
    problems = []
    if m.group(1) != "AES_CM_128_HMAC_SHA1_80":
        problems.append(f"crypto suite {m.group(1)}, Microsoft wants AES_CM_128_HMAC_SHA1_80")
    try:
        key = base64.b64decode(m.group(2), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 30:
        problems.append(f"SRTP key+salt is {len(key)} bytes, expected 30")
    if "UNAUTHENTICATED_SRTP" in m.group(4) or "UNENCRYPTED_SRTP" in m.group(4):
        problems.append(f"crypto session parameters weaken SRTP: {m.group(4).strip()}")
    return problems


def invite_to_microsoft_problems(invite: SipMessage, policy: Policy, cucm_addresses: set[str]) -> list[str]:
    """What Microsoft would reject in the INVITE it received (seed 000's 403/488 causes)."""
    problems = []
    to_uri = uri_of(invite.get("To"))
    expected = policy.microsoft.to_uri
    if expected is not None and to_uri != expected:  # Exchange UM's forwarding address (seed 000)
        problems.append(f"To is {to_uri}, expected the forwarding address {expected}")
    audio = _lines(invite, "m=audio ")
    if len(audio) != 1 or audio[0].split()[2] != "RTP/SAVP":
        problems.append(f"expected one m=audio ... RTP/SAVP line, got {audio}")
    problems += crypto_problems(invite)
    if _lines(invite, "a=rtcp-mux"):
        problems.append("a=rtcp-mux offered (Microsoft answers 488)")
    ice = [ln for ln in invite.sdp_lines if ln.startswith(ICE_ATTRIBUTES)]
    if ice:
        problems.append(f"ICE attributes present (Microsoft answers 488): {ice[0]}")
    if _lines(invite, "a=fingerprint") or _lines(invite, "a=setup"):
        problems.append("DTLS attributes present")
    public = policy.sbc.external.advertised_address or policy.sbc.external.address
    addresses = _sdp_addresses(invite)
    if addresses != {public}:
        problems.append(f"SDP o=/c= addresses {sorted(addresses)}, expected only {public}")
    leaked = cucm_addresses & addresses
    if leaked:
        problems.append(f"CUCM address {sorted(leaked)} in the SDP sent to Microsoft")
    return problems


def answer_to_cucm_problems(answer: SipMessage, policy: Policy) -> list[str]:
    """The 200 OK CUCM gets must be plain RTP from the SBC's internal address."""
    problems = []
    audio = _lines(answer, "m=audio ")
    if len(audio) != 1 or audio[0].split()[2] != "RTP/AVP":
        problems.append(f"expected one m=audio ... RTP/AVP line, got {audio}")
    if _lines(answer, "a=crypto"):
        problems.append("a=crypto reached CUCM")
    addresses = {ln.split()[-1] for ln in _lines(answer, "c=IN IP4 ")}
    if addresses != {policy.sbc.internal.address}:
        problems.append(f"c= addresses {sorted(addresses)}, expected only {policy.sbc.internal.address}")
    for prefix in policy.microsoft.strip_answer_prefixes:
        if _lines(answer, prefix):
            problems.append(f"line {prefix!r} from Microsoft's answer reached CUCM")
    return problems


def request_host(msg: SipMessage) -> str:
    return uri_host(msg.ruri)
