"""Media relay capacity: how many simultaneous PCMU calls (20 ms) rtpengine relays RTP <-> SRTP both
ways in user space on this machine with under 0.5% loss, the CPU it uses, and its memory per call.

    .venv/bin/python benchmarks/media.py --counts 50,100,200,400,800 --seconds 10 --output FILE.json
    .venv/bin/python benchmarks/media.py --smoke --output FILE.json      # seconds, for make test

rtpengine alone (no Kamailio: this measures the relaying, not the signalling), started with the command
line the product uses (kemi_o365.launch.rtpengine_command: --table=-1, two interfaces, lab policy on
its own ports). For every call this process sends rtpengine, on its ng socket, the `offer` Kamailio
would send for CUCM's plain SDP (the policy's offer flags toward Microsoft translated to ng keys the
way Kamailio's rtpengine module does) and the `answer` Kamailio would send for Microsoft's SRTP SDP.

The trick that lets a plain UDP echo play Microsoft: the answer's a=crypto carries THE SAME key
rtpengine put in its offer. What rtpengine encrypted toward "Microsoft" with that key, echoed back
unchanged, is then valid SRTP under the answer's key, and rtpengine decrypts it toward CUCM.

  traffic   one socket A on 127.0.0.4 (CUCM's media address; every offer names it, calls are told
            apart by SSRC) sends every 20 ms, per call, a 172-byte RTP packet (12 + 160 PCMU) to the
            call's internal rtpengine port; rtpengine sends SRTP to socket B on 127.0.0.3 (Microsoft's
            media address in every answer), B sends each packet back to where it came from, rtpengine
            decrypts it and sends plain RTP to A. Sends are paced by absolute deadlines (4 slices per
            20 ms tick); how late the sender ran is measured.
  loss      per direction, counting only packets whose sequence number falls in the measured window
            (after 1 s of warm-up), after a drain: RTP->SRTP = 1 - received at B / sent by A;
            SRTP->RTP = 1 - received at A / echoed by B. A sample is checked: at B 182 bytes that
            libsrtp decrypts to the payload sent, at A 172 bytes with that payload in clear.
  cpu       utime+stime of rtpengine (all threads, /proc) and of this process (getrusage) over the
            measured window; the machine's busy share from /proc/stat.
  memory    rtpengine's RSS before the step's calls exist and at the end of the measured window;
            bytes per call is (RSS at the end - RSS of the idle daemon) / calls.
  drops     the kernel's per-socket drop counters (/proc/net/udp) of A, B and rtpengine's sockets:
            where a lost packet was dropped (the generator's buffers or rtpengine's).

  ports     RTP + RTCP per side (rtcp-mux-demux); rtpengine keeps a port pool per local address, so
            with internal and external on their own addresses a call takes 2 ports of the range (4
            when they share one); counts the range cannot hold are replaced by the most it holds.

The counts ramp until the first one losing 0.5% or more in either direction. The result says in
`limits` when the generator (this Python process), not rtpengine, was what ran out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run as a script from a checkout: the package is the one next to this file.
    sys.path.insert(0, str(REPO))

from host import cpu_seconds, machine, machine_busy, rss_bytes  # noqa: E402  (benchmarks/host.py)

from kemi_o365 import rtpengine_ng  # noqa: E402
from kemi_o365.lab.rtp import SrtpContext, SrtpError  # noqa: E402  (numpy: not imported mid-traffic)
from kemi_o365.rtpengine_ng import Bencodable  # noqa: E402

Log = Callable[[str], None]

CUCM_MEDIA_IP = "127.0.0.4"
MS_MEDIA_IP = "127.0.0.3"
MAX_LOSS_PCT = 0.5
PTIME_S = 0.020
SLICES = 4  # sends per tick spread over 4 slices: real calls are not phase-aligned
SAMPLES_PER_PACKET = 160
RTP_LEN = 12 + SAMPLES_PER_PACKET
AUTH_TAG = 10  # AES_CM_128_HMAC_SHA1_80
SRTP_LEN = RTP_LEN + AUTH_TAG
CRYPTO_SUITE = "AES_CM_128_HMAC_SHA1_80"
WARMUP_S = 1.0
DRAIN_S = 0.5
SOCKET_BUFFER = 16 * 1024 * 1024
SETUP_LIMIT_S = 60.0  # offer+answer take well under 1 ms each: far over this, rtpengine is stuck
CHECKS_PER_DIRECTION = 20
FULL_COUNTS = (50, 100, 200, 400, 800, 1200, 1600)
FULL_PORTS = (10000, 19999)


# --- ng flags the way Kamailio's rtpengine module sends them -----------------------------------------

_TRANSPORTS = {"RTP/AVP", "RTP/SAVP", "RTP/AVPF", "RTP/SAVPF", "UDP/TLS/RTP/SAVP", "UDP/TLS/RTP/SAVPF"}
_LIST_PREFIXES = {"replace-": "replace", "SDES-": "SDES", "rtcp-mux-": "rtcp-mux"}
_CODEC_KEYS = {"codec-strip": "strip", "codec-except": "except", "codec-offer": "offer", "codec-mask": "mask"}


def ng_flags(flags: Iterable[str]) -> tuple[dict[str, Bencodable], list[str]]:
    """The ng dictionary Kamailio 5.6's rtpengine module builds from a flag string (its parse_flags,
    KAMAILIO-NOTES §4.1), and the tokens this translation does not know (sent as bare flags)."""
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for token in flags:
        key, eq, value = token.partition("=")
        prefix = next((p for p in _LIST_PREFIXES if token.startswith(p)), None)
        if token in _TRANSPORTS:
            out["transport-protocol"] = token
        elif prefix is not None:
            out.setdefault(_LIST_PREFIXES[prefix], []).append(token[len(prefix) :])
        elif key == "direction" and eq:
            out.setdefault("direction", []).append(value)
        elif key in _CODEC_KEYS and eq:
            out.setdefault("codec", {}).setdefault(_CODEC_KEYS[key], []).append(value)
        elif eq:
            out[key] = value
        else:
            if token not in {"strip-extmap", "strict-source", "trust-address", "asymmetric", "symmetric"}:
                unknown.append(token)
            out.setdefault("flags", []).append(token)
    return out, unknown


# --- SDP of both ends ---------------------------------------------------------------------------------


def cucm_offer_sdp(session: int, port: int) -> str:
    """The seed call's INVITE body as the product edits it (its product name out of o=)."""
    from kemi_o365.lab.seed_sdp import cucm_offer
    from kemi_o365.media import anonymous_origin

    return anonymous_origin(cucm_offer(CUCM_MEDIA_IP, port, session))


