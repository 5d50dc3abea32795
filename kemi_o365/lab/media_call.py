"""A lab call with real media both ways: CUCM sends RTP, Microsoft's peer sends SRTP, each checks
what it receives (authentication, loss, tone, DTMF, RTCP/SRTCP).

CUCM's media comes from a MediaEndpoint on CUCM's address whose port SIPp announces ([rtp_port]);
the Microsoft peer's comes from its own per-call socket, keyed with its a=crypto, decrypting with the
key the SBC offered. In the lab, the SBC's advertised public address is mapped back to its external
listener address, as the site's NAT would (nothing is ever sent to the public address).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kemi_o365.lab.demo import SCENARIOS, CallOutcome, call_outcome, cucm_address
from kemi_o365.lab.media import MediaEndpoint, StreamReport, direction_problems, format_report
from kemi_o365.lab.ms_peer import Call, MicrosoftPeer
from kemi_o365.lab.sipp import SippProcess, free_port, parse_message_trace, start_sipp
from kemi_o365.policy.model import Policy
from kemi_o365.sipmsg import SipMessage
from kemi_o365.topology import masker

CUCM_TONE_HZ = 1000.0
MICROSOFT_TONE_HZ = 1800.0


@dataclass(frozen=True)
class MediaPlan:
    """How long each side talks, and the DTMF digits each sends (seconds into the call, digit)."""

    talk_s: float = 2.0
    cucm_dtmf: tuple[tuple[float, str], ...] = ((0.8, "5"),)
    microsoft_dtmf: tuple[tuple[float, str], ...] = ((1.0, "1"),)


@dataclass
class MediaOutcome:
    """The signalling outcome plus what each side sent and received."""

    call: CallOutcome
    cucm: StreamReport
    """CUCM's endpoint: what it sent (plain RTP) and what it received back."""
    microsoft: StreamReport
    """Microsoft's endpoint: what it sent (SRTP) and what it received and decrypted."""
    problems: list[str]

    def lines(self) -> list[str]:
        return [
            format_report("CUCM -> Microsoft", self.cucm, self.microsoft),
            format_report("Microsoft -> CUCM", self.microsoft, self.cucm),
        ]


