"""CUCM INVITE variants that Microsoft would reject if they reached it unchanged.

Each variant is the seed-call SIPp scenario with its INVITE edited (SDP lines added or replaced, a
header changed), written next to the run, so one scenario file stays the source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SEED_SCENARIO = Path(__file__).resolve().parent.parent.parent / "sipp-scenarios" / "seed-call" / "uac.xml"

# The CUCM SDP lines of the seed INVITE, as they appear in the scenario (indented in the CDATA).
_AUDIO_LINE = "m=audio [rtp_port] RTP/AVP 0 101"
_LAST_SDP_LINE = "a=ptime:20"
_SEED_003_KEY = "0IYvn6An/4ghZuEH3WqmRoCGB3an5wJ1s5oqQwcA"
_AES256_KEY = "d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSojKmIqLCpUMzNSeX1VWHcgQg=="


@dataclass(frozen=True)
class Variant:
    """One way CUCM's INVITE can differ from what Microsoft accepts."""

    name: str
    breaks: str
    """The rule (kemi_o365.rules name) the unchanged INVITE would break at Microsoft."""
    add_sdp: tuple[str, ...] = ()
    """SDP lines appended after the audio attributes."""
    replace: dict[str, str] = field(default_factory=dict)
    """Exact text replacements in the scenario (To: also in its ACK and BYE, as CUCM would)."""


VARIANTS: tuple[Variant, ...] = (
    Variant("rtcp-mux offered", "no-rtcp-mux", add_sdp=("a=rtcp-mux",)),
    Variant(
        "ICE attributes offered",
        "no-ice",
        add_sdp=(
            "a=ice-ufrag:F7gI",
            "a=ice-pwd:x9cml/YzichV2+XlhiMu8g",
            # SIPp expands [media_port] only on m= lines.
            "a=candidate:1 1 UDP 2130706431 [media_ip] 6000 typ host",
        ),
    ),
    Variant(
        "SRTP with UNAUTHENTICATED_SRTP",
        "srtp-authenticated",
        add_sdp=(
            # Seed 003's rejected line: an Acme Packet offering SRTP without authentication.
            f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{_SEED_003_KEY} UNAUTHENTICATED_SRTP",
        ),
        replace={_AUDIO_LINE: "m=audio [rtp_port] RTP/SAVP 0 101"},
    ),
    Variant(
        "SRTP with another crypto suite",
        "crypto-suite-aes-cm-128-hmac-sha1-80",
        # AES-256 needs a 46-byte key+salt (RFC 6188): 64 base64 characters.
        add_sdp=(f"a=crypto:1 AES_256_CM_HMAC_SHA1_80 inline:{_AES256_KEY}",),
        replace={_AUDIO_LINE: "m=audio [rtp_port] RTP/SAVP 0 101"},
    ),
    Variant(
        "second m= line (video)",
        "srtp-required",
        add_sdp=("m=video [media_port] RTP/AVP 97", "a=rtpmap:97 H264/90000"),
    ),
    Variant(
        "To header with another host",
        "to-host-is-destination",
        replace={"To: <sip:[service]@[ruri_host]>": "To: <sip:[service]@cucm-cluster.example.org>"},
    ),
)


def variant_scenario(variant: Variant, directory: Path) -> Path:
    """Write the seed scenario with `variant` applied; return its path."""
    text = SEED_SCENARIO.read_text()
    for old, new in variant.replace.items():
        if old not in text:
            raise ValueError(f"variant {variant.name!r}: {old!r} not in the seed scenario")
        text = text.replace(old, new)
    head, sep, rest = text.partition("</send>")
    indent = " " * 6
    if variant.add_sdp:
        anchor = indent + _LAST_SDP_LINE
        if anchor not in head:
            raise ValueError("the seed INVITE's SDP no longer ends with a=ptime:20")
        extra = "".join(f"\n{indent}{line}" for line in variant.add_sdp)
        head = head.replace(anchor, anchor + extra, 1)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{variant.name.replace(' ', '-').replace('=', '')}.xml"
    path.write_text(head + sep + rest)
    return path
