"""Lab media: G.711, tone measurement, RTP/RFC 4733/RTCP formats, SRTP, and two endpoints on loopback."""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kemi_o365.lab.media import (
    MediaEndpoint,
    StreamReport,
    _SeqTracker,
    direction_problems,
    format_report,
)
from kemi_o365.lab.rtp import (
    DIGITAL_MILLIWATT,
    RtpPacket,
    SrtpContext,
    SrtpError,
    TelephoneEvent,
    build_rtcp_sr,
    decode_inline_key,
    dtmf_payloads,
    is_rtcp,
    level_dbov,
    measure_tone,
    new_inline_key,
    parse_rtcp,
    tone,
    ulaw_decode,
    ulaw_encode,
)

IP = "127.0.0.1"
TONE_DBOV = -12.0


# ----- G.711 and tone measurement ----------------------------------------------------------------


def test_ulaw_decode_known_values() -> None:
    # G.711 Table 2 (µ-law) decoder outputs in 14-bit units, times 4 here in 16-bit: 0, 2 (one step up),
    # 33 (first value of the second segment), 8031 (top code). 0xFF and 0x7F are +0 and -0.
    decoded = ulaw_decode(bytes([0xFF, 0x7F, 0xFE, 0x7E, 0xEF, 0x80, 0x00]))
    assert decoded.tolist() == [0, 0, 8, -8, 132, 32124, -32124]


def test_ulaw_encode_known_values_and_round_trip() -> None:
    assert ulaw_encode([0, 32767, -32768, 32124, -32124, 8, -8]) == bytes(
        [0xFF, 0x80, 0x00, 0x80, 0x00, 0xFE, 0x7E]
    )
    codes = bytes(range(256))
    again = ulaw_encode(ulaw_decode(codes))
    # Every code decodes to a value that encodes back to it, except negative zero (0x7F) → +0 (0xFF).
    assert [c for c in range(256) if again[c] != c] == [0x7F]
    assert again[0x7F] == 0xFF


def test_ulaw_quantisation_error_is_half_a_step() -> None:
    x = np.arange(-32000, 32001, dtype=np.float64)
    err = np.abs(ulaw_decode(ulaw_encode(x)) - x)
    # Steps double per segment (8 units of 16-bit near zero, 1024 at the top): the error stays within
    # half a step (+ the 2 bits G.711 drops), i.e. small near zero and ≤ 1/16 relative further up.
    small = np.abs(x) < 256
    assert err[small].max() <= 12
    assert np.all(err[~small] <= np.abs(x[~small]) / 16)


def test_digital_milliwatt_is_1000_hz_at_0_dbm0() -> None:
    # G.711 Table 6 sequence; 0 dBm0 = T_max (+3.17 dBm0, a full-scale sine, -3.01 dBov) - 3.17 dB.
    x = ulaw_decode(DIGITAL_MILLIWATT * 1000)
    assert measure_tone(x) == pytest.approx(1000.0, abs=0.01)
    assert level_dbov(x) == pytest.approx(-3.01 - 3.17, abs=0.1)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 1800.0, 1234.5])
def test_tone_frequency_and_level_after_ulaw(freq: float) -> None:
    x = ulaw_decode(ulaw_encode(tone(freq, TONE_DBOV, 8000, start=4321)))
    measured = measure_tone(x)
    assert measured is not None
    assert abs(measured - freq) < 2.0
    assert abs(measured - freq) < 0.05  # what the estimator really achieves on a clean second
    assert level_dbov(x) == pytest.approx(TONE_DBOV, abs=0.2)


def test_no_tone_in_silence_or_too_little_audio() -> None:
    assert measure_tone(ulaw_decode(b"\xff" * 8000)) is None
    assert measure_tone(tone(1000, TONE_DBOV, 100)) is None
    assert level_dbov(np.zeros(10)) == -math.inf


# ----- packet formats ----------------------------------------------------------------------------


def test_rtp_header_build_and_parse() -> None:
    pkt = RtpPacket(0, 65535, 0xFFFFFFFF, 0xDEADBEEF, b"\x01\x02", marker=True)
    raw = pkt.build()
    # RFC 3550 §5.1: V=2 P=0 X=0 CC=0 | M=1 PT=0 | seq | ts | ssrc
    assert raw[:12] == bytes.fromhex("8080ffffffffffffdeadbeef")
    assert RtpPacket.parse(raw) == pkt
    full = RtpPacket(101, 7, 8, 9, b"abc", csrcs=(1, 2), extension=(0xBEDE, b"\x10\xff\x00\x00"))
    raw = full.build()
    assert raw[0] == 0x80 | 0x10 | 2
    assert RtpPacket.parse(raw) == full
    padded = bytearray(raw + b"\0\0\x03")
    padded[0] |= 0x20  # P bit: the last octet counts the padding
    assert RtpPacket.parse(bytes(padded)).payload == b"abc"
    for bad in (b"\x40" + raw[1:], raw[:11], bytes([0x8F]) + raw[1:12]):
        with pytest.raises(ValueError):
            RtpPacket.parse(bad)
    assert not is_rtcp(raw)
    assert is_rtcp(build_rtcp_sr(1, ntp_time=0, rtp_timestamp=0, packet_count=0, octet_count=0, cname="x"))


