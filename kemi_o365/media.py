"""rtpengine flag sets for each leg, and SDP edits done before rtpengine sees a body.

Rule: pure data and pure functions; the adapter passes these strings to rtpengine unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

# rtpengine 10.5 offers every SDES suite unless told otherwise and has no `SDES-only-`
# (KAMAILIO-NOTES §4.2), so "only AES_CM_128_HMAC_SHA1_80" is spelled as "not the other eleven".
OTHER_SDES_SUITES = (
    "AEAD_AES_256_GCM",
    "AEAD_AES_128_GCM",
    "AES_256_CM_HMAC_SHA1_80",
    "AES_256_CM_HMAC_SHA1_32",
    "AES_192_CM_HMAC_SHA1_80",
    "AES_192_CM_HMAC_SHA1_32",
    "AES_CM_128_HMAC_SHA1_32",
    "F8_128_HMAC_SHA1_80",
    "F8_128_HMAC_SHA1_32",
    "NULL_HMAC_SHA1_80",
    "NULL_HMAC_SHA1_32",
)

# CUCM -> Microsoft. Seed 000: Microsoft answers 488 without SRTP, with rtcp-mux offered, or with
# any ICE attribute; DTLS=off because RTP/SAVP alone makes rtpengine add a=fingerprint/setup.
DEFAULT_OFFER_TO_MICROSOFT: tuple[str, ...] = (
    "ICE=remove",
    "DTLS=off",
    "RTP/SAVP",
    "rtcp-mux-demux",
    "replace-origin",
    "replace-session-connection",
    "strip-extmap",
    # Media only from the endpoint each side negotiated (rtpengine --endpoint-learning picks it,
    # preferring the SDP's address): a stranger's packets to the SBC's ports are dropped.
    "strict-source",
    "direction=internal",
    "direction=external",
    *(f"SDES-no-{suite}" for suite in OTHER_SDES_SUITES),
    # Seed 003: Microsoft answers 488 to a=crypto with UNAUTHENTICATED_SRTP. When CUCM already offers
    # SRTP, rtpengine 10.5 copies its session parameters; these make the offered ones plain SDES.
    "SDES-authenticated_srtp",
    "SDES-encrypted_srtp",
    "SDES-encrypted_srtcp",
)

# Microsoft -> CUCM: rtpengine remembers the offer's RTP/AVP and answers CUCM in plain RTP.
DEFAULT_ANSWER_TO_CUCM: tuple[str, ...] = (
    "ICE=remove",
    "replace-origin",
    "replace-session-connection",
    "strict-source",
)


# Microsoft -> CUCM offer (a re-INVITE Microsoft starts): plain RTP, nothing CUCM cannot parse.
DEFAULT_OFFER_TO_CUCM: tuple[str, ...] = (
    "ICE=remove",
    "DTLS=off",
    "RTP/AVP",
    "rtcp-mux-demux",
    "replace-origin",
    "replace-session-connection",
    "strip-extmap",
    "strict-source",
)

# CUCM's answer to a Microsoft offer: rtpengine keeps Microsoft's RTP/SAVP and crypto suite.
DEFAULT_ANSWER_TO_MICROSOFT: tuple[str, ...] = (
    "ICE=remove",
    "replace-origin",
    "replace-session-connection",
    "strict-source",
)


def disable_media(sdp: str, allowed: Iterable[str]) -> str:
    """Set the port of every m= line whose type is not allowed to 0 (RFC 3264 §8.2: stream disabled).

    The m= line and its attributes stay, so the answer still has one m= line per offered stream.
    """
    keep = set(allowed)
    eol = "\r\n" if "\r\n" in sdp else "\n"
    return eol.join(_disabled(line, keep) for line in sdp.split(eol))


def _disabled(line: str, keep: set[str]) -> str:
    if not line.startswith("m="):
        return line
    kind, _, rest = line[2:].partition(" ")
    port, _, tail = rest.partition(" ")
    return f"m={kind} 0 {tail}" if kind not in keep and port != "0" else line


def codec_flags(codecs: Iterable[str]) -> tuple[str, ...]:
    """rtpengine flags keeping only `codecs` in an offer (Kamailio's codec-strip / codec-except)."""
    kept = tuple(codecs)
    if not kept:
        return ()
    return ("codec-strip=all", *(f"codec-except={c}" for c in kept))


def hold_as_inactive(sdp: str) -> str:
    """Teams understands hold only as a=inactive (MICROSOFT-NOTES §1.5): turn sendonly/recvonly into it."""
    eol = "\r\n" if "\r\n" in sdp else "\n"
    lines = ["a=inactive" if ln in ("a=sendonly", "a=recvonly") else ln for ln in sdp.split(eol)]
    return eol.join(lines)


def flag_string(flags: Iterable[str]) -> str:
    """The space-separated form Kamailio's rtpengine module parses."""
    return " ".join(flags)


def strip_lines(sdp: str, prefixes: Iterable[str]) -> str:
    """Remove every SDP line starting with one of `prefixes`, keeping the body's line ending."""
    wanted = tuple(prefixes)
    if not wanted:
        return sdp
    eol = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(eol)
    kept = [ln for ln in lines if not ln.startswith(wanted)]
    return eol.join(kept)


def anonymous_origin(sdp: str) -> str:
    """o= with username "-" (RFC 4566 §5.2: no user ids): CUCM writes its product there
    ("CiscoSystemsCCM-SIP"); rtpengine's replace-origin rewrites only the address. The same every
    time, so the origin stays constant across the session as RFC 3264 §8 requires."""
    eol = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(eol)
    return eol.join("o=- " + ln.split(" ", 1)[1] if ln.startswith("o=") and " " in ln else ln for ln in lines)