def wait_for_answer(sipp: SippProcess, timeout: float) -> SipMessage:
    """The 200 OK to CUCM's INVITE as SIPp traced it, read while SIPp still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sipp.message_file.exists():
            for t in parse_message_trace(sipp.message_file.read_bytes()):
                msg = t.msg
                if t.direction == "received" and not msg.is_request and msg.method == "INVITE":
                    if msg.status == 200:
                        return msg
                    if msg.status >= 300:
                        raise RuntimeError(f"INVITE refused: {msg.start_line}")
        if not sipp.running():
            raise RuntimeError(f"SIPp ended before a 200 OK:\n{sipp.wait().describe()}")
        time.sleep(0.02)
    raise RuntimeError(f"no 200 OK at CUCM within {timeout:g}s")


def media_target(msg: SipMessage) -> tuple[tuple[str, int], tuple[str, int]]:
    """(RTP, RTCP) address in an SDP body (RFC 3605 a=rtcp, else port + 1)."""
    lines = msg.sdp_lines
    audio_at = next(i for i, ln in enumerate(lines) if ln.startswith("m=audio "))
    # A media-level c= line wins over the session-level one (RFC 4566 §5.7).
    media_c = [ln for ln in lines[audio_at:] if ln.startswith("c=IN IP4 ")]
    session_c = [ln for ln in lines[:audio_at] if ln.startswith("c=IN IP4 ")]
    ip = (media_c or session_c)[0].split()[2]
    port = int(lines[audio_at].split()[1])
    rtcp = next((int(ln.split(":")[1].split()[0]) for ln in lines if ln.startswith("a=rtcp:")), port + 1)
    return (ip, port), (ip, rtcp)


def crypto_key(msg: SipMessage) -> str:
    """The inline key of the first a=crypto line of an SDP body."""
    line = next(ln for ln in msg.sdp_lines if ln.startswith("a=crypto:"))
    return line.split("inline:", 1)[1].split()[0].split("|")[0]


def nat(policy: Policy, addr: tuple[str, int]) -> tuple[str, int]:
    external = policy.sbc.external
    if external.advertised_address and addr[0] == external.advertised_address:
        return external.address, addr[1]
    return addr


def _invite_at(peer: MicrosoftPeer, call_id: str, timeout: float) -> SipMessage:
    rec = peer.wait_for(
        lambda r: r.msg.is_request and r.msg.method == "INVITE" and r.msg.get("Call-ID") == call_id,
        timeout=timeout,
    )
    return rec.msg


def _answered_call(peer: MicrosoftPeer, call_id: str, timeout: float) -> Call:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        call = peer.calls.get(call_id)
        if call is not None and call.media_sock is not None:
            return call
        time.sleep(0.01)
    raise RuntimeError(f"the Microsoft peer opened no media for {call_id}")


def talk_both_ways(
    policy: Policy,
    plan: MediaPlan,
    cucm: MediaEndpoint,
    call: Call,
    *,
    cucm_sends_to: tuple[tuple[str, int], tuple[str, int]],
    microsoft_sdp: SipMessage,
) -> tuple[StreamReport, StreamReport]:
    """CUCM's RTP and Microsoft's SRTP for `plan.talk_s`, both ways; (CUCM's, Microsoft's) reports.

    `microsoft_sdp` is the SBC's SDP Microsoft's peer received (its address and the key to decrypt).
    """
    assert call.media_sock is not None
    ms_rtp, ms_rtcp = media_target(microsoft_sdp)
    with MediaEndpoint.adopt(call.media_sock) as microsoft:
        microsoft.start(
            nat(policy, ms_rtp),
            nat(policy, ms_rtcp),
            send_key=call.srtp_key,
            recv_key=crypto_key(microsoft_sdp),
            tone_hz=MICROSOFT_TONE_HZ,
            duration_s=plan.talk_s,
            dtmf=plan.microsoft_dtmf,
        )
        cucm.start(
            *cucm_sends_to,
            send_key=None,
            recv_key=None,
            tone_hz=CUCM_TONE_HZ,
            duration_s=plan.talk_s,
            dtmf=plan.cucm_dtmf,
        )
        cucm.wait_sent(plan.talk_s + 5)
        microsoft.wait_sent(plan.talk_s + 5)
        time.sleep(0.2)  # the last packets are still in rtpengine
        ms_report = microsoft.report()
    return cucm.report(), ms_report


def run_media_call(
    policy: Policy,
    peer: MicrosoftPeer,
    workdir: Path,
    *,
    plan: MediaPlan = MediaPlan(),
    scenario: str = "seed-call",
    call_seconds: float | None = None,
) -> MediaOutcome:
    """One SIPp call from CUCM through the running SBC, with media both ways for `plan.talk_s`."""
    cucm_ip = cucm_address(policy)
    internal = policy.sbc.internal
    hold_ms = int(1000 * (call_seconds if call_seconds is not None else plan.talk_s + 0.6))
    before = len(peer.received)
    with (
        MediaEndpoint(cucm_ip) as cucm,
        start_sipp(
            SCENARIOS / scenario / "uac.xml",
            f"{internal.address}:{internal.port}",
            local_ip=cucm_ip,
            media_ip=cucm_ip,
            media_port=free_port(cucm_ip, kind=socket.SOCK_DGRAM),
            keys={"hold_ms": str(hold_ms), "rtp_port": str(cucm.rtp_addr[1])},
            timeout_s=20 + 4 * hold_ms / 1000,
            workdir=workdir,
        ) as sipp,
    ):
        answer = wait_for_answer(sipp, timeout=10)
        # Microsoft knows the call by its masked Call-ID (topology hiding).
        call_id = masker(policy).mask(answer.get("Call-ID"))
        invite = _invite_at(peer, call_id, timeout=5)
        call = _answered_call(peer, call_id, timeout=5)
        assert call.media_sock is not None
        rtp_to, rtcp_to = media_target(answer)
        cucm_report, ms_report = talk_both_ways(
            policy, plan, cucm, call, cucm_sends_to=(rtp_to, rtcp_to), microsoft_sdp=invite
        )
        result = sipp.wait(20 + 4 * hold_ms / 1000)
    outcome = call_outcome(policy, peer, result, before)
    problems = list(outcome.problems)
    problems += _prefixed(
        "CUCM -> Microsoft",
        direction_problems(cucm_report, ms_report, tone_hz=CUCM_TONE_HZ, dtmf=_digits(plan.cucm_dtmf)),
    )
    problems += _prefixed(
        "Microsoft -> CUCM",
        direction_problems(
            ms_report, cucm_report, tone_hz=MICROSOFT_TONE_HZ, dtmf=_digits(plan.microsoft_dtmf)
        ),
    )
    return MediaOutcome(outcome, cucm_report, ms_report, problems)


def _digits(dtmf: tuple[tuple[float, str], ...]) -> str:
    return "".join(d for _, d in dtmf)


def _prefixed(name: str, problems: list[str]) -> list[str]:
    return [f"{name}: {p}" for p in problems]