def microsoft_answer_sdp(port: int, inline_key: str) -> str:
    """The seed's 200 OK shape (kemi_o365.lab.ms_peer) after the product strips the private c=."""
    lines = [
        "v=0",
        f"o=- 85 1 IN IP4 {MS_MEDIA_IP}",
        "s=session",
        f"c=IN IP4 {MS_MEDIA_IP}",
        "t=0 0",
        f"m=audio {port} RTP/SAVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16,36",
        f"a=crypto:1 {CRYPTO_SUITE} inline:{inline_key}",
    ]
    return "\r\n".join(lines) + "\r\n"


_CRYPTO = re.compile(r"^a=crypto:\d+ (\S+) inline:(\S+)", re.M)
_MEDIA = re.compile(r"^m=audio (\d+) (\S+)", re.M)
_CONN = re.compile(r"^c=IN IP4 (\S+)", re.M)


def offered_key(sdp: str) -> str:
    """rtpengine's one AES_CM_128_HMAC_SHA1_80 key from the SDP it offers Microsoft."""
    suites = _CRYPTO.findall(sdp)
    media = _MEDIA.search(sdp)
    if len(suites) != 1 or suites[0][0] != CRYPTO_SUITE or not media or media.group(2) != "RTP/SAVP":
        raise RuntimeError(f"rtpengine's offer toward Microsoft is not one-suite SDES RTP/SAVP:\n{sdp}")
    key: str = suites[0][1]
    return key


def answered_target(sdp: str) -> tuple[str, int]:
    """Where CUCM sends the call's RTP: rtpengine's internal address and port in its answer to CUCM."""
    media, conn = _MEDIA.search(sdp), _CONN.search(sdp)
    if not media or not conn or media.group(2) != "RTP/AVP" or _CRYPTO.search(sdp):
        raise RuntimeError(f"rtpengine's answer toward CUCM is not plain RTP/AVP:\n{sdp}")
    return conn.group(1), int(media.group(1))


def _text(reply: dict[str, rtpengine_ng.Decoded], key: str) -> str:
    value = reply.get(key)
    if not isinstance(value, bytes):
        raise RuntimeError(f"rtpengine's reply has no {key!r}: {reply}")
    return value.decode()


@dataclass(frozen=True)
class Flags:
    offer: dict[str, Bencodable]
    answer: dict[str, Bencodable]
    unmapped: list[str]


