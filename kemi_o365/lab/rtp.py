"""Media packet formats for the lab: G.711 µ-law, RTP, RFC 4733 telephone-event, RTCP SR/SDES, SRTP.

Pure Python + numpy (no `audioop`: deprecated since 3.11, removed in 3.13). SRTP itself is libsrtp
through pylibsrtp, keyed from an SDES `a=crypto` inline key (RFC 4568 §6.1) exactly as verified against
rtpengine in KAMAILIO-NOTES §4.4. The endpoints that use these formats live in `kemi_o365.lab.media`.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pylibsrtp

SAMPLE_RATE = 8000  # PCMU clock rate, RFC 3551 §4.5.14
PTIME_S = 0.020
SAMPLES_PER_PACKET = 160  # 20 ms at 8 kHz: one PCMU packet carries 160 one-byte samples
PT_PCMU = 0  # RFC 3551 §6 static payload type
PT_TELEPHONE_EVENT = 101  # dynamic; what CUCM, rtpengine and the Microsoft peer all use
SRTP_KEY_BYTES = 30  # AES_CM_128_HMAC_SHA1_80: 16-byte master key + 14-byte master salt (RFC 4568 §6.2.1)
FULL_SCALE = 32768.0  # 16-bit linear; 0 dBov = RMS of a full-scale square wave (ITU-T G.100.1 §5.7)

Samples = npt.NDArray[np.float64]


# ----- G.711 µ-law (ITU-T G.711 §2, the classic CCITT/Sun reference algorithm on 14-bit magnitudes) -----

_ULAW_BIAS = 0x84  # 33 in 14-bit units, shifted: the bias that makes segment ends powers of two
_ULAW_CLIP = 8159  # largest 14-bit magnitude µ-law can code (decision value of the top step)
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def ulaw_encode(samples: npt.ArrayLike) -> bytes:
    """16-bit linear samples (any real dtype; rounded and clipped) to µ-law code bytes."""
    pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float64)), -32768, 32767).astype(np.int32)
    pcm = pcm >> 2  # G.711 works on 14 bits; arithmetic shift as in the reference code
    negative = pcm < 0
    mag = np.minimum(np.where(negative, -pcm, pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left").astype(np.int32)
    # Past the last segment end (only the clipped top value) the reference code answers 0x7F.
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    # Codes are sent inverted (G.711 Table 2 note: even bits inverted for line density); the sign
    # bit is 1 for positive values after inversion.
    code ^= np.where(negative, 0x7F, 0xFF)
    return bytes(code.astype(np.uint8).tobytes())


def ulaw_decode(data: bytes) -> Samples:
    """µ-law code bytes to 16-bit linear samples (as float64, exact integers)."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.float64)


# G.711 Table 6: the µ-law "digital milliwatt", one period of a 1 kHz sine at 0 dBm0.
DIGITAL_MILLIWATT = bytes([0x1E, 0x0B, 0x0B, 0x1E, 0x9E, 0x8B, 0x8B, 0x9E])


def dbov_to_rms(dbov: float) -> float:
    return FULL_SCALE * 10 ** (dbov / 20)


def tone(freq_hz: float, dbov: float, n: int, *, start: int = 0, rate: int = SAMPLE_RATE) -> Samples:
    """`n` samples of a sine whose RMS level is `dbov` (a full-scale sine is -3.01 dBov), sample index
    `start` onwards so consecutive packets join without phase jumps."""
    idx = np.arange(start, start + n, dtype=np.float64)
    return dbov_to_rms(dbov) * math.sqrt(2) * np.sin(2 * math.pi * freq_hz * idx / rate)


MIN_TONE_DBOV = -60.0  # below this the "dominant frequency" would be quantisation noise


def level_dbov(samples: Samples) -> float:
    """RMS level relative to a full-scale square wave (ITU-T G.100.1 §5.7); -inf for silence."""
    rms = float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0
    return 20 * math.log10(rms / FULL_SCALE) if rms > 0 else -math.inf


