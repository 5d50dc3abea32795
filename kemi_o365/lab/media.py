"""Lab media endpoints: send a real PCMU tone (+ RFC 4733 DTMF, RTCP SR) and check what comes back.

The CUCM side uses a `MediaEndpoint` with plain RTP, the Microsoft side one with SDES-SRTP (its own
a=crypto key to send, the SBC's key to receive, RFC 4568 §6.1). Each endpoint reports what it sent and
what it received — counts, SRTP authentication, loss from sequence numbers (RFC 3550 A.3), payload
types, SSRCs, the tone's frequency and level, DTMF digits — and `format_report` makes one line per
direction for the demo.

DTMF behaviour (documented choice): while an event is being sent, its telephone-event packets take the
place of the audio packets (one per 20 ms slot, same sequence space, RFC 4733 §2.5.1), as CUCM and IOS
gateways do with RFC 2833 relay: the in-band tone is suppressed, so the far end never hears it twice.
Audio resumes in the slot after the third end packet, with the timestamp of that slot.

Threads: one sends (paced on the monotonic clock, packet k due at t0 + k·20 ms, so lateness never
accumulates), one receives on the RTP and RTCP sockets until `stop()`. Counters are under one lock.
"""

from __future__ import annotations

import contextlib
import secrets
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from kemi_o365.lab.rtp import (
    PT_PCMU,
    PT_TELEPHONE_EVENT,
    PTIME_S,
    SAMPLES_PER_PACKET,
    RtpPacket,
    SrtpContext,
    SrtpError,
    TelephoneEvent,
    build_rtcp_sr,
    dtmf_payloads,
    is_rtcp,
    level_dbov,
    measure_tone,
    parse_rtcp,
    tone,
    ulaw_decode,
    ulaw_encode,
)

RTCP_INTERVAL_S = 1.0  # fixed, not RFC 3550 §6.2's randomised interval: two members, tests want it regular
MAX_ANALYSED_PACKETS = 3000  # 60 s of audio kept for the tone measurement; older packets are dropped
_POLL_S = 0.05
_MAX_DROPOUT = 3000  # RFC 3550 A.1 constants: a forward jump up to this is loss, not a restart
_MAX_MISORDER = 100


# ----- sequence accounting -----------------------------------------------------------------------


@dataclass(slots=True)
class _SeqTracker:
    """RFC 3550 A.1/A.3 for one SSRC: extended highest sequence number, expected vs received.

    A jump beyond MAX_DROPOUT (or backwards beyond MAX_MISORDER) is taken as the sender restarting its
    sequence (A.1 says so after two in-order packets; one is enough for our lab streams): the segment
    so far is closed and counting starts again, so a new seq base is not reported as loss.
    """

    base: int
    max_seq: int
    cycles: int = 0
    received: int = 1
    closed_expected: int = 0
    closed_received: int = 0
    max_gap: int = 0

    def update(self, seq: int) -> None:
        delta = (seq - self.max_seq) & 0xFFFF
        if 0 < delta < _MAX_DROPOUT:
            if seq < self.max_seq:
                self.cycles += 1 << 16
            self.max_gap = max(self.max_gap, delta - 1)
            self.max_seq = seq
        elif delta >= (1 << 16) - _MAX_MISORDER or delta == 0:
            pass  # late, reordered or duplicate packet: counts as received, does not move max
        else:
            self.closed_expected += self._expected()
            self.closed_received += self.received
            self.base, self.max_seq, self.cycles, self.received = seq, seq, 0, 0
        self.received += 1

    def _expected(self) -> int:
        return self.cycles + self.max_seq - self.base + 1

    @property
    def lost(self) -> int:
        # A.3: may be negative with duplicates; clamp, as a report of "lost" packets cannot be.
        return max(0, self.closed_expected + self._expected() - self.closed_received - self.received)