def test_rfc4733_payload_format() -> None:
    # §2.3: event 5, E=0, R=0, volume 10, duration 160 → 05 0a 00a0; the end packet sets E.
    assert TelephoneEvent(5, False, 10, 160).build() == bytes.fromhex("050a00a0")
    assert TelephoneEvent(11, True, 10, 800).build() == bytes.fromhex("0b8a0320")
    assert TelephoneEvent.parse(bytes.fromhex("0b8a0320")) == TelephoneEvent(11, True, 10, 800)
    assert TelephoneEvent.parse(bytes.fromhex("0b8a0320")).digit == "#"
    seq = dtmf_payloads("#")
    events = [TelephoneEvent.parse(p) for _, p in seq]
    assert [m for m, _ in seq] == [True] + [False] * 7  # marker on the first packet only
    assert [e.duration for e in events] == [160, 320, 480, 640, 800, 800, 800, 800]
    assert [e.end for e in events] == [False] * 5 + [True] * 3  # three end packets
    assert {e.event for e in events} == {11}
    assert [TelephoneEvent.parse(dtmf_payloads(d)[0][1]).event for d in "09*#AD"] == [0, 9, 10, 11, 12, 15]
    with pytest.raises(ValueError):
        dtmf_payloads("X")


def test_rtcp_sender_report_format() -> None:
    raw = build_rtcp_sr(
        0x01020304,
        ntp_time=1_700_000_000.5,
        rtp_timestamp=160,
        packet_count=50,
        octet_count=8000,
        cname="abc",
    )
    # SR: V=2 RC=0, PT=200, length 6 (7 words); SSRC; NTP msw/lsw; RTP ts; packets; octets.
    assert raw[:4] == bytes([0x80, 200, 0, 6])
    ssrc, msw, lsw, ts, pkts, octets = struct.unpack_from("!IIIIII", raw, 4)
    assert (ssrc, msw - 2208988800, lsw, ts, pkts, octets) == (
        0x01020304,
        1_700_000_000,
        2**31,
        160,
        50,
        8000,
    )
    # SDES: V=2 SC=1, PT=202, length 3; chunk = SSRC, CNAME(1) len 3 "abc", nulls to a 32-bit boundary.
    sdes = raw[28:]
    assert sdes == bytes([0x81, 202, 0, 3]) + bytes.fromhex("01020304") + b"\x01\x03abc\x00\x00\x00"
    parsed = parse_rtcp(raw)
    assert parsed.packet_types == [200, 202]
    assert parsed.cnames == {0x01020304: "abc"}
    (sr,) = parsed.sender_reports
    assert (sr.packet_count, sr.octet_count, sr.rtp_timestamp) == (50, 8000, 160)
    assert sr.ntp_time == pytest.approx(1_700_000_000.5)
    for bad in (sdes, raw[:-4], b"\x80\xc8\x00"):
        with pytest.raises(ValueError):
            parse_rtcp(bad)
    # Item padding for a 2-byte item (4-byte boundary needs a full null word).
    two = parse_rtcp(build_rtcp_sr(7, ntp_time=0, rtp_timestamp=0, packet_count=0, octet_count=0, cname="ab"))
    assert two.cnames == {7: "ab"}