def measure_tone(samples: Samples, rate: int = SAMPLE_RATE) -> float | None:
    """The dominant frequency in Hz, or None when there is (almost) no signal.

    Hann window, FFT zero-padded to at least 4 times the length (bins ≤ 0.25 Hz for 1 s), then a
    parabola through the log magnitudes of the peak bin and its neighbours (a Hann main lobe is close
    to Gaussian, so the log-parabola vertex is nearly unbiased). Over ≥1 s of a clean µ-law tone the
    error is well under 0.1 Hz; gaps or phase jumps from lost packets widen the peak but move it little.
    """
    n = samples.size
    if n < 2 * SAMPLES_PER_PACKET or level_dbov(samples) < MIN_TONE_DBOV:
        return None
    x = (samples - samples.mean()) * np.hanning(n)
    nfft = 1 << (math.ceil(math.log2(n)) + 2)
    mag = np.abs(np.fft.rfft(x, nfft))
    k = int(np.argmax(mag[1:-1])) + 1
    a, b, c = np.log(mag[k - 1 : k + 2] + 1e-12)
    denom = a - 2 * b + c
    offset = 0.5 * (a - c) / denom if denom != 0 else 0.0
    return float((k + offset) * rate / nfft)


# ----- RTP (RFC 3550 §5.1) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None  # (profile-defined 16 bits, data of whole 32-bit words)

    def build(self) -> bytes:
        b0 = 0x80 | (0x10 if self.extension is not None else 0) | len(self.csrcs)
        b1 = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        out = struct.pack("!BBHII", b0, b1, self.seq & 0xFFFF, self.timestamp & 0xFFFFFFFF, self.ssrc)
        out += b"".join(struct.pack("!I", c) for c in self.csrcs)
        if self.extension is not None:
            profile, data = self.extension
            if len(data) % 4:
                raise ValueError("RTP header extension must be whole 32-bit words (RFC 3550 §5.3.1)")
            out += struct.pack("!HH", profile, len(data) // 4) + data
        return out + self.payload

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Raises ValueError for anything that is not a well-formed RTP version 2 packet."""
        if len(data) < 12 or data[0] >> 6 != 2:
            raise ValueError("not RTP version 2")
        b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
        pos = 12 + 4 * (b0 & 0x0F)
        if len(data) < pos:
            raise ValueError("truncated CSRC list")
        csrcs = struct.unpack_from(f"!{b0 & 0x0F}I", data, 12)
        ext = None
        if b0 & 0x10:
            if len(data) < pos + 4:
                raise ValueError("truncated header extension")
            profile, words = struct.unpack_from("!HH", data, pos)
            ext = (profile, data[pos + 4 : pos + 4 + 4 * words])
            pos += 4 + 4 * words
        end = len(data)
        if b0 & 0x20:  # §5.1: the last octet counts the padding, itself included
            if end == pos or data[-1] == 0 or data[-1] > end - pos:
                raise ValueError("bad RTP padding")
            end -= data[-1]
        if end < pos:
            raise ValueError("truncated RTP packet")
        return cls(b1 & 0x7F, seq, ts, ssrc, bytes(data[pos:end]), bool(b1 & 0x80), tuple(csrcs), ext)


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: on a shared port, second octet 192-223 is RTCP (SR 200, RR 201, SDES 202...)."""
    return len(data) >= 8 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


# ----- RFC 4733 telephone-event ------------------------------------------------------------------

DTMF_EVENTS = "0123456789*#ABCD"  # RFC 4733 §3.2 Table 7: event codes 0-15, in this order
DTMF_VOLUME = 10  # -10 dBm0, a usual DTMF level; §2.3.4 sends it without the sign


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int  # 0-63, meaning -volume dBm0
    duration: int  # in RTP timestamp units, since the event's (fixed) timestamp

    @property
    def digit(self) -> str:
        return DTMF_EVENTS[self.event] if self.event < len(DTMF_EVENTS) else f"event{self.event}"

    def build(self) -> bytes:
        # §2.3: event (8) | E (1) R (1, zero) volume (6) | duration (16)
        return struct.pack(
            "!BBH", self.event, (0x80 if self.end else 0) | (self.volume & 0x3F), self.duration
        )

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < 4:
            raise ValueError("telephone-event payload is 4 octets (RFC 4733 §2.3)")
        event, flags, duration = struct.unpack_from("!BBH", payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)


def dtmf_event_code(digit: str) -> int:
    code = DTMF_EVENTS.find(digit.upper())
    if len(digit) != 1 or code < 0:
        raise ValueError(f"not a DTMF digit: {digit!r}")
    return code


def dtmf_payloads(
    digit: str, *, packets: int = 5, step: int = SAMPLES_PER_PACKET, volume: int = DTMF_VOLUME
) -> list[tuple[bool, bytes]]:
    """(marker, payload) for one digit, one entry per 20 ms slot, all sent with the same timestamp.

    §2.5.1.2: the first packet carries the marker bit; each update grows `duration` to the time
    elapsed so far. §2.5.1.4: the final packet has the E bit and is sent three times in all, with
    the final duration (§2.5.1.4: "SHOULD ... three times"). 5 packets = a 100 ms digit.
    """
    code = dtmf_event_code(digit)
    out = [(k == 1, TelephoneEvent(code, False, volume, k * step).build()) for k in range(1, packets + 1)]
    end = TelephoneEvent(code, True, volume, packets * step).build()
    return out + [(False, end)] * 3


# ----- RTCP (RFC 3550 §6) ------------------------------------------------------------------------

RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE = 200, 201, 202, 203
_NTP_EPOCH_OFFSET = 2208988800  # seconds 1900-01-01 → 1970-01-01 (RFC 3550 §4)


@dataclass(frozen=True, slots=True)
class SenderReport:
    ssrc: int
    ntp_time: float  # Unix seconds, converted back from the 64-bit NTP timestamp
    rtp_timestamp: int
    packet_count: int
    octet_count: int


@dataclass(slots=True)
class RtcpCompound:
    packet_types: list[int] = field(default_factory=list)
    sender_reports: list[SenderReport] = field(default_factory=list)
    cnames: dict[int, str] = field(default_factory=dict)
    byes: list[int] = field(default_factory=list)


def build_rtcp_sr(
    ssrc: int, *, ntp_time: float, rtp_timestamp: int, packet_count: int, octet_count: int, cname: str
) -> bytes:
    """A compound RTCP packet: SR with no report blocks, then SDES with one CNAME (§6.1 requires both)."""
    secs = ntp_time + _NTP_EPOCH_OFFSET
    msw = int(secs) & 0xFFFFFFFF
    lsw = int((secs - int(secs)) * 2**32) & 0xFFFFFFFF
    # §6.4.1: length = 32-bit words minus one; 28 octets → 6.
    sr = struct.pack(
        "!BBHIIIIII", 0x80, RTCP_SR, 6, ssrc, msw, lsw, rtp_timestamp & 0xFFFFFFFF, packet_count, octet_count
    )
    text = cname.encode()[:255]
    item = bytes([1, len(text)]) + text  # §6.5.1: CNAME is item type 1
    # §6.5: a chunk's items end with at least one null octet, padded to a 32-bit boundary.
    chunk = struct.pack("!I", ssrc) + item + b"\0" * (4 - len(item) % 4)
    sdes = struct.pack("!BBH", 0x81, RTCP_SDES, len(chunk) // 4) + chunk
    return sr + sdes


def parse_rtcp(data: bytes) -> RtcpCompound:
    """Parse a compound RTCP packet; ValueError if it fails the RFC 3550 A.2 validity checks."""
    out = RtcpCompound()
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise ValueError("truncated RTCP header")
        b0, pt, words = struct.unpack_from("!BBH", data, pos)
        end = pos + 4 * (words + 1)
        if b0 >> 6 != 2 or end > len(data):
            raise ValueError("bad RTCP version or length")
        if pos == 0 and pt not in (RTCP_SR, RTCP_RR):
            raise ValueError("compound RTCP must start with SR or RR (RFC 3550 A.2)")
        out.packet_types.append(pt)
        body = data[pos + 4 : end]
        count = b0 & 0x1F
        if pt == RTCP_SR and len(body) >= 24:
            ssrc, msw, lsw, rtp_ts, pkts, octets = struct.unpack_from("!IIIIII", body)
            ntp = msw + lsw / 2**32 - _NTP_EPOCH_OFFSET
            out.sender_reports.append(SenderReport(ssrc, ntp, rtp_ts, pkts, octets))
        elif pt == RTCP_SDES:
            _parse_sdes(body, count, out.cnames)
        elif pt == RTCP_BYE:
            out.byes += struct.unpack_from(f"!{min(count, len(body) // 4)}I", body)
        pos = end
    if not out.packet_types:
        raise ValueError("empty RTCP packet")
    return out


def _parse_sdes(body: bytes, count: int, cnames: dict[int, str]) -> None:
    pos = 0
    for _ in range(count):
        if pos + 4 > len(body):
            return
        (ssrc,) = struct.unpack_from("!I", body, pos)
        pos += 4
        while pos < len(body) and body[pos] != 0:
            kind, length = body[pos], body[pos + 1] if pos + 1 < len(body) else 0
            if kind == 1:
                cnames[ssrc] = body[pos + 2 : pos + 2 + length].decode(errors="replace")
            pos += 2 + length
        pos = (pos // 4 + 1) * 4  # skip the null terminator(s) to the next 32-bit boundary


# ----- SRTP / SRTCP (RFC 3711) via libsrtp -------------------------------------------------------


class SrtpError(Exception):
    """The packet did not authenticate (wrong key, plain RTP, replay) or could not be protected."""


def decode_inline_key(inline: str) -> bytes:
    """The 30-byte master key||salt from an a=crypto key-params value (RFC 4568 §6.1):
    `inline:<base64>|<lifetime>|<MKI>:<len>`; the prefix, lifetime and MKI are all optional here."""
    text = inline.strip().removeprefix("inline:").split("|", 1)[0]
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"SRTP inline key is not base64: {exc}") from None
    if len(key) != SRTP_KEY_BYTES:
        raise ValueError(
            f"SRTP inline key is {len(key)} bytes, AES_CM_128_HMAC_SHA1_80 needs {SRTP_KEY_BYTES}"
        )
    return key


def new_inline_key() -> str:
    return base64.b64encode(secrets.token_bytes(SRTP_KEY_BYTES)).decode()


class SrtpContext:
    """One direction of SRTP+SRTCP with one master key (AES_CM_128_HMAC_SHA1_80, the pylibsrtp default).

    Outbound and inbound need separate libsrtp sessions (SSRC_ANY_OUTBOUND / SSRC_ANY_INBOUND): an
    SDES call has two keys, each side encrypting with the key of its own a=crypto (RFC 4568 §6.1).
    "Any" SSRC lets a stream change SSRC (rtpengine restart, CUCM transfer) without reconfiguring.
    """

    def __init__(self, inline_key: str, *, outbound: bool) -> None:
        kind = pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        self._session = pylibsrtp.Session(pylibsrtp.Policy(key=decode_inline_key(inline_key), ssrc_type=kind))

    def protect(self, rtp: bytes) -> bytes:
        return self._call(self._session.protect, rtp)

    def protect_rtcp(self, rtcp: bytes) -> bytes:
        return self._call(self._session.protect_rtcp, rtcp)

    def unprotect(self, srtp: bytes) -> bytes:
        return self._call(self._session.unprotect, srtp)

    def unprotect_rtcp(self, srtcp: bytes) -> bytes:
        return self._call(self._session.unprotect_rtcp, srtcp)

    @staticmethod
    def _call(func: Callable[[bytes], Any], data: bytes) -> bytes:
        try:
            out = func(bytes(data))
        except (pylibsrtp.Error, ValueError) as exc:
            raise SrtpError(str(exc)) from None
        return bytes(out)