# ----- report ------------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamReport:
    """One endpoint's view: what it sent (`packets_sent`...) and what it received (everything else).

    `authenticated` counts RTP packets accepted: SRTP-authenticated with a receive key, or simply
    well-formed without one (then it equals `packets_received`). Everything after it (loss, payload
    types, tone...) is computed from accepted packets only. `tone_hz`/`level_dbov` come from the
    accepted PCMU payloads (the last 60 s) decoded and joined in arrival order (`rtp.measure_tone`;
    dBov per ITU-T G.100.1, so a full-scale sine is -3 dBov); None without audio or below -60 dBov.
    """

    packets_sent: int = 0
    rtcp_sent: int = 0
    dtmf_sent: str = ""
    send_errors: int = 0
    packets_received: int = 0
    authenticated: int = 0
    auth_failures: int = 0
    malformed: int = 0
    lost: int = 0
    max_seq_gap: int = 0
    payload_types: tuple[int, ...] = ()
    ssrcs: tuple[int, ...] = ()
    audio_packets: int = 0
    tone_hz: float | None = None
    level_dbov: float | None = None
    rtcp_received: int = 0
    rtcp_accepted: int = 0
    srtcp_authenticated: int = 0
    srtcp_auth_failures: int = 0
    rtcp_sender_reports: int = 0
    dtmf_digits: str = ""
    first_packet_at: float | None = None  # time.monotonic() of the first / last accepted RTP packet
    last_packet_at: float | None = None
    max_gap_s: float = 0.0  # longest silence between accepted RTP packets (hold shows up here)


def format_report(name: str, sent: StreamReport | int, received: StreamReport) -> str:
    """`CUCM -> Microsoft: sent 150, received 150, authenticated 150, lost 0, tone 1000.0 Hz at -12.0 dBov,
    DTMF 5, RTCP 3` — `sent` is the sending endpoint's report, or a count when it is not ours (SIPp)."""
    n_sent = sent if isinstance(sent, int) else sent.packets_sent
    r = received
    parts = [
        f"sent {n_sent}",
        f"received {r.packets_received}",
        f"authenticated {r.authenticated}",
        f"lost {r.lost}",
    ]
    if r.auth_failures:
        parts.append(f"auth failures {r.auth_failures}")
    if r.tone_hz is None:
        parts.append("no tone")
    else:
        parts.append(f"tone {r.tone_hz:.1f} Hz at {r.level_dbov:.1f} dBov")
    parts.append(f"DTMF {r.dtmf_digits or '-'}")
    if r.srtcp_authenticated or r.srtcp_auth_failures:
        failed = f" ({r.srtcp_auth_failures} failed)" if r.srtcp_auth_failures else ""
        parts.append(f"SRTCP {r.srtcp_authenticated}{failed}")
    else:
        parts.append(f"RTCP {r.rtcp_accepted}")
    return f"{name}: " + ", ".join(parts)


def direction_problems(
    sent: StreamReport | int,
    received: StreamReport,
    *,
    tone_hz: float | None = 1000.0,
    tolerance_hz: float = 2.0,
    dtmf: str = "",
    max_lost: int = 0,
) -> list[str]:
    """What is wrong with one direction, as sentences (empty = the issue's checks all pass): every
    packet accepted, PCMU (+ telephone-event) only, continuous sequence numbers, the tone, the digits."""
    n_sent = sent if isinstance(sent, int) else sent.packets_sent
    r = received
    out = []
    if r.packets_received == 0:
        out.append("nothing received")
    if r.auth_failures or r.malformed:
        out.append(f"{r.auth_failures} packets failed authentication, {r.malformed} malformed")
    if r.lost > max_lost:
        out.append(f"{r.lost} packets lost (largest sequence gap {r.max_seq_gap})")
    if n_sent and r.authenticated + r.lost < n_sent - 5:  # a few may still be in flight at stop()
        out.append(f"only {r.authenticated} of {n_sent} packets arrived")
    odd = [pt for pt in r.payload_types if pt not in (PT_PCMU, PT_TELEPHONE_EVENT)]
    if odd:
        out.append(f"unexpected payload types {odd}")
    if tone_hz is not None and r.tone_hz is None:
        out.append(f"no tone, expected {tone_hz} Hz")
    elif tone_hz is not None and r.tone_hz is not None and abs(r.tone_hz - tone_hz) > tolerance_hz:
        out.append(f"tone {r.tone_hz:.1f} Hz, expected {tone_hz} ± {tolerance_hz} Hz")
    if r.dtmf_digits != dtmf:
        out.append(f"DTMF {r.dtmf_digits!r}, expected {dtmf!r}")
    return out