def product_flags(policy: Any) -> Flags:
    """The policy's flags toward Microsoft and back (DEFAULT_OFFER_TO_MICROSOFT/DEFAULT_ANSWER_TO_CUCM
    unless the policy overrides them), plus codec flags the product adds, as ng dictionaries."""
    from kemi_o365.media import codec_flags

    ms = policy.microsoft
    offer, unknown_o = ng_flags((*ms.offer_flags, *codec_flags(ms.codecs)))
    answer, unknown_a = ng_flags(ms.answer_flags)
    return Flags(offer, answer, sorted(set(unknown_o + unknown_a)))


@dataclass(frozen=True)
class CallLeg:
    call_id: str
    from_tag: str
    to_tag: str
    target: tuple[str, int]
    key: str


def set_up_call(ng: tuple[str, int], flags: Flags, n: int, *, step: int, a_port: int, b_port: int) -> CallLeg:
    call_id, from_tag, to_tag = f"media-{step}-{n}@bench", f"cucm-{n}", f"ms-{n}"
    ids: dict[str, Bencodable] = {"call-id": call_id, "from-tag": from_tag}
    offer = rtpengine_ng.command(
        *ng, {**flags.offer, **ids, "command": "offer", "sdp": cucm_offer_sdp(1000 + n, a_port)}, timeout=2.0
    )
    key = offered_key(_text(offer, "sdp"))
    answer_sdp = microsoft_answer_sdp(b_port, key)
    answer = rtpengine_ng.command(
        *ng, {**flags.answer, **ids, "to-tag": to_tag, "command": "answer", "sdp": answer_sdp}, timeout=2.0
    )
    return CallLeg(call_id, from_tag, to_tag, answered_target(_text(answer, "sdp")), key)


def delete_call(ng: tuple[str, int], leg: CallLeg) -> tuple[int, int]:
    """Delete one call; rtpengine's own final (RTP packets, errors) count for it, both directions
    and warm-up included (errors: packets it could not relay, e.g. SRTP failing authentication)."""
    msg: dict[str, Bencodable] = {"command": "delete", "call-id": leg.call_id}
    try:
        reply = rtpengine_ng.command(
            *ng, {**msg, "from-tag": leg.from_tag, "to-tag": leg.to_tag}, timeout=2.0
        )
    except (rtpengine_ng.NgError, OSError):
        return 0, 0
    totals = reply.get("totals")
    rtp = totals.get("RTP") if isinstance(totals, dict) else None
    if not isinstance(rtp, dict):
        return 0, 0
    packets, errors = rtp.get("packets", 0), rtp.get("errors", 0)
    return (packets if isinstance(packets, int) else 0), (errors if isinstance(errors, int) else 0)


# --- the process and the machine ----------------------------------------------------------------------


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def udp_drops() -> dict[tuple[str, int], int]:
    """The kernel's drop counter of every IPv4 UDP socket, by local address."""
    out: dict[tuple[str, int], int] = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        with contextlib.suppress(ValueError, IndexError):
            ip_hex, port_hex = cols[1].split(":")
            ip = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
            out[(ip, int(port_hex, 16))] = out.get((ip, int(port_hex, 16)), 0) + int(cols[-1])
    return out


@contextlib.contextmanager
def rtpengine(media_ports: tuple[int, int], work: Path, log: Log) -> Iterator[tuple[Any, int]]:
    """rtpengine as the product starts it, on the lab policy with fresh control ports; yields
    (policy, pid) and stops it by its process group whatever happens."""
    import yaml

    from kemi_o365.lab.demo import lab_policy_on_fresh_ports, prepare_lab
    from kemi_o365.launch import RunDir, rtpengine_command, stop_process_group

    data = lab_policy_on_fresh_ports(media_ports)
    policy = prepare_lab(work, yaml.safe_dump(data, sort_keys=False))
    run = RunDir(work / "run")
    run.root.mkdir(parents=True, exist_ok=True)
    argv = rtpengine_command(policy, run)
    log("rtpengine: " + " ".join(argv))
    rtp = policy.rtpengine
    with run.rtpengine_log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 15
        while not rtpengine_ng.ping(rtp.control_address, rtp.control_port, 0.3):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = run.rtpengine_log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rtpengine did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        yield policy, proc.pid
    finally:
        stop_process_group(proc, 10.0)


# --- the generator --------------------------------------------------------------------------------------


