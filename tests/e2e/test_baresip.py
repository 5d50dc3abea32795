"""A second, independent Microsoft side: Debian's baresip 1.0.0 answers the SBC's INVITE over TLS with
mandatory SDES-SRTP, plays an 1800 Hz tone and records what it hears.

CUCM is SIPp (TCP) plus a lab media endpoint sending a 1000 Hz PCMU tone from the port CUCM's SDP
announces to the SBC address/port in the 200 OK. Passing means: baresip's TLS stack accepted the SBC's
connection and certificate check, its SRTP stack decrypted what rtpengine encrypted (the recording holds
CUCM's 1000 Hz), and rtpengine decrypted baresip's SRTP for CUCM (CUCM hears 1800 Hz).

baresip's TLS server never requests a client certificate (see kemi_o365.lab.baresip), so this test does
not exercise the SBC's client certificate; the Python peer's tests do.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from kemi_o365.lab.baresip import BaresipPeer, free_tls_port, read_wav
from kemi_o365.lab.demo import SCENARIOS, cucm_address, wait_rtpengine_empty
from kemi_o365.lab.media import MediaEndpoint
from kemi_o365.lab.media_call import media_target, wait_for_answer
from kemi_o365.lab.rtp import Samples, level_dbov, measure_tone
from kemi_o365.lab.sipp import free_port, start_sipp
from kemi_o365.launch import RunDir, Stack
from kemi_o365.sipmsg import SipMessage, SipParseError, parse
from tests.e2e.conftest import lab_policy_data, start_lab

pytestmark = pytest.mark.e2e

CUCM_TONE_HZ = 1000.0
MS_TONE_HZ = 1800.0
HOLD_MS = 4000
TOLERANCE_HZ = 3.0
BLOCK = 800  # 100 ms at 8 kHz: long enough for a per-block frequency estimate within ~1 Hz
MIN_TONE_S = 1.0
MIN_LEVEL_DBOV = -40.0

# baresip -s prints each SIP message between an ANSI-coloured "#" line plus a "TLS a -> b" line, and a
# colour reset (src/ua.c sip_trace_handler).
_TRACE = re.compile(r"\x1b\[36;1m#\n(?P<dir>\S+ \S+ -> \S+)\n(?P<msg>.*?)\x1b\[;m", re.S)


def _baresip_trace(log: str) -> list[tuple[str, SipMessage]]:
    out = []
    for m in _TRACE.finditer(log):
        try:
            out.append((m["dir"], parse(m["msg"].replace("\n", "\r\n"))))
        except SipParseError:
            continue
    return out


def _tone_seconds(samples: Samples, freq: float) -> tuple[float, Samples]:
    """Seconds of 100 ms blocks whose dominant frequency is `freq` (± tolerance), and those samples."""
    blocks = [samples[i : i + BLOCK] for i in range(0, samples.size - BLOCK + 1, BLOCK)]
    toned = [
        b
        for b in blocks
        if level_dbov(b) > MIN_LEVEL_DBOV
        and (f := measure_tone(b)) is not None
        and abs(f - freq) <= TOLERANCE_HZ
    ]
    joined: Samples = np.concatenate(toned) if toned else np.zeros(0)
    return len(toned) * BLOCK / 8000, joined


def _hz(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} Hz"


def _db(value: float | None) -> str:
    return "silence" if value is None else f"{value:.1f} dBov"


def test_baresip_as_microsoft_hears_cucm_and_cucm_hears_baresip(tmp_path: Path) -> None:
    started = time.monotonic()
    data = lab_policy_data()
    # baresip sends RTP to the c= address of the SBC's offer; the advertised (NAT) address is not
    # routable in the loopback lab, so offer the external interface itself.
    data["sbc"]["external"].pop("advertised_address", None)
    # baresip's RTP socket is bound to any address: its packets leave from 127.0.0.1 while its SDP
    # says 127.0.0.3, a peer behind NAT as far as rtpengine can tell. "off" (the default) drops
    # them under strict-source; "heuristic" learns the real source in the first seconds.
    data["rtpengine"]["endpoint_learning"] = "heuristic"
    # baresip puts TLS on sip_listen's port + 1: pick a port whose predecessor is free too.
    data["microsoft"]["proxies"][0]["port"] = free_tls_port("127.0.0.3")
    policy, pki = start_lab(tmp_path, data)
    proxy = policy.microsoft.proxies[0]
    assert proxy.address == "127.0.0.3"
    assert policy.microsoft.to_uri is not None
    user = policy.microsoft.to_uri.removeprefix("sip:").split("@")[0]
    cucm_ip = cucm_address(policy)
    internal = policy.sbc.internal

    with (
        BaresipPeer(
            host=proxy.address,
            port=proxy.port,
            cert=pki / "ms.crt",
            key=pki / "ms.key",
            ca=pki / "ca.crt",
            user=user,
            domain=proxy.fqdn,
            workdir=tmp_path / "baresip",
            tone_hz=MS_TONE_HZ,
            # aufile ends the call when its file runs out: well past the call's length.
            tone_seconds=HOLD_MS / 1000 + 20,
        ) as baresip,
        Stack(policy, RunDir(tmp_path / "run")) as stack,
        MediaEndpoint(cucm_ip) as cucm_media,
    ):
        rtp_port = cucm_media.rtp_addr[1]
        with start_sipp(
            SCENARIOS / "seed-call" / "uac.xml",
            f"{internal.address}:{internal.port}",
            local_ip=cucm_ip,
            media_ip=cucm_ip,
            media_port=free_port(cucm_ip, kind=socket.SOCK_DGRAM),
            keys={"hold_ms": str(HOLD_MS), "rtp_port": str(rtp_port)},
            timeout_s=15,
            workdir=tmp_path / "sipp",
        ) as sipp:
            answer = wait_for_answer(sipp, timeout=8)
            rtp_to, rtcp_to = media_target(answer)
            # Stop a little before CUCM's BYE so no packet races the teardown.
            cucm_media.start(
                rtp_to,
                rtcp_to,
                send_key=None,
                recv_key=None,
                tone_hz=CUCM_TONE_HZ,
                duration_s=HOLD_MS / 1000 - 0.3,
            )
            result = sipp.wait()
        cucm_media.wait_sent(2)
        cucm_report = cucm_media.report()
        left = wait_rtpengine_empty(policy)
        # baresip has answered the BYE by the time SIPp got the 200; give its log a moment to show the
        # call closed (that is when sndfile closes the WAV, writing its final header).
        deadline = time.monotonic() + 3
        while "terminated (duration" not in baresip.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        kamailio_alive = stack.procs["kamailio"].poll() is None
        procs = dict(stack.procs)
    baresip_log = baresip.log()
    # Everything this test started is gone (the with-block stopped it by PID).
    assert baresip.proc is None and baresip.returncode is not None
    for name, proc in procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running after the test"

    assert result.ok, result.describe()
    assert kamailio_alive
    assert not left, f"rtpengine still holds {left}"
    trace = _baresip_trace(baresip_log)
    assert trace, f"no SIP trace in baresip's log:\n{baresip_log}"
    received = [m for d, m in trace if d.startswith("TLS 127.0.0.2:") and m.is_request]
    sent = [m for d, m in trace if d.startswith(f"TLS {proxy.address}:") and not m.is_request]
    assert [m.method for m in received] == ["INVITE", "ACK", "BYE"], [m.start_line for m in received]
    invite_ok = next(m for m in sent if m.method == "INVITE" and m.status == 200)
    audio = [ln for ln in invite_ok.sdp_lines if ln.startswith("m=audio ")]
    assert len(audio) == 1 and audio[0].split()[2:4] == ["RTP/SAVP", "0"], audio
    crypto = [ln for ln in invite_ok.sdp_lines if ln.startswith("a=crypto:")]
    assert len(crypto) == 1 and " AES_CM_128_HMAC_SHA1_80 inline:" in crypto[0], crypto
    assert any(m.method == "BYE" and m.status == 200 for m in sent)
    assert "SRTP is Enabled (cryptosuite=AES_CM_128_HMAC_SHA1_80)" in baresip_log
    assert "Call established" in baresip_log

    # What baresip heard: CUCM's tone, decrypted by libsrtp from rtpengine's SRTP.
    recording = baresip.received_recording()
    assert recording is not None, f"baresip recorded nothing:\n{baresip_log}"
    rate, samples = read_wav(recording)
    assert rate == 8000
    heard = np.asarray(samples, dtype=np.float64)
    heard_s, heard_tone = _tone_seconds(heard, CUCM_TONE_HZ)
    heard_hz = measure_tone(heard_tone)
    # What CUCM heard: baresip's tone, decrypted by rtpengine.
    cucm_hz = cucm_report.tone_hz
    summary = (
        f"baresip recorded {heard.size / rate:.2f} s, {heard_s:.1f} s of it a tone at {_hz(heard_hz)} "
        f"({_db(level_dbov(heard_tone) if heard_tone.size else None)}; CUCM sent {CUCM_TONE_HZ:g} Hz in "
        f"{cucm_report.packets_sent} packets); CUCM received {cucm_report.audio_packets} packets, tone "
        f"{_hz(cucm_hz)} ({_db(cucm_report.level_dbov)}; baresip played {MS_TONE_HZ:g} Hz); "
        f"test took {time.monotonic() - started:.1f} s"
    )
    print(summary)
    assert heard_s >= MIN_TONE_S, summary
    assert heard_hz is not None and abs(heard_hz - CUCM_TONE_HZ) <= TOLERANCE_HZ, summary
    assert cucm_report.audio_packets >= MIN_TONE_S / 0.02, summary
    assert cucm_hz is not None and abs(cucm_hz - MS_TONE_HZ) <= TOLERANCE_HZ, summary
