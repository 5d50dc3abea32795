"""Who may talk to the SBC: a flooding stranger is cut off while CUCM's call goes through, and media
is relayed only from the endpoints the call negotiated (rtpengine strict-source)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from kemi_o365.lab.demo import SCENARIOS, place_seed_call
from kemi_o365.lab.media_call import media_target, wait_for_answer
from kemi_o365.lab.rtp import SrtpContext
from kemi_o365.lab.sipp import free_port, start_sipp
from kemi_o365.sipmsg import SipMessage, parse
from kemi_o365.topology import masker
from tests.e2e.conftest import Lab, lab_policy_data, running_lab
from tests.summary import report

pytestmark = pytest.mark.e2e

STRANGER = "127.0.0.9"  # not in cucm.sources
FLOOD_REQUESTS = 3000
LIMIT = {"requests": 20, "per_seconds": 2, "ban_seconds": 60}


def _options(n: int, port: int) -> bytes:
    return (
        f"OPTIONS sip:pstn-o365.example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {STRANGER}:{port};branch=z9hG4bKflood{n}\r\n"
        f"From: <sip:scan@{STRANGER}>;tag={n}\r\nTo: <sip:pstn-o365.example.com>\r\n"
        f"Call-ID: flood-{n}@{STRANGER}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _flood(target: tuple[str, int], replies: list[SipMessage], done: threading.Event) -> float:
    """FLOOD_REQUESTS OPTIONS from one socket as fast as it goes; replies are collected meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((STRANGER, 0))
        port = sock.getsockname()[1]
        sock.settimeout(0.2)

        def collect() -> None:
            while not done.is_set():
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                replies.append(parse(data))

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        start = time.monotonic()
        for n in range(FLOOD_REQUESTS):
            sock.sendto(_options(n, port), target)
        elapsed = time.monotonic() - start
        time.sleep(1.0)  # late answers
        done.set()
        reader.join(2)
        return elapsed


def test_a_flood_from_a_stranger_is_cut_off_while_cucm_calls(tmp_path: Path) -> None:
    data = lab_policy_data()
    data["sbc"]["flood_limit"] = LIMIT
    with running_lab(tmp_path, data) as lab:
        internal = lab.policy.sbc.internal
        replies: list[SipMessage] = []
        done = threading.Event()
        result: dict[str, float] = {}
        flooder = threading.Thread(
            target=lambda: result.update(elapsed=_flood((internal.address, internal.port), replies, done))
        )
        flooder.start()
        call = place_seed_call(lab.policy, lab.peer, lab.root / "sipp")
        flooder.join(60)
        assert not flooder.is_alive()
        # After the flood the stranger is still banned, CUCM is still served.
        late: list[SipMessage] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((STRANGER, 0))
            probe.settimeout(1.0)
            probe.sendto(_options(99999, probe.getsockname()[1]), (internal.address, internal.port))
            with contextlib.suppress(TimeoutError):
                late.append(parse(probe.recv(65535)))
        log = lab.stack.run.kamailio_log.read_text(errors="replace")
    assert call.sipp.ok, call.sipp.describe()
    answered = len(replies)
    # pike lets LIMIT["requests"] per unit through before it bans (a couple of units at most).
    assert 0 < answered <= 3 * LIMIT["requests"], answered
    assert {r.status for r in replies} == {403}  # a stranger never gets 200, not even to OPTIONS
    assert late == []
    bans = [ln for ln in log.splitlines() if f"flood from {STRANGER}" in ln]
    assert len(bans) == 1, bans
    report(
        f"flood: {FLOOD_REQUESTS} OPTIONS from {STRANGER} in {result['elapsed']:.2f} s, "
        f"{answered} answered (403) before the ban, {FLOOD_REQUESTS - answered} ignored; "
        "CUCM's seed call during it: "
        f"{'answered and released' if call.sipp.ok else 'FAILED'}; one log line for the ban"
    )


def _rtp(seq: int, ssrc: int, marker: bytes) -> bytes:
    header = struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc)
    return header + marker.ljust(160, b"\xff")


def test_media_from_a_stranger_never_reaches_microsoft(lab: Lab) -> None:
    cucm_rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cucm_rtp.bind((lab.cucm_ip, free_port(lab.cucm_ip, kind=socket.SOCK_DGRAM)))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((STRANGER, 0))
    try:
        with start_sipp(
            SCENARIOS / "seed-call" / "uac.xml",
            lab.cucm_target,
            local_ip=lab.cucm_ip,
            media_ip=lab.cucm_ip,
            keys={"hold_ms": "3000", "rtp_port": str(cucm_rtp.getsockname()[1])},
            workdir=lab.root / "sipp",
            timeout_s=20,
        ) as sipp:
            answer = wait_for_answer(sipp, timeout=10)
            sbc_cucm_side, _ = media_target(answer)
            call_id = masker(lab.policy).mask(answer.get("Call-ID"))
            invite = lab.peer.wait_for(
                lambda r: r.msg.is_request and r.msg.method == "INVITE" and r.msg.get("Call-ID") == call_id,
                timeout=5,
            ).msg
            call = lab.peer.calls[call_id]
            assert call.media_sock is not None
            key = next(ln for ln in invite.sdp_lines if ln.startswith("a=crypto:")).split("inline:")[1]
            srtp = SrtpContext(key.split("|")[0], outbound=False)
            # CUCM talks first, then the stranger aims at the same SBC port, then both together.
            for seq in range(1, 40):
                cucm_rtp.sendto(_rtp(seq, 0x11111111, b"CUCM"), sbc_cucm_side)
                time.sleep(0.005)
            for seq in range(1, 200):
                stranger.sendto(_rtp(seq, 0x22222222, b"STRANGER"), sbc_cucm_side)
                if seq % 5 == 0:
                    cucm_rtp.sendto(_rtp(40 + seq, 0x11111111, b"CUCM"), sbc_cucm_side)
                time.sleep(0.002)
            got = _drain(call.media_sock, srtp)
            sipp.wait(20)
    finally:
        cucm_rtp.close()
        stranger.close()
    from_cucm = sum(1 for p in got if p.startswith(b"CUCM"))
    from_stranger = sum(1 for p in got if p.startswith(b"STRANGER"))
    assert from_cucm >= 30, (from_cucm, len(got))
    assert from_stranger == 0
    report(
        f"strict source: CUCM sent 78 RTP packets, a stranger 199 to the same SBC port; Microsoft "
        f"decrypted {from_cucm} of CUCM's and {from_stranger} of the stranger's"
    )


def _drain(sock: socket.socket, srtp: SrtpContext) -> list[bytes]:
    """Payloads of every SRTP packet Microsoft's media socket received (decrypted with the SBC's key)."""
    out: list[bytes] = []
    sock.settimeout(0.5)
    while True:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return out
        if len(data) < 12 or data[1] & 0x7F >= 72:  # RTCP
            continue
        try:
            out.append(srtp.unprotect(data)[12:])
        except Exception:  # a packet that does not decrypt is not media Microsoft plays
            continue


def test_stranger_probe_gets_403_and_a_log_line(lab: Lab) -> None:
    internal = lab.policy.sbc.internal
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((STRANGER, 0))
        sock.settimeout(3)
        sock.sendto(_options(os.getpid(), sock.getsockname()[1]), (internal.address, internal.port))
        reply = parse(sock.recv(65535))
    assert reply.status == 403
    log = lab.stack.run.kamailio_log.read_text(errors="replace")
    assert f"403 Forbidden to OPTIONS from {STRANGER}" in log