def _udp_socket(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        # SO_RCVBUFFORCE/SO_SNDBUFFORCE (root) go past net.core.rmem_max; the plain option otherwise.
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


def payload_of(index: int) -> bytes:
    """A payload per call that cannot be mistaken for another call's or for ciphertext."""
    return bytes((index * 7 + k) & 0xFF for k in range(SAMPLES_PER_PACKET))


@dataclass
class Counters:
    sent: list[int]
    at_b: list[int]
    echoed: list[int]
    at_a: list[int]
    send_errors: int = 0
    echo_errors: int = 0
    stray: int = 0
    checks_b: int = 0
    bad_b: list[str] = field(default_factory=list)
    checks_a: int = 0
    bad_a: list[str] = field(default_factory=list)


class Traffic:
    """Both ends of every call in one process: A plays CUCM, B echoes as Microsoft."""

    def __init__(self, rtpengine_pid: int, media_ports: tuple[int, int]) -> None:
        self.rtpengine_pid, self.media_ports = rtpengine_pid, media_ports
        self.a = _udp_socket(CUCM_MEDIA_IP)
        self.b = _udp_socket(MS_MEDIA_IP)
        self.poller = select.epoll()
        self.poller.register(self.a.fileno(), select.EPOLLIN)
        self.poller.register(self.b.fileno(), select.EPOLLIN)

    @property
    def a_port(self) -> int:
        port: int = self.a.getsockname()[1]
        return port

    @property
    def b_port(self) -> int:
        port: int = self.b.getsockname()[1]
        return port

    def close(self) -> None:
        self.poller.close()
        self.a.close()
        self.b.close()

    def run(self, legs: list[CallLeg], ssrc_base: int, seconds: float) -> Step:
        n = len(legs)
        self.ssrc_base, self.n = ssrc_base, n
        self.keys = [leg.key for leg in legs]
        # The first measured packet of every k-th call: the checks spread over all calls.
        self.check_every = max(1, n // CHECKS_PER_DIRECTION)
        self.payloads = [payload_of(i) for i in range(n)]
        self.c = Counters([0] * n, [0] * n, [0] * n, [0] * n)
        warm, counted = round(WARMUP_S / PTIME_S), max(1, round(seconds / PTIME_S))
        self.window = (warm, warm + counted)
        packets = [
            bytearray(struct.pack("!BBHII", 0x80, 0, 0, 0, ssrc_base + i) + p)
            for i, p in enumerate(self.payloads)
        ]
        targets = [leg.target for leg in legs]
        bounds = [n * s // SLICES for s in range(SLICES + 1)]
        late: list[float] = []
        step = Step(calls=n, seconds=counted * PTIME_S)
        start = time.monotonic() + 0.05
        before = Snapshot.take(self.rtpengine_pid)  # replaced when the measured window opens
        for tick in range(warm + counted):
            if tick == warm:
                before = Snapshot.take(self.rtpengine_pid)
            for s in range(SLICES):
                deadline = start + (tick + s / SLICES) * PTIME_S
                self.pump_until(deadline)
                late.append(time.monotonic() - deadline)
                self.send(packets, targets, bounds[s], bounds[s + 1], tick)
        after = Snapshot.take(self.rtpengine_pid)
        self.pump_until(time.monotonic() + DRAIN_S)
        drained = udp_drops()
        step.fill(self.c, before, after, late[warm * SLICES :])
        step.kernel_drops_generator, step.kernel_drops_rtpengine = self.drops(before.drops, drained)
        return step

    def drops(self, before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]) -> tuple[int, int]:
        """Packets the kernel dropped at the generator's sockets and at rtpengine's media sockets."""
        ours = {self.a.getsockname(), self.b.getsockname()}
        lo, hi = self.media_ports
        generator = relay = 0
        for addr, count in after.items():
            delta = count - before.get(addr, 0)
            if addr in ours:
                generator += delta
            elif addr[0] in ("127.0.0.1", "127.0.0.2") and lo <= addr[1] <= hi:
                relay += delta
        return generator, relay

    def send(
        self, packets: list[bytearray], targets: list[tuple[str, int]], lo: int, hi: int, tick: int
    ) -> None:
        seq, ts = tick & 0xFFFF, (tick * SAMPLES_PER_PACKET) & 0xFFFFFFFF
        counting = self.window[0] <= tick < self.window[1]
        sendto, sent = self.a.sendto, self.c.sent
        for i in range(lo, hi):
            pkt = packets[i]
            struct.pack_into("!HI", pkt, 2, seq, ts)
            try:
                sendto(pkt, targets[i])
            except OSError:
                self.c.send_errors += 1
                continue
            if counting:
                sent[i] += 1

    def pump_until(self, deadline: float) -> None:
        """Receive (and echo) whatever arrives until `deadline`; the caller sends right after."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in self.poller.poll(left):
                if fd == self.b.fileno():
                    self.drain_b()
                else:
                    self.drain_a()

    def _index(self, data: bytes) -> int:
        """The call a packet belongs to when its sequence number is in the measured window, else -1."""
        if len(data) < 12:
            return -1
        seq, ssrc = struct.unpack_from("!H4xI", data, 2)
        i = ssrc - self.ssrc_base
        if not 0 <= i < self.n:
            self.c.stray += 1
            return -1
        return i if self.window[0] <= seq < self.window[1] else -1

    def drain_b(self) -> None:
        recv, echo, c = self.b.recvfrom, self.b.sendto, self.c
        for _ in range(512):  # bounded, so sends are never starved for long
            try:
                data, addr = recv(2048)
            except BlockingIOError:
                return
            i = self._index(data)
            try:
                echo(data, addr)
            except OSError:
                c.echo_errors += 1
                continue
            if i >= 0:
                c.at_b[i] += 1
                c.echoed[i] += 1
                if c.at_b[i] == 1 and i % self.check_every == 0:
                    self.check_b(i, data)

    def drain_a(self) -> None:
        recv, c = self.a.recv, self.c
        for _ in range(512):
            try:
                data = recv(2048)
            except BlockingIOError:
                return
            i = self._index(data)
            if i >= 0:
                c.at_a[i] += 1
                if c.at_a[i] == 1 and i % self.check_every == 0:
                    c.checks_a += 1
                    if len(data) != RTP_LEN or data[12:] != self.payloads[i]:
                        c.bad_a.append(f"call {i}: {len(data)} bytes, payload not the one sent")

    def check_b(self, i: int, data: bytes) -> None:
        """SRTP toward Microsoft: the right length, and libsrtp decrypts it to what A sent."""
        c = self.c
        c.checks_b += 1
        if len(data) != SRTP_LEN or data[12:RTP_LEN] == self.payloads[i]:
            c.bad_b.append(
                f"call {i}: {len(data)} bytes, payload in clear: {data[12:RTP_LEN] == self.payloads[i]}"
            )
            return
        try:
            clear = SrtpContext(self.keys[i], outbound=False).unprotect(data)
        except SrtpError as exc:
            c.bad_b.append(f"call {i}: libsrtp: {exc}")
            return
        if clear[12:] != self.payloads[i]:
            c.bad_b.append(f"call {i}: decrypted payload is not the one sent")


@dataclass
class Snapshot:
    at: float
    rtpengine_cpu: float
    generator_cpu: float
    busy: float
    total: float
    rss: int
    drops: dict[tuple[str, int], int]

    @classmethod
    def take(cls, pid: int) -> Snapshot:
        busy, total = machine_busy()
        return cls(time.monotonic(), cpu_seconds([pid]), self_cpu(), busy, total, rss_bytes(pid), udp_drops())


@dataclass
class Step:
    calls: int
    seconds: float
    sent: int = 0
    received_srtp: int = 0
    echoed: int = 0
    received_rtp: int = 0
    loss_rtp_to_srtp_pct: float = 0.0
    loss_srtp_to_rtp_pct: float = 0.0
    wall_s: float = 0.0
    rtpengine_cpu_s: float = 0.0
    rtpengine_cpu_pct_of_core: float = 0.0
    generator_cpu_s: float = 0.0
    generator_cpu_pct_of_core: float = 0.0
    machine_busy_pct: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    rss_bytes_per_call: float = 0.0
    setup_s: float = 0.0
    send_late_ms_p50: float = 0.0
    send_late_ms_p99: float = 0.0
    send_late_ms_max: float = 0.0
    send_late_over_20ms_pct: float = 0.0
    send_errors: int = 0
    echo_errors: int = 0
    stray_packets: int = 0
    rtpengine_rtp_packets: int = 0
    rtpengine_rtp_errors: int = 0
    kernel_drops_generator: int = 0
    kernel_drops_rtpengine: int = 0
    checked_srtp: int = 0
    checked_rtp: int = 0
    check_failures: list[str] = field(default_factory=list)

    def fill(self, c: Counters, before: Snapshot, after: Snapshot, late: list[float]) -> None:
        self.sent, self.received_srtp = sum(c.sent), sum(c.at_b)
        self.echoed, self.received_rtp = sum(c.echoed), sum(c.at_a)
        self.loss_rtp_to_srtp_pct = loss_pct(self.sent, self.received_srtp)
        self.loss_srtp_to_rtp_pct = loss_pct(self.echoed, self.received_rtp)
        self.wall_s = round(after.at - before.at, 3)
        wall = max(after.at - before.at, 1e-9)
        self.rtpengine_cpu_s = round(after.rtpengine_cpu - before.rtpengine_cpu, 3)
        self.rtpengine_cpu_pct_of_core = round(100 * self.rtpengine_cpu_s / wall, 1)
        self.generator_cpu_s = round(after.generator_cpu - before.generator_cpu, 3)
        self.generator_cpu_pct_of_core = round(100 * self.generator_cpu_s / wall, 1)
        total = max(after.total - before.total, 1.0)
        self.machine_busy_pct = round(100 * (after.busy - before.busy) / total, 1)
        self.rss_after = after.rss
        ordered = sorted(late)
        if ordered:
            self.send_late_ms_p50 = round(1000 * ordered[len(ordered) // 2], 2)
            self.send_late_ms_p99 = round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)
            self.send_late_ms_max = round(1000 * ordered[-1], 2)
            over = sum(1 for x in ordered if x > PTIME_S)
            self.send_late_over_20ms_pct = round(100 * over / len(ordered), 2)
        self.send_errors, self.echo_errors, self.stray_packets = c.send_errors, c.echo_errors, c.stray
        self.checked_srtp, self.checked_rtp = c.checks_b, c.checks_a
        self.check_failures = (c.bad_b + c.bad_a)[:10]


def loss_pct(sent: int, received: int) -> float:
    return round(100 * (sent - received) / sent, 3) if sent else 100.0


# --- the ramp -----------------------------------------------------------------------------------------


def run_media_bench(
    counts: list[int], seconds: float, port_range: tuple[int, int], work: Path, log: Log
) -> dict[str, Any]:
    """Ramp `counts` simultaneous calls for `seconds` each (after 1 s of warm-up) through one rtpengine
    on media ports `port_range`; stop after the first count losing MAX_LOSS_PCT or more."""
    limits: list[str] = []
    work.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    with rtpengine(port_range, work, log) as (policy, pid):
        per_call = ports_per_call(policy)
        fits = (port_range[1] - port_range[0] + 1) // per_call
        wanted = sorted(set(counts))
        if any(c > fits for c in wanted):
            # The most the range holds replaces the counts that do not fit: the ramp still ends as
            # high as this run can go.
            limits.append(
                f"counts above {fits} not run (replaced by {fits}): media ports "
                f"{port_range[0]}-{port_range[1]} hold {fits} calls at {per_call} ports each"
            )
            wanted = sorted({c for c in wanted if c <= fits} | {fits})
        flags = product_flags(policy)
        ng = (policy.rtpengine.control_address, policy.rtpengine.control_port)
        idle_rss = rss_bytes(pid)
        traffic = Traffic(pid, port_range)
        try:
            for index, count in enumerate(wanted):
                step = run_step(
                    ng, flags, traffic, index=index, count=count, seconds=seconds, idle_rss=idle_rss
                )
                steps.append(step)
                log(step_line(step))
                if max(step.loss_rtp_to_srtp_pct, step.loss_srtp_to_rtp_pct) >= MAX_LOSS_PCT:
                    break
        finally:
            traffic.close()
    return summary(steps, flags, idle_rss, limits)


def ports_per_call(policy: Any) -> int:
    """Ports a call takes from the range: RTP + RTCP (rtcp-mux-demux) per side. rtpengine 10.5 keeps
    one port pool per local address (measured: 100 ports held 50 calls with internal and external
    on 127.0.0.1 and 127.0.0.2), so the two sides share a pool only when they share an address."""
    sbc = policy.sbc
    return 4 if sbc.internal.address == sbc.external.address else 2


def run_step(
    ng: tuple[str, int],
    flags: Flags,
    traffic: Traffic,
    *,
    index: int,
    count: int,
    seconds: float,
    idle_rss: int,
) -> Step:
    """Set up `count` calls, run their media, delete them (always)."""
    rss_before = rss_bytes(traffic.rtpengine_pid)
    legs: list[CallLeg] = []
    started = time.monotonic()
    deadline = started + SETUP_LIMIT_S
    relayed = errors = 0
    try:
        for n in range(count):
            if time.monotonic() > deadline:
                raise RuntimeError(f"setting up {count} calls took over {SETUP_LIMIT_S:.0f} s (at call {n})")
            legs.append(set_up_call(ng, flags, n, step=index, a_port=traffic.a_port, b_port=traffic.b_port))
        setup_s = time.monotonic() - started
        step = traffic.run(legs, (index + 1) << 24, seconds)
    finally:
        for leg in legs:
            p, e = delete_call(ng, leg)
            relayed, errors = relayed + p, errors + e
    step.rtpengine_rtp_packets, step.rtpengine_rtp_errors = relayed, errors
    step.rss_before = rss_before
    step.rss_bytes_per_call = round((step.rss_after - idle_rss) / count)
    step.setup_s = round(setup_s, 2)
    return step


def step_line(step: Step) -> str:
    return (
        f"{step.calls:5d} calls: loss RTP->SRTP {step.loss_rtp_to_srtp_pct:.3f}% "
        f"SRTP->RTP {step.loss_srtp_to_rtp_pct:.3f}% (sent {step.sent}, at B {step.received_srtp}, "
        f"back at A {step.received_rtp}); rtpengine {step.rtpengine_cpu_pct_of_core}% of a core, "
        f"generator {step.generator_cpu_pct_of_core}%, machine {step.machine_busy_pct}% busy, "
        f"late p99 {step.send_late_ms_p99} ms, RSS/call {step.rss_bytes_per_call:.0f} B, "
        f"drops gen/rtpengine {step.kernel_drops_generator}/{step.kernel_drops_rtpengine}"
    )


def passed(step: Step) -> bool:
    worst = max(step.loss_rtp_to_srtp_pct, step.loss_srtp_to_rtp_pct)
    return worst < MAX_LOSS_PCT and not step.check_failures and step.received_rtp > 0


def generator_strain(step: Step) -> list[str]:
    """Signs that the generator (this process), not rtpengine, ran out at this step."""
    signs = []
    if step.generator_cpu_pct_of_core > 90:
        signs.append(f"the generator used {step.generator_cpu_pct_of_core}% of a core (one thread)")
    if step.send_late_ms_p99 > 10 or step.send_late_over_20ms_pct > 1:
        signs.append(
            f"the generator sent late (p99 {step.send_late_ms_p99} ms, max {step.send_late_ms_max} ms, "
            f"{step.send_late_over_20ms_pct}% of sends more than one 20 ms interval late)"
        )
    if step.kernel_drops_generator:
        signs.append(
            f"the kernel dropped {step.kernel_drops_generator} packets in the generator's socket buffers"
        )
    if step.send_errors or step.echo_errors:
        signs.append(f"{step.send_errors} sends and {step.echo_errors} echoes failed (socket buffers full)")
    return signs


def others_pct(step: Step, cores: int) -> float:
    """CPU (% of one core) that neither rtpengine nor the generator used during the step."""
    return step.machine_busy_pct * cores - step.rtpengine_cpu_pct_of_core - step.generator_cpu_pct_of_core


def step_notes(steps: list[Step], cores: int) -> list[str]:
    """Per-step signs, one line per kind, naming the steps it applies to."""
    notes = [f"{s.calls} calls: {sign}" for s in steps for sign in generator_strain(s)]
    noisy = [s for s in steps if others_pct(s, cores) > 20]
    if noisy:
        shares = ", ".join(f"{s.calls} calls {others_pct(s, cores):.0f}%" for s in noisy)
        notes.append(
            f"other processes on this machine used CPU meanwhile (% of a core: {shares}): CPU figures "
            "and the ceiling are noisy"
        )
    full = [s for s in steps if s.machine_busy_pct > 90]
    if full:
        shares = ", ".join(f"{s.calls} calls {s.machine_busy_pct}%" for s in full)
        notes.append(
            f"the machine was saturated ({shares} of all {cores} cores busy): rtpengine and the "
            "generator competed for the same cores"
        )
    for s in steps:
        if s.rtpengine_rtp_errors:
            notes.append(
                f"{s.calls} calls: rtpengine counted {s.rtpengine_rtp_errors} RTP errors (not relayed)"
            )
        if s.check_failures:
            notes.append(f"{s.calls} calls: packet checks failed: {'; '.join(s.check_failures[:3])}")
    return notes


def bottleneck(steps: list[Step], cores: int) -> tuple[str, str]:
    """Who limited the ramp, and one sentence why."""
    if not steps:
        return "none", "no step ran"
    last = steps[-1]
    cpu = (
        f"rtpengine {last.rtpengine_cpu_pct_of_core}% of a core, generator "
        f"{last.generator_cpu_pct_of_core}%, other processes {others_pct(last, cores):.0f}%, machine "
        f"{last.machine_busy_pct}% busy"
    )
    strain = generator_strain(last)
    if passed(last):
        if strain:
            return "generator", (
                f"the highest count run ({last.calls}) passed but {'; '.join(strain)}: "
                f"a higher count would measure the generator, not rtpengine ({cpu})"
            )
        return "not reached", f"the highest count run ({last.calls}) passed: the ceiling is above it ({cpu})"
    if strain and last.kernel_drops_rtpengine <= last.kernel_drops_generator:
        starved = (
            "; the generator was starved of CPU on the saturated machine rather than out of a core of its own"
            if last.machine_busy_pct > 90 and last.generator_cpu_pct_of_core <= 90
            else ""
        )
        return (
            "generator",
            f"at {last.calls} calls the loss is the generator's: {'; '.join(strain)} ({cpu}){starved}",
        )
    if last.machine_busy_pct > 90:
        return "machine", (
            f"at {last.calls} calls rtpengine lost packets ({last.kernel_drops_rtpengine} dropped in its "
            f"sockets) on a saturated machine ({cpu}): it ran out of CPU it shared with the generator"
        )
    return "rtpengine", (
        f"at {last.calls} calls rtpengine lost packets ({last.kernel_drops_rtpengine} dropped in its "
        f"sockets) while the generator kept up (late p99 {last.send_late_ms_p99} ms; {cpu})"
    )


def summary(steps: list[Step], flags: Flags, idle_rss: int, limits: list[str]) -> dict[str, Any]:
    info = machine()
    cores = int(info["cores"])
    good = [s for s in steps if passed(s)]
    best = good[-1] if good else None
    who, why = bottleneck(steps, cores)
    notes = [why, *limits, *step_notes(steps, cores)]
    if best is not None and not generator_strain(best):
        notes.append(
            f"the generator at {best.calls} calls: {best.generator_cpu_pct_of_core}% of a core "
            f"({max(0.0, 90 - best.generator_cpu_pct_of_core):.0f} points below the 90% this bench "
            f"treats as saturated), sends late p99 {best.send_late_ms_p99} ms"
        )
    notes.append(
        "Microsoft is a UDP echo: its answer carries rtpengine's own offered key, so the echoed SRTP is "
        "valid under it; both directions are encrypted/decrypted by rtpengine as in a real call, but "
        "both use one key (a real Microsoft has its own) and no RTCP is sent"
    )
    notes.append(
        "RSS per call = (RSS at the end of a step - RSS of the idle daemon) / calls; rtpengine keeps "
        "freed memory, so a step's figure also holds what earlier, larger steps left behind"
    )
    if flags.unmapped:
        notes.append(f"flags sent as bare ng flags (not known to this translation): {flags.unmapped}")
    return {
        "machine": info,
        "media_max_calls": best.calls if best else 0,
        "media_loss_pct": max(best.loss_rtp_to_srtp_pct, best.loss_srtp_to_rtp_pct) if best else None,
        "media_loss_rtp_to_srtp_pct": best.loss_rtp_to_srtp_pct if best else None,
        "media_loss_srtp_to_rtp_pct": best.loss_srtp_to_rtp_pct if best else None,
        "media_rtpengine_cpu_pct_of_core": best.rtpengine_cpu_pct_of_core if best else None,
        "media_rss_bytes_per_call": best.rss_bytes_per_call if best else None,
        "media_limited_by": who,
        "rtpengine_idle_rss": idle_rss,
        "max_loss_pct": MAX_LOSS_PCT,
        "ng_offer": flags.offer,
        "ng_answer": flags.answer,
        "steps": [asdict(s) for s in steps],
        "limits": notes,
    }


# --- command line ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny counts for a few seconds (make test)")
    p.add_argument("--counts", default="", help=f"simultaneous calls per step (default {FULL_COUNTS})")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per step (default 10)")
    p.add_argument("--ports", default="", help=f"rtpengine media ports LO-HI (default {FULL_PORTS})")
    p.add_argument("--output", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (rtpengine log)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c] or ([5, 20] if args.smoke else list(FULL_COUNTS))
    seconds = args.seconds or (2.0 if args.smoke else 10.0)
    if args.ports:
        lo, _, hi = args.ports.partition("-")
        ports = (int(lo), int(hi))
    elif args.smoke:
        # Below the kernel's ephemeral ports and apart from the e2e tests' (21000-29039) and bench.py's
        # smoke windows (29100-29899); the pid spreads parallel smoke runs.
        base = 30000 + (os.getpid() % 20) * 100
        ports = (base, base + 99)
    else:
        ports = FULL_PORTS
    work = Path(tempfile.mkdtemp(prefix="kemi-o365-media-"))

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        result = run_media_bench(counts, seconds, ports, work, log)
    finally:
        if args.keep:
            log(f"(work directory kept: {work})")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    result["smoke"] = bool(args.smoke)
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        log(f"results written to {args.output}")
    log(
        f"media_max_calls={result['media_max_calls']} media_loss_pct={result['media_loss_pct']} "
        f"limited by {result['media_limited_by']}"
    )
    for note in result["limits"]:
        log(f"  - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