def test_srtp_inline_key_and_protection() -> None:
    key = new_inline_key()
    assert len(decode_inline_key(key)) == 30
    assert decode_inline_key(f"inline:{key}|2^31|1:1") == decode_inline_key(key)
    for bad in ("inline:AAAA", "not base64!"):
        with pytest.raises(ValueError):
            decode_inline_key(bad)
    rtp = RtpPacket(0, 1, 160, 42, b"\xff" * 160).build()
    srtp = SrtpContext(key, outbound=True).protect(rtp)
    assert len(srtp) == len(rtp) + 10 and srtp[:12] == rtp[:12]  # 80-bit tag, header in clear
    assert SrtpContext(key, outbound=False).unprotect(srtp) == rtp
    with pytest.raises(SrtpError):
        SrtpContext(new_inline_key(), outbound=False).unprotect(srtp)
    rtcp = build_rtcp_sr(42, ntp_time=0, rtp_timestamp=0, packet_count=1, octet_count=160, cname="c")
    srtcp = SrtpContext(key, outbound=True).protect_rtcp(rtcp)
    assert len(srtcp) == len(rtcp) + 4 + 10  # E flag + SRTCP index, then the tag (RFC 3711 §3.4)
    assert SrtpContext(key, outbound=False).unprotect_rtcp(srtcp) == rtcp
    with pytest.raises(SrtpError):
        SrtpContext(key, outbound=False).unprotect_rtcp(rtcp)


def test_sequence_accounting() -> None:
    t = _SeqTracker(65533, 65533)
    for seq in (65534, 65535, 0, 3, 4, 2, 4):  # wrap, 1 and 2 missing, then 2 late and 4 duplicated
        t.update(seq)
    assert t.cycles == 1 << 16
    assert (t.lost, t.max_gap) == (0, 2)  # late 2 and duplicate 4 make up for the 2 missing
    t.update(30000)  # a new sequence base: a restart, not 25000 lost packets
    t.update(30002)
    assert (t.lost, t.max_gap) == (1, 2)


def test_format_report_and_problems() -> None:
    sent = StreamReport(packets_sent=150)
    got = StreamReport(
        packets_received=150, authenticated=150, tone_hz=1000.06, level_dbov=-12.04, dtmf_digits="5",
        payload_types=(0, 101), srtcp_authenticated=3,
    )  # fmt: skip
    line = format_report("CUCM -> Microsoft", sent, got)
    assert line == (
        "CUCM -> Microsoft: sent 150, received 150, authenticated 150, lost 0, "
        "tone 1000.1 Hz at -12.0 dBov, DTMF 5, SRTCP 3"
    )
    assert direction_problems(sent, got, dtmf="5") == []
    bad = StreamReport(packets_received=150, auth_failures=150)
    assert format_report("Microsoft -> CUCM", 150, bad) == (
        "Microsoft -> CUCM: sent 150, received 150, authenticated 0, lost 0, auth failures 150, no tone, "
        "DTMF -, RTCP 0"
    )
    problems = direction_problems(150, bad)
    assert any("authentication" in p for p in problems) and any("tone" in p for p in problems)