# ----- endpoint ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SendPlan:
    rtp_to: tuple[str, int]
    rtcp_to: tuple[str, int] | None
    ctx: SrtpContext | None
    tone_hz: float
    tone_dbov: float
    slots: int  # 20 ms packets to send
    dtmf: list[tuple[int, str]]  # (slot, digit), sorted
    ssrc: int


@dataclass(slots=True)
class _RecvState:
    packets: int = 0
    authenticated: int = 0
    auth_failures: int = 0
    malformed: int = 0
    payload_types: set[int] = field(default_factory=set)
    ssrcs: dict[int, _SeqTracker] = field(default_factory=dict)
    audio: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_ANALYSED_PACKETS))
    audio_packets: int = 0
    rtcp: int = 0
    rtcp_accepted: int = 0
    srtcp_ok: int = 0
    srtcp_failed: int = 0
    sender_reports: int = 0
    events: set[tuple[int, int]] = field(default_factory=set)  # (ssrc, timestamp) of digits seen
    digits: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    max_gap: float = 0.0


class MediaEndpoint:
    """An RTP/RTCP endpoint on (ip, even port, port+1), or adopting an existing RTP socket.

    `MediaEndpoint("127.0.0.10")` binds a free even port pair (RFC 3550 §11). `MediaEndpoint.adopt(sock)`
    uses an already bound socket (the Microsoft peer's `call.media_sock`, whose port is in its SDP) and
    binds port+1 for RTCP when that is free (RFC 3605 default with no a=rtcp); otherwise RTCP is only
    received multiplexed on the RTP port (RFC 5761 §4). An adopted socket stays its owner's to close.
    """

    rtp_sock: socket.socket
    rtcp_sock: socket.socket | None
    _own_rtp: bool

    def __init__(
        self,
        ip: str,
        port: int = 0,
        *,
        audio_pt: int = PT_PCMU,
        dtmf_pt: int = PT_TELEPHONE_EVENT,
        cname: str | None = None,
    ) -> None:
        self._own_rtp = True
        self.rtp_sock, self.rtcp_sock = _bind_pair(ip, port)
        self._setup(audio_pt, dtmf_pt, cname)

    @classmethod
    def adopt(
        cls,
        rtp_sock: socket.socket,
        *,
        audio_pt: int = PT_PCMU,
        dtmf_pt: int = PT_TELEPHONE_EVENT,
        cname: str | None = None,
    ) -> MediaEndpoint:
        ep = cls.__new__(cls)
        ep._own_rtp = False
        ep.rtp_sock = rtp_sock
        ip, port = rtp_sock.getsockname()[:2]
        ep.rtcp_sock = None
        rtcp = socket.socket(rtp_sock.family, socket.SOCK_DGRAM)
        try:
            rtcp.bind((ip, port + 1))
            ep.rtcp_sock = rtcp
        except OSError:
            rtcp.close()
        ep._setup(audio_pt, dtmf_pt, cname)
        return ep

    def _setup(self, audio_pt: int, dtmf_pt: int, cname: str | None) -> None:
        self.audio_pt, self.dtmf_pt = audio_pt, dtmf_pt
        ip, port = self.rtp_sock.getsockname()[:2]
        self.cname = cname or f"lab@{ip}:{port}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._send_stop = threading.Event()
        self._paused = threading.Event()
        self._recv_ctx: SrtpContext | None = None
        self._recv: _RecvState = _RecvState()
        self._sent = StreamReport()
        self._sender: threading.Thread | None = None
        self._receiver: threading.Thread | None = None

    @property
    def rtp_addr(self) -> tuple[str, int]:
        ip, port = self.rtp_sock.getsockname()[:2]
        return str(ip), int(port)

    @property
    def rtcp_addr(self) -> tuple[str, int] | None:
        if self.rtcp_sock is None:
            return None
        ip, port = self.rtcp_sock.getsockname()[:2]
        return str(ip), int(port)

    # ----- control -----

    def listen(self, recv_key: str | None = None) -> None:
        """Start receiving (idempotent); `recv_key` is the peer's inline key, None for plain RTP."""
        with self._lock:
            self._recv_ctx = SrtpContext(recv_key, outbound=False) if recv_key else None
        if self._receiver is None:
            self._receiver = threading.Thread(target=self._receive_loop, name="media-recv", daemon=True)
            self._receiver.start()

    def start(
        self,
        remote_rtp: tuple[str, int],
        remote_rtcp: tuple[str, int] | None,
        *,
        send_key: str | None,
        recv_key: str | None,
        tone_hz: float = 1000.0,
        tone_dbov: float = -12.0,
        duration_s: float,
        dtmf: Sequence[tuple[float, str]] = (),
        ssrc: int | None = None,
    ) -> None:
        """Receive (see `listen`) and send `duration_s` of 20 ms PCMU packets of the tone to `remote_rtp`,
        an SR every second to `remote_rtcp` (None: no RTCP), DTMF digits at (offset s, digit).
        May be called again once the previous sending finished (a new SSRC, e.g. after a re-INVITE)."""
        if self._sender is not None and self._sender.is_alive():
            raise RuntimeError("still sending; wait_sent() or stop() first")
        self.listen(recv_key)
        plan = _SendPlan(
            remote_rtp,
            remote_rtcp,
            SrtpContext(send_key, outbound=True) if send_key else None,
            tone_hz,
            tone_dbov,
            round(duration_s / PTIME_S),
            [(round(off / PTIME_S), digit) for off, digit in sorted(dtmf)],
            secrets.randbits(32) if ssrc is None else ssrc,
        )
        self._send_stop.clear()
        self._sender = threading.Thread(target=self._send_loop, args=(plan,), name="media-send", daemon=True)
        self._sender.start()

    def pause_sending(self) -> None:
        """Hold: stop sending; the clock (timestamps, tone phase) keeps running, sequence numbers do not."""
        self._paused.set()

    def resume_sending(self) -> None:
        self._paused.clear()

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Block until the sender finished its `duration_s`; True if it did."""
        if self._sender is not None:
            self._sender.join(timeout)
            return not self._sender.is_alive()
        return True

    def stop(self) -> None:
        """Stop both threads (waits for them) and close the sockets this endpoint owns."""
        self._send_stop.set()
        self._stop.set()
        for t in (self._sender, self._receiver):
            if t is not None:
                t.join(5.0)
        if self.rtcp_sock is not None:
            self.rtcp_sock.close()
        if self._own_rtp:
            self.rtp_sock.close()

    close = stop

    def __enter__(self) -> MediaEndpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def report(self) -> StreamReport:
        with self._lock:
            s, r = self._sent, self._recv
            audio = b"".join(r.audio)
            rep = StreamReport(
                packets_sent=s.packets_sent,
                rtcp_sent=s.rtcp_sent,
                dtmf_sent=s.dtmf_sent,
                send_errors=s.send_errors,
                packets_received=r.packets,
                authenticated=r.authenticated,
                auth_failures=r.auth_failures,
                malformed=r.malformed,
                lost=sum(t.lost for t in r.ssrcs.values()),
                max_seq_gap=max((t.max_gap for t in r.ssrcs.values()), default=0),
                payload_types=tuple(sorted(r.payload_types)),
                ssrcs=tuple(r.ssrcs),
                audio_packets=r.audio_packets,
                rtcp_received=r.rtcp,
                rtcp_accepted=r.rtcp_accepted,
                srtcp_authenticated=r.srtcp_ok,
                srtcp_auth_failures=r.srtcp_failed,
                rtcp_sender_reports=r.sender_reports,
                dtmf_digits="".join(r.digits),
                first_packet_at=r.first,
                last_packet_at=r.last,
                max_gap_s=r.max_gap,
            )
        samples = ulaw_decode(audio)  # outside the lock: the FFT takes a few ms
        rep.tone_hz = measure_tone(samples)
        rep.level_dbov = level_dbov(samples) if samples.size else None
        return rep

    # ----- sending -----

    def _send_loop(self, plan: _SendPlan) -> None:
        slots, ssrc, ctx = plan.slots, plan.ssrc, plan.ctx
        seq, ts0 = secrets.randbits(16), secrets.randbits(32)
        pending = deque(plan.dtmf)
        event: list[tuple[bool, bytes]] = []  # remaining (marker, payload) of the digit being sent
        event_ts = 0
        talkspurt = True  # RFC 3551 §4.1: marker on the first packet after silence
        packets = octets = 0  # per SSRC, for the SR (RFC 3550 §6.4.1: reset when the SSRC changes)
        t0 = time.monotonic()
        next_rtcp = t0 + RTCP_INTERVAL_S
        for slot in range(slots):
            if self._send_stop.wait(max(0.0, t0 + slot * PTIME_S - time.monotonic())):
                break
            ts = ts0 + slot * SAMPLES_PER_PACKET
            if not event and pending and pending[0][0] <= slot:
                digit = pending.popleft()[1]
                event, event_ts = dtmf_payloads(digit), ts
                with self._lock:
                    self._sent.dtmf_sent += digit.upper()
            if self._paused.is_set():
                talkspurt = True
                event = []  # a digit pressed on hold is not sent
            else:
                if event:
                    marker, payload = event.pop(0)
                    pkt = RtpPacket(self.dtmf_pt, seq, event_ts, ssrc, payload, marker)
                else:
                    audio = tone(
                        plan.tone_hz, plan.tone_dbov, SAMPLES_PER_PACKET, start=slot * SAMPLES_PER_PACKET
                    )
                    pkt = RtpPacket(self.audio_pt, seq, ts, ssrc, ulaw_encode(audio), talkspurt)
                    talkspurt = False
                if not self._send(pkt.build(), plan.rtp_to, ctx, rtcp=False):
                    return
                seq = (seq + 1) & 0xFFFF
                packets += 1
                octets += len(pkt.payload)
            if plan.rtcp_to is not None and time.monotonic() >= next_rtcp:
                next_rtcp += RTCP_INTERVAL_S
                self._send_sr(plan.rtcp_to, ctx, ssrc, ts, count=packets, octets=octets)
        if plan.rtcp_to is not None and slots:
            self._send_sr(
                plan.rtcp_to, ctx, ssrc, ts0 + slots * SAMPLES_PER_PACKET, count=packets, octets=octets
            )

    def _send_sr(
        self, to: tuple[str, int], ctx: SrtpContext | None, ssrc: int, ts: int, *, count: int, octets: int
    ) -> None:
        sr = build_rtcp_sr(
            ssrc,
            ntp_time=time.time(),
            rtp_timestamp=ts,
            packet_count=count,
            octet_count=octets,
            cname=self.cname,
        )
        self._send(sr, to, ctx, rtcp=True)

    def _send(self, data: bytes, to: tuple[str, int], ctx: SrtpContext | None, *, rtcp: bool) -> bool:
        if ctx is not None:
            data = ctx.protect_rtcp(data) if rtcp else ctx.protect(data)
        # RTCP goes out from the RTCP socket so the peer sees it come from port+1 (symmetric RTCP, RFC 4961).
        sock = self.rtcp_sock if rtcp and self.rtcp_sock is not None else self.rtp_sock
        try:
            sock.sendto(data, to)
        except OSError:  # socket closed under us (the peer's BYE closes an adopted one) or unreachable
            with self._lock:
                self._sent.send_errors += 1
            return False
        with self._lock:
            if rtcp:
                self._sent.rtcp_sent += 1
            else:
                self._sent.packets_sent += 1
        return True

    # ----- receiving -----

    def _receive_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.rtp_sock, selectors.EVENT_READ, False)
            if self.rtcp_sock is not None:
                sel.register(self.rtcp_sock, selectors.EVENT_READ, True)
            while not self._stop.is_set():
                try:
                    ready = sel.select(_POLL_S)
                    for key, _ in ready:
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = sock.recv(2048)
                        if key.data or is_rtcp(data):
                            self._on_rtcp(data)
                        else:
                            self._on_rtp(data, time.monotonic())
                except ConnectionError:  # an ICMP error queued on the socket: keep listening
                    continue
                except (OSError, ValueError):  # an adopted socket closed by its owner
                    return

    def _on_rtp(self, data: bytes, now: float) -> None:
        with self._lock:
            r = self._recv
            r.packets += 1
            if self._recv_ctx is not None:
                try:
                    data = self._recv_ctx.unprotect(data)
                except SrtpError:
                    r.auth_failures += 1
                    return
            try:
                pkt = RtpPacket.parse(data)
            except ValueError:
                r.malformed += 1
                return
            r.authenticated += 1
            if r.last is not None:
                r.max_gap = max(r.max_gap, now - r.last)
            r.first = now if r.first is None else r.first
            r.last = now
            r.payload_types.add(pkt.payload_type)
            tracker = r.ssrcs.get(pkt.ssrc)
            if tracker is None:
                r.ssrcs[pkt.ssrc] = _SeqTracker(pkt.seq, pkt.seq)
            else:
                tracker.update(pkt.seq)
            if pkt.payload_type == self.audio_pt:
                r.audio.append(pkt.payload)
                r.audio_packets += 1
            elif pkt.payload_type == self.dtmf_pt and (pkt.ssrc, pkt.timestamp) not in r.events:
                # RFC 4733 §2.5.2: one event = one timestamp; updates and end retransmissions repeat it.
                with contextlib.suppress(ValueError):
                    r.digits.append(TelephoneEvent.parse(pkt.payload).digit)
                    r.events.add((pkt.ssrc, pkt.timestamp))

    def _on_rtcp(self, data: bytes) -> None:
        with self._lock:
            r = self._recv
            r.rtcp += 1
            if self._recv_ctx is not None:
                try:
                    data = self._recv_ctx.unprotect_rtcp(data)
                except SrtpError:
                    r.srtcp_failed += 1
                    return
                r.srtcp_ok += 1
            try:
                compound = parse_rtcp(data)
            except ValueError:
                return
            r.rtcp_accepted += 1
            r.sender_reports += len(compound.sender_reports)


def _bind_pair(ip: str, port: int) -> tuple[socket.socket, socket.socket]:
    """RTP on an even port, RTCP on the next (RFC 3550 §11); port 0 = any free pair."""
    if port % 2:
        raise ValueError(f"RTP port {port} is odd (RFC 3550 §11)")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(100 if port == 0 else 1):
        rtp = socket.socket(family, socket.SOCK_DGRAM)
        rtcp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            rtp.bind((ip, port))
            got = rtp.getsockname()[1]
            if got % 2 == 0:
                rtcp.bind((ip, got + 1))
                return rtp, rtcp
        except OSError:
            if port != 0:
                rtp.close()
                rtcp.close()
                raise
        rtp.close()
        rtcp.close()
    raise OSError(f"no free even RTP/RTCP port pair on {ip}")
