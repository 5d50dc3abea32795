"""The SDP CUCM offers in the seed call (sipp-scenarios/seed-call/uac.xml, seed 000 before the SBC
rewrote it): plain RTP/AVP, PCMU and telephone-event, ptime 20. Shared by the fuzzer and the media
benchmark so both start from the same body SIPp sends."""

from __future__ import annotations


def cucm_offer(ip: str, port: int, session: int = 94213) -> str:
    lines = [
        "v=0",
        f"o=CiscoSystemsCCM-SIP {session} 1 IN IP4 {ip}",
        "s=SIP Call",
        f"c=IN IP4 {ip}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "a=ptime:20",
    ]
    return "\r\n".join(lines) + "\r\n"