# ----- endpoints on loopback ---------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[MediaEndpoint, MediaEndpoint]]:
    a, b = MediaEndpoint(IP), MediaEndpoint(IP)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def settle(*checks: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for in-flight packets after the senders finished."""
    deadline = time.monotonic() + timeout
    while not all(c() for c in checks) and time.monotonic() < deadline:
        time.sleep(0.02)


def run_both(
    a: MediaEndpoint,
    b: MediaEndpoint,
    *,
    a_key: str | None = None,
    b_key: str | None = None,
    duration_s: float = 1.0,
    a_dtmf: tuple[tuple[float, str], ...] = (),
    b_dtmf: tuple[tuple[float, str], ...] = (),
) -> tuple[StreamReport, StreamReport]:
    # Each side sends with its own key and receives with the other's (RFC 4568 §6.1).
    a.start(b.rtp_addr, b.rtcp_addr, send_key=a_key, recv_key=b_key, duration_s=duration_s, dtmf=a_dtmf)
    b.start(a.rtp_addr, a.rtcp_addr, send_key=b_key, recv_key=a_key, duration_s=duration_s, dtmf=b_dtmf)
    assert a.wait_sent(duration_s + 3) and b.wait_sent(duration_s + 3)
    sent_a, sent_b = a.report().packets_sent, b.report().packets_sent
    settle(
        lambda: b.report().packets_received >= sent_a and b.report().rtcp_received >= 1,
        lambda: a.report().packets_received >= sent_b and a.report().rtcp_received >= 1,
    )
    return a.report(), b.report()


def assert_clean(sender: StreamReport, receiver: StreamReport, *, dtmf: str = "") -> None:
    assert receiver.packets_received == sender.packets_sent
    assert receiver.authenticated == receiver.packets_received
    assert (receiver.auth_failures, receiver.malformed, receiver.lost, receiver.max_seq_gap) == (0, 0, 0, 0)
    assert len(receiver.ssrcs) == 1
    assert receiver.tone_hz is not None and abs(receiver.tone_hz - 1000.0) < 2.0
    assert receiver.level_dbov is not None and abs(receiver.level_dbov - TONE_DBOV) < 0.5
    assert receiver.dtmf_digits == sender.dtmf_sent == dtmf
    assert direction_problems(sender, receiver, dtmf=dtmf) == []


def test_plain_rtp_both_ways(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    assert a.rtp_addr[1] % 2 == 0 and a.rtcp_addr == (IP, a.rtp_addr[1] + 1)
    ra, rb = run_both(a, b)
    assert 48 <= ra.packets_sent <= 50 and 48 <= rb.packets_sent <= 50
    for sender, receiver in ((ra, rb), (rb, ra)):
        assert_clean(sender, receiver)
        assert receiver.payload_types == (0,)
        assert receiver.rtcp_accepted == receiver.rtcp_received >= 1 and receiver.rtcp_sender_reports >= 1
        assert receiver.srtcp_authenticated == 0
        assert receiver.first_packet_at is not None and receiver.last_packet_at is not None
        assert 0.8 < receiver.last_packet_at - receiver.first_packet_at < 1.5  # paced in real time
        assert receiver.max_gap_s < 0.2


def test_srtp_and_srtcp_both_ways(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    ra, rb = run_both(a, b, a_key=new_inline_key(), b_key=new_inline_key())
    for sender, receiver in ((ra, rb), (rb, ra)):
        assert_clean(sender, receiver)
        assert receiver.srtcp_authenticated == receiver.rtcp_received == receiver.rtcp_accepted >= 1
        assert receiver.srtcp_auth_failures == 0


def test_dtmf_both_ways_over_srtp(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    ra, rb = run_both(
        a, b, a_key=new_inline_key(), b_key=new_inline_key(), duration_s=1.0,
        a_dtmf=((0.2, "5"), (0.5, "#")), b_dtmf=((0.3, "1"),),
    )  # fmt: skip
    assert_clean(ra, rb, dtmf="5#")
    assert_clean(rb, ra, dtmf="1")
    assert rb.payload_types == (0, 101)


def test_rfc4733_on_the_wire() -> None:
    """One digit as a receiver sees it: the event replaces audio, one timestamp, marker once, 3 ends."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw, MediaEndpoint(IP) as ep:
        raw.bind((IP, 0))
        raw.settimeout(1.0)
        ep.start(raw.getsockname(), None, send_key=None, recv_key=None, duration_s=0.4, dtmf=[(0.1, "5")])
        pkts = [RtpPacket.parse(raw.recv(2048)) for _ in range(20)]
    assert [(p.seq - pkts[0].seq) & 0xFFFF for p in pkts] == list(range(20))  # one sequence space
    assert [p.payload_type for p in pkts] == [0] * 5 + [101] * 8 + [0] * 7
    assert pkts[0].marker and not any(p.marker for p in pkts[1:5])
    events = pkts[5:13]
    assert {p.timestamp for p in events} == {pkts[0].timestamp + 5 * 160}
    assert [p.marker for p in events] == [True] + [False] * 7
    assert [TelephoneEvent.parse(p.payload) for p in events][-1] == TelephoneEvent(5, True, 10, 800)
    assert pkts[13].timestamp == pkts[0].timestamp + 13 * 160  # audio resumes on the clock
    assert [p.timestamp - pkts[0].timestamp for p in pkts[:5]] == [0, 160, 320, 480, 640]


@pytest.mark.parametrize("send_key", [None, "wrong"], ids=["plain-into-srtp", "wrong-key"])
def test_unauthenticated_packets_are_counted_not_accepted(
    pair: tuple[MediaEndpoint, MediaEndpoint], send_key: str | None
) -> None:
    a, b = pair
    b.listen(recv_key=new_inline_key())
    a.start(
        b.rtp_addr, b.rtcp_addr, send_key=None if send_key is None else new_inline_key(), recv_key=None,
        duration_s=0.4,
    )  # fmt: skip
    assert a.wait_sent(3)
    sent = a.report().packets_sent
    settle(lambda: b.report().packets_received >= sent and b.report().rtcp_received >= 1)
    got = b.report()
    assert got.packets_received == got.auth_failures == sent > 0
    assert (got.authenticated, got.lost, got.ssrcs, got.payload_types, got.tone_hz) == (0, 0, (), (), None)
    assert got.srtcp_auth_failures == got.rtcp_received >= 1 and got.rtcp_accepted == 0


def test_lost_packets_through_a_lossy_forwarder(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    drop = {10, 11, 30}  # by arrival index: a gap of 2 and a gap of 1
    stop = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fwd:
        fwd.bind((IP, 0))
        fwd.settimeout(0.05)

        def forward() -> None:
            n = 0
            while not stop.is_set():
                try:
                    data = fwd.recv(2048)
                except TimeoutError:
                    continue
                if n not in drop:
                    fwd.sendto(data, b.rtp_addr)
                n += 1

        t = threading.Thread(target=forward, daemon=True)
        t.start()
        try:
            key_a, key_b = new_inline_key(), new_inline_key()
            b.listen(recv_key=key_a)
            a.start(fwd.getsockname(), None, send_key=key_a, recv_key=key_b, duration_s=1.0)
            assert a.wait_sent(3)
            sent = a.report().packets_sent
            settle(lambda: b.report().packets_received >= sent - len(drop))
        finally:
            stop.set()
            t.join(2)
    got = b.report()
    assert got.packets_received == got.authenticated == sent - 3
    assert (got.lost, got.max_seq_gap, got.auth_failures) == (3, 2, 0)
    assert got.tone_hz is not None and abs(got.tone_hz - 1000.0) < 2.0
    assert direction_problems(sent, got, max_lost=3) == []
    assert any("3 packets lost" in p for p in direction_problems(sent, got))


def test_pause_resume_leaves_a_gap_but_no_loss_or_failures(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    key_a, key_b = new_inline_key(), new_inline_key()
    b.listen(recv_key=key_a)
    a.start(b.rtp_addr, b.rtcp_addr, send_key=key_a, recv_key=key_b, duration_s=1.0)
    time.sleep(0.3)
    a.pause_sending()
    time.sleep(0.4)
    a.resume_sending()
    assert a.wait_sent(3)
    sent = a.report().packets_sent
    settle(lambda: b.report().packets_received >= sent)
    got = b.report()
    assert 22 <= sent <= 38  # ~0.6 s of the 1 s sent
    assert got.packets_received == got.authenticated == sent
    assert (got.auth_failures, got.lost, got.max_seq_gap) == (0, 0, 0)  # seq numbers continue across hold
    assert got.max_gap_s > 0.3
    assert got.tone_hz is not None and abs(got.tone_hz - 1000.0) < 2.0


def test_ssrc_and_sequence_base_change(pair: tuple[MediaEndpoint, MediaEndpoint]) -> None:
    a, b = pair
    key_a = new_inline_key()
    b.listen(recv_key=key_a)
    for ssrc in (0x1111, 0x2222):  # a re-INVITE / rtpengine restart: new SSRC, new random seq base
        a.start(b.rtp_addr, None, send_key=key_a, recv_key=None, duration_s=0.3, ssrc=ssrc)
        assert a.wait_sent(3)
    sent = a.report().packets_sent
    settle(lambda: b.report().packets_received >= sent)
    got = b.report()
    assert got.ssrcs == (0x1111, 0x2222)
    assert got.packets_received == got.authenticated == sent == 30
    assert (got.auth_failures, got.lost) == (0, 0)


def test_adopted_socket_like_the_microsoft_peer() -> None:
    ms_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # what MicrosoftPeer._open_media binds
    ms_sock.bind((IP, 0))
    try:
        with MediaEndpoint(IP) as cucm:
            ms = MediaEndpoint.adopt(ms_sock)
            try:
                port = ms_sock.getsockname()[1]
                assert ms.rtp_addr == (IP, port)
                assert ms.rtcp_addr in (None, (IP, port + 1))  # port+1 only when it was free
                ms_key, sbc_key = new_inline_key(), new_inline_key()
                ms.start(cucm.rtp_addr, cucm.rtcp_addr, send_key=ms_key, recv_key=sbc_key, duration_s=0.4)
                cucm.start(ms.rtp_addr, ms.rtcp_addr, send_key=sbc_key, recv_key=ms_key, duration_s=0.4)
                assert ms.wait_sent(3) and cucm.wait_sent(3)
                settle(lambda: ms.report().packets_received >= cucm.report().packets_sent)
                settle(lambda: cucm.report().packets_received >= ms.report().packets_sent)
                assert ms.report().authenticated == cucm.report().packets_sent == 20
                assert cucm.report().authenticated == ms.report().packets_sent == 20
            finally:
                ms.stop()
        assert ms_sock.fileno() != -1  # still the peer's: Call.close_media() closes it on BYE
    finally:
        ms_sock.close()


def test_adopted_socket_closed_by_its_owner_ends_quietly() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((IP, 0))
    ep = MediaEndpoint.adopt(sock)
    ep.start((IP, 9), None, send_key=None, recv_key=None, duration_s=0.5)
    time.sleep(0.1)
    sock.close()  # the BYE arrived
    assert ep.wait_sent(2)
    ep.stop()
    assert ep.report().send_errors == 1
