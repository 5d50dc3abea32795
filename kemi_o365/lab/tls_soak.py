"""TLS soak of the SBC's Microsoft-side listener: many short mutual-TLS connections, with calls mixed in.

Why: Kamailio 5.6.3 with OpenSSL 3 (Debian 12) has reported double-free crashes in its tls module
(kamailio#3791, root cause kamailio#3695: the tls module initialises OpenSSL in the main process, so
OpenSSL's thread-local state, e.g. the error queue, is inherited by every forked worker and corrupted
when several workers run OpenSSL at once, most of all on failing handshakes; the fix,
`tls_threads_mode`, exists only from 5.8). This driver churns connections the way a scanner and
Microsoft's own clients do, from several client threads at once:

* ``options``: mutual TLS, one OPTIONS, its 200, close_notify, close;
* ``abrupt``: mutual TLS handshake, then a TCP reset (no close_notify);
* ``resume``: like ``options``, offering the session of an earlier connection (resumption);
* ``no-cert``: no client certificate: the SBC must refuse (handshake alert, close, or 403);
* ``wrong-name``: a certificate of the lab CA naming someone else: the SBC must answer 403;
* ``partial-hello``: part of a real ClientHello, then close (FIN or reset);
* ``plaintext``: a SIP request in clear on the TLS port (what scanners send): must be dropped.

TLS 1.2 and 1.3 alternate. Every ``sip_every`` connections a real call goes CUCM (SIPp) -> SBC ->
Microsoft peer, and one request Microsoft starts on a connection of its own (MWI NOTIFY, Play on
Phone call, re-INVITE in a CUCM call), in turn. The run stops at ``connections`` or ``max_seconds``,
whichever comes first. Kamailio's processes are watched all along: a process gone or a crash
signature in its log counts as a crash; the peak RSS of each process is recorded.

Every address is a loopback one; nothing here kills a process.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemi_o365.lab.demo import (
    SCENARIOS,
    call_outcome,
    cucm_address,
    cucm_uas,
    place_seed_call,
    wait_rtpengine_empty,
)
from kemi_o365.lab.ms_peer import MicrosoftPeer
from kemi_o365.lab.sipp import SippProcess, free_port, run_sipp, start_sipp
from kemi_o365.launch import Stack
from kemi_o365.policy.model import Policy, Transport
from kemi_o365.sipmsg import SipMessage, SipParseError, StreamReader


class Mode(enum.StrEnum):
    """What one soak connection does (see the module docstring)."""

    OPTIONS = "options"
    ABRUPT = "abrupt"
    RESUME = "resume"
    NO_CERT = "no-cert"
    WRONG_NAME = "wrong-name"
    PARTIAL_HELLO = "partial-hello"
    PLAINTEXT = "plaintext"


class Outcome(enum.StrEnum):
    OK = "ok"  # what a legitimate client wanted happened (200, handshake, probe sent)
    REFUSED = "refused"  # the SBC refused, as it must (no certificate, wrong name, plaintext)
    FAILED = "failed"  # anything else: no 200, a good handshake refused, a bad client admitted, timeout


DEFAULT_MIX: tuple[tuple[Mode, int], ...] = (
    (Mode.OPTIONS, 35),
    (Mode.ABRUPT, 20),
    (Mode.RESUME, 10),
    (Mode.NO_CERT, 10),
    (Mode.WRONG_NAME, 5),
    (Mode.PARTIAL_HELLO, 12),
    (Mode.PLAINTEXT, 8),
)

# What a crashing Kamailio writes (q_malloc/f_malloc checks, glibc, handle_sigs in main.c).
CRASH_SIGNATURES: tuple[str, ...] = (
    r"exited by a signal",
    r"\bsignal [0-9]+\b",
    r"core was (?:not )?generated",
    r"double free",
    r"freeing already freed",
    r"free\(\): ",
    r"malloc\(\): ",
    r"core dump",
    r"\bBUG: ",
    r"overwritten",
    r"Segmentation fault",
    r"\bSIGSEGV\b|\bSIGABRT\b",
    r"corrupted (?:size|double-linked|top size|unsorted)",
)
_CRASH_RE = re.compile("|".join(CRASH_SIGNATURES))

_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: bind() leaves the port to connect(), 4-tuple unique
_VERSIONS = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
_MS_KINDS = ("mwi", "play-on-phone", "reinvite")


@dataclass(frozen=True)
class SoakTarget:
    """Where the soak connects and with which credentials (Microsoft's, from the lab PKI)."""

    listener: tuple[str, int]
    sbc_fqdn: str
    cert: Path
    key: Path
    ca: Path
    ca_key: Path | None = None
    """The lab CA's key, to sign the ``wrong-name`` certificate; None leaves that mode out."""
    source_ip: str = "127.0.0.3"

    @classmethod
    def for_lab(cls, policy: Policy, pki: Path) -> SoakTarget:
        ext = policy.sbc.external
        sources = policy.microsoft.sources
        source = str(sources[0].network_address) if sources else "127.0.0.3"
        ca_key = pki / "ca.key"
        return cls(
            listener=(ext.address, ext.port),
            sbc_fqdn=policy.sbc.fqdn,
            cert=pki / "ms.crt",
            key=pki / "ms.key",
            ca=pki / "ca.crt",
            ca_key=ca_key if ca_key.is_file() else None,
            source_ip=source,
        )


@dataclass(frozen=True)
class SoakConfig:
    connections: int = 3000
    max_seconds: float = 75.0
    threads: int = 8
    sip_every: int = 300
    """After every this many connections: one CUCM call and one request Microsoft starts (0: none)."""
    mix: tuple[tuple[Mode, int], ...] = DEFAULT_MIX
    io_timeout: float = 5.0
    monitor_interval: float = 0.25


@dataclass
class SoakResult:
    connections_attempted: int = 0
    connections_ok: int = 0
    connections_refused: int = 0
    connections_failed: int = 0
    by_mode: dict[str, dict[str, int]] = field(default_factory=dict)
    tls_versions: dict[str, int] = field(default_factory=dict)
    sessions_resumed: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    ms_requests_ok: int = 0
    ms_requests_failed: int = 0
    ms_by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    """The first problems seen (connections, calls, Microsoft's requests), for the report."""
    seconds: float = 0.0
    connections_per_second: float = 0.0
    stopped_by: str = "count"
    crashes: int = 0
    crash_evidence: list[str] = field(default_factory=list)
    kamailio_processes: int = 0
    kamailio_rss_max_mb: float = 0.0
    """The highest peak RSS (VmHWM) of any one Kamailio process."""
    kamailio_rss_total_start_mb: float = 0.0
    kamailio_rss_total_end_mb: float = 0.0
    kamailio_rss_total_max_mb: float = 0.0

    @property
    def calls(self) -> int:
        return self.calls_ok + self.calls_failed

    @property
    def ms_requests(self) -> int:
        return self.ms_requests_ok + self.ms_requests_failed

    def summary_line(self) -> str:
        return (
            f"tls soak: {self.connections_attempted} TLS connections ({self.connections_ok} ok, "
            f"{self.connections_refused} refused as expected) + {self.calls} calls + {self.ms_requests} "
            f"Microsoft-initiated requests in {self.seconds:.1f} s, "
            f"{self.connections_per_second:.0f} conn/s, "
            f"{self.crashes} crashes, Kamailio RSS max {self.kamailio_rss_max_mb:.1f} MB"
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary_line()
        return data


# ----- one connection ---------------------------------------------------------------------------


class _Contexts:
    """Client SSL contexts per (credentials, version), built once and shared by the threads."""

    def __init__(self, target: SoakTarget, wrong_name: tuple[Path, Path] | None) -> None:
        self.full = {v: _client_ctx(target, v, (target.cert, target.key)) for v in _VERSIONS}
        self.bare = {v: _client_ctx(target, v, None) for v in _VERSIONS}
        self.wrong = {v: _client_ctx(target, v, wrong_name) for v in _VERSIONS} if wrong_name else {}


def _client_ctx(
    target: SoakTarget, version: ssl.TLSVersion, pair: tuple[Path, Path] | None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(target.ca))
    ctx.minimum_version = ctx.maximum_version = version
    if pair is not None:
        ctx.load_cert_chain(pair[0], pair[1])
    return ctx


class _Connector:
    """Runs one connection of a given mode; per-thread state is the resumable session per version."""

    def __init__(self, target: SoakTarget, contexts: _Contexts, io_timeout: float) -> None:
        self.target = target
        self.ctx = contexts
        self.io_timeout = io_timeout
        self.local = threading.local()

    def run(self, mode: Mode, version: ssl.TLSVersion, index: int) -> tuple[Outcome, str, bool]:
        """(outcome, why when not OK, whether the session was resumed)."""
        try:
            match mode:
                case Mode.OPTIONS | Mode.RESUME:
                    return self._options(version, index, resume=mode is Mode.RESUME)
                case Mode.ABRUPT:
                    return self._abrupt(version), "", False
                case Mode.NO_CERT:
                    return self._refused(self.ctx.bare[version], index, "no certificate"), "", False
                case Mode.WRONG_NAME:
                    return self._refused(self.ctx.wrong[version], index, "wrong name"), "", False
                case Mode.PARTIAL_HELLO:
                    return self._partial_hello(version, index), "", False
                case Mode.PLAINTEXT:
                    return self._plaintext(index), "", False
        except _Unexpected as exc:
            return Outcome.FAILED, f"{mode}/{version.name}: {exc}", False
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return Outcome.FAILED, f"{mode}/{version.name}: {type(exc).__name__}: {exc}", False

    # -- modes --

    def _options(self, version: ssl.TLSVersion, index: int, *, resume: bool) -> tuple[Outcome, str, bool]:
        sessions: dict[ssl.TLSVersion, ssl.SSLSession] = self.local.__dict__.setdefault("sessions", {})
        session = sessions.get(version) if resume else None
        raw = self._tcp()
        try:
            tls = self.ctx.full[version].wrap_socket(
                raw, server_hostname=self.target.sbc_fqdn, session=session
            )
        except BaseException:
            raw.close()
            raise
        with tls:
            answer = self._ask(tls, index)
            if answer is None or answer.is_request or answer.status != 200:
                raise _Unexpected(f"OPTIONS answered {_first_line(answer)}")
            reused = bool(tls.session_reused)
            if tls.session is not None:
                sessions[version] = tls.session
            _close_notify(tls)
        return Outcome.OK, "", reused

    def _abrupt(self, version: ssl.TLSVersion) -> Outcome:
        raw = self._tcp()
        try:
            tls = self.ctx.full[version].wrap_socket(raw, server_hostname=self.target.sbc_fqdn)
        except BaseException:
            raw.close()
            raise
        _reset(tls)
        return Outcome.OK

    def _refused(self, ctx: ssl.SSLContext, index: int, what: str) -> Outcome:
        raw = self._tcp()
        try:
            # TLS 1.3: the client's handshake ends before the server checked its certificate; the
            # refusal (alert, close) then shows on the first read.
            tls = ctx.wrap_socket(raw, server_hostname=self.target.sbc_fqdn)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            raw.close()
            return Outcome.REFUSED
        except BaseException:
            raw.close()
            raise
        with tls:
            try:
                answer = self._ask(tls, index)
            except (ssl.SSLError, ConnectionError):
                return Outcome.REFUSED
            if answer is None or (not answer.is_request and answer.status == 403):
                return Outcome.REFUSED
            raise _Unexpected(f"{what}: admitted, OPTIONS answered {_first_line(answer)}")

    def _partial_hello(self, version: ssl.TLSVersion, index: int) -> Outcome:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.ctx.full[version].wrap_bio(incoming, outgoing, server_hostname=self.target.sbc_fqdn)
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        cut = random.Random(index).randrange(1, len(hello))
        raw = self._tcp()
        try:
            raw.sendall(hello[:cut])
        finally:
            if index % 2:
                _reset(raw)
            else:
                raw.close()
        return Outcome.OK

    def _plaintext(self, index: int) -> Outcome:
        raw = self._tcp()
        with raw:
            raw.sendall(_options_request(self.target, raw, index).to_bytes())
            raw.settimeout(min(self.io_timeout, 2.0))
            try:
                data = raw.recv(4096)
            except (ConnectionError, TimeoutError):
                return Outcome.REFUSED
            if data.startswith(b"SIP/2.0 2"):
                raise _Unexpected(f"plaintext SIP answered {data[:40]!r}")
            return Outcome.REFUSED

    # -- helpers --

    def _tcp(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.settimeout(self.io_timeout)
            sock.bind((self.target.source_ip, 0))
            sock.connect(self.target.listener)
        except BaseException:
            sock.close()
            raise
        return sock

    def _ask(self, tls: ssl.SSLSocket, index: int) -> SipMessage | None:
        """Send one OPTIONS and read the answer; None if the SBC closed the connection first."""
        tls.sendall(_options_request(self.target, tls, index).to_bytes())
        reader = StreamReader()
        while True:
            data = tls.recv(65535)
            if not data:
                return None
            try:
                msgs = reader.feed(data)
            except SipParseError as exc:
                raise _Unexpected(f"unreadable answer: {exc}") from exc
            if msgs:
                return msgs[0]


class _Unexpected(Exception):
    """A connection did something the soak did not expect of it."""


def _options_request(target: SoakTarget, sock: socket.socket, index: int) -> SipMessage:
    port = sock.getsockname()[1]
    host = target.source_ip
    return SipMessage(
        f"OPTIONS sip:{target.sbc_fqdn}:{target.listener[1]};transport=tls SIP/2.0",
        [
            ("Via", f"SIP/2.0/TLS {host}:{port};branch=z9hG4bK-soak-{index}-{port}"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:soak@{host}>;tag=soak{index}"),
            ("To", f"<sip:{target.sbc_fqdn}>"),
            ("Call-ID", f"soak-{index}-{port}@{host}"),
            ("CSeq", "1 OPTIONS"),
        ],
    )


def _first_line(msg: SipMessage | None) -> str:
    return "nothing (connection closed)" if msg is None else msg.start_line


def _close_notify(tls: ssl.SSLSocket) -> None:
    """Send close_notify and close; the SBC's own close_notify is not waited for long."""
    tls.settimeout(0.2)
    with contextlib.suppress(OSError, ValueError):
        tls.unwrap()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST: SO_LINGER on, zero seconds (no close_notify, no FIN)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ----- Kamailio's processes ---------------------------------------------------------------------


def _group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (the lab starts Kamailio in its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def _status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def _kb(value: str | None) -> float:
    return float(value.split()[0]) if value else 0.0


class _Monitor:
    """Samples every Kamailio process: alive (not a zombie), RSS, peak RSS."""

    def __init__(self, stack: Stack, interval: float) -> None:
        proc = stack.procs["kamailio"]
        self.main = proc
        self.pids = _group_pids(proc.pid)
        self.interval = interval
        self.gone: dict[int, str] = {}
        self.hwm_kb: dict[int, float] = {}
        self.total_kb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tls-soak-monitor", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        total = 0.0
        for pid in self.pids:
            status = _status(pid)
            if status is None or status.get("State", "").startswith(("Z", "X")):
                self.gone.setdefault(pid, "zombie" if status else "gone")
                continue
            total += _kb(status.get("VmRSS"))
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0.0), _kb(status.get("VmHWM")))
        if self.main.poll() is not None:
            self.gone.setdefault(self.main.pid, f"main process exited with {self.main.returncode}")
        self.total_kb.append(total)

    @property
    def crashed(self) -> bool:
        return bool(self.gone)


def crash_lines(log: Path, *, start: int = 0, limit: int = 20) -> list[str]:
    """Lines of Kamailio's log (from byte `start`) that look like a crash (CRASH_SIGNATURES)."""
    try:
        with log.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if _CRASH_RE.search(ln)][:limit]


# ----- SIP traffic between the connections ------------------------------------------------------


class _SipTraffic:
    """One CUCM call and one request Microsoft starts, each time the soak passes a mark."""

    def __init__(self, policy: Policy, peer: MicrosoftPeer, workdir: Path, result: SoakResult) -> None:
        self.policy = policy
        self.peer = peer
        self.workdir = workdir
        self.result = result
        self.rounds = itertools.count()
        self.listener = (policy.sbc.external.address, policy.sbc.external.port)
        internal = policy.sbc.internal
        self.cucm_target = f"{internal.address}:{internal.port}"

    def round(self, note: Callable[[str], None]) -> None:
        n = next(self.rounds)
        ok, why = self._guard(lambda: self._cucm_call(n))
        self.result.calls_ok += ok
        self.result.calls_failed += not ok
        if not ok:
            note(f"call {n}: {why}")
        kind = _MS_KINDS[n % len(_MS_KINDS)]
        steps = {"mwi": self._mwi, "play-on-phone": self._play_on_phone, "reinvite": self._reinvite}
        ok, why = self._guard(lambda: steps[kind](n))
        self.result.ms_by_kind[kind] = self.result.ms_by_kind.get(kind, 0) + 1
        self.result.ms_requests_ok += ok
        self.result.ms_requests_failed += not ok
        if not ok:
            note(f"Microsoft {kind} {n}: {why}")

    @staticmethod
    def _guard(step: Callable[[], str]) -> tuple[bool, str]:
        try:
            why = step()
        except (OSError, RuntimeError, TimeoutError, ValueError, KeyError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        return not why, why

    def _cucm_call(self, n: int) -> str:
        """The seed call; every other one over UDP when CUCM's side listens on UDP, so a SIP worker
        (not only a TCP reader) writes to Microsoft's TLS connection while the soak churns."""
        udp = n % 2 == 1 and Transport.UDP in self.policy.sbc.internal.transports
        if not udp:
            outcome = place_seed_call(self.policy, self.peer, self.workdir / f"call-{n}")
            return "; ".join(outcome.problems)
        cucm_ip = cucm_address(self.policy)
        before = len(self.peer.received)
        result = run_sipp(
            SCENARIOS / "seed-call" / "uac.xml",
            self.cucm_target,
            transport="u1",
            local_ip=cucm_ip,
            media_ip=cucm_ip,
            media_port=free_port(cucm_ip, kind=socket.SOCK_DGRAM),
            timeout_s=20,
            workdir=self.workdir / f"call-{n}-udp",
        )
        outcome = call_outcome(self.policy, self.peer, result, before)
        return "; ".join(f"(UDP) {p}" for p in outcome.problems)

    def _cucm_uas(self, scenario: str, n: int) -> SippProcess:
        cucm = self.policy.cucm
        proc = cucm_uas(self.policy, self.workdir / f"{scenario}-{n}", scenario)
        assert cucm.address is not None
        _wait_listening(cucm.address, cucm.port, proc, 5.0)
        return proc

    def _mwi(self, n: int) -> str:
        with self._cucm_uas("cucm-mwi", n) as cucm:
            final = self.peer.notify_mwi(self.listener, to_user="10048", sbc_fqdn=self.policy.sbc.fqdn)
            result = cucm.wait(20)
        if final.status != 200:
            return f"NOTIFY answered {final.start_line}"
        return "" if result.ok else f"CUCM (SIPp): {result.exit_meaning}"

    def _play_on_phone(self, n: int) -> str:
        with self._cucm_uas("cucm-answers", n) as cucm:
            outcome = self.peer.call(self.listener, to_user="10048", sbc_fqdn=self.policy.sbc.fqdn)
            result = cucm.wait(20)
        if outcome.final.status != 200:
            return f"INVITE answered {outcome.final.start_line}"
        if outcome.bye is None or outcome.bye.status != 200:
            return f"BYE answered {_first_line(outcome.bye)}"
        if not result.ok:
            return f"CUCM (SIPp): {result.exit_meaning}"
        left = wait_rtpengine_empty(self.policy)
        return f"rtpengine still holds {len(left)} session(s)" if left else ""

    def _reinvite(self, n: int) -> str:
        cucm_ip = cucm_address(self.policy)
        start = len(self.peer.received)
        with start_sipp(
            SCENARIOS / "ms-reinvite" / "uac.xml",
            self.cucm_target,
            local_ip=cucm_ip,
            media_ip=cucm_ip,
            keys={"hold_ms": "1500"},
            workdir=self.workdir / f"ms-reinvite-{n}",
            timeout_s=20,
        ) as cucm:
            ack = self.peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "ACK", 10, start=start)
            final = self.peer.reinvite(ack.msg.get("Call-ID"), target=self.listener)
            result = cucm.wait(20)
        if final.status != 200:
            return f"re-INVITE answered {final.start_line}"
        if not result.ok:
            return f"CUCM (SIPp): {result.exit_meaning}"
        left = wait_rtpengine_empty(self.policy)
        return f"rtpengine still holds {len(left)} session(s)" if left else ""


def _wait_listening(ip: str, port: int, proc: SippProcess, timeout: float) -> None:
    """Until a TCP socket listens on ip:port (from /proc/net/tcp; a probe connection would be seen)."""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.running():
        try:
            table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return
        if any(ln.split()[1] == want and ln.split()[3] == "0A" for ln in table):
            return
        time.sleep(0.02)


# ----- the soak ---------------------------------------------------------------------------------


def _schedule(mix: tuple[tuple[Mode, int], ...], has_wrong_name: bool) -> list[Mode]:
    """A deterministic interleaving of the modes by weight (largest remainder first)."""
    weights = [(m, w) for m, w in mix if w > 0 and (has_wrong_name or m is not Mode.WRONG_NAME)]
    total = sum(w for _, w in weights)
    credit = dict.fromkeys((m for m, _ in weights), 0.0)
    out: list[Mode] = []
    for _ in range(total):
        for m, w in weights:
            credit[m] += w / total
        pick = max(credit, key=lambda m: credit[m])
        credit[pick] -= 1.0
        out.append(pick)
    return out


class _Soak:
    def __init__(
        self,
        policy: Policy,
        peer: MicrosoftPeer,
        stack: Stack,
        *,
        workdir: Path,
        config: SoakConfig,
        target: SoakTarget,
    ) -> None:
        self.config = config
        self.result = SoakResult()
        self.lock = threading.Condition()
        self.next_index = itertools.count()
        self.done = 0
        self.deadline = 0.0
        self.finished = False
        wrong = None
        if target.ca_key is not None:
            from kemi_o365.lab.certs import make_leaf

            wrong = make_leaf(workdir / "pki", (target.ca, target.ca_key), "intruder.example.org")
        self.schedule = _schedule(config.mix, wrong is not None)
        self.connector = _Connector(target, _Contexts(target, wrong), config.io_timeout)
        self.sip = _SipTraffic(policy, peer, workdir, self.result)
        self.monitor = _Monitor(stack, config.monitor_interval)
        self.log = stack.run.kamailio_log

    def note(self, problem: str) -> None:
        with self.lock:
            if len(self.result.failures) < 30:
                self.result.failures.append(problem)

    def _stop_now(self) -> bool:
        return time.monotonic() >= self.deadline or self.monitor.crashed

    def _worker(self) -> None:
        while not self._stop_now():
            index = next(self.next_index)
            if index >= self.config.connections:
                return
            mode = self.schedule[index % len(self.schedule)]
            version = _VERSIONS[(index // len(self.schedule)) % len(_VERSIONS)]
            outcome, why, resumed = self.connector.run(mode, version, index)
            with self.lock:
                r = self.result
                r.connections_attempted += 1
                match outcome:
                    case Outcome.OK:
                        r.connections_ok += 1
                    case Outcome.REFUSED:
                        r.connections_refused += 1
                    case Outcome.FAILED:
                        r.connections_failed += 1
                per = r.by_mode.setdefault(str(mode), {})
                per[str(outcome)] = per.get(str(outcome), 0) + 1
                r.tls_versions[version.name] = r.tls_versions.get(version.name, 0) + 1
                r.sessions_resumed += resumed
                self.done += 1
                self.lock.notify_all()
            if why:
                self.note(why)

    def _sip_loop(self) -> None:
        every = self.config.sip_every
        mark = every
        while True:
            with self.lock:
                while self.done < mark and not self.finished and not self._stop_now():
                    self.lock.wait(0.2)
                if self.done < mark or self._stop_now():
                    return
            self.sip.round(self.note)
            mark += every

    def run(self) -> SoakResult:
        cfg = self.config
        self.monitor.start()
        started = time.monotonic()
        self.deadline = started + cfg.max_seconds
        workers = [
            threading.Thread(target=self._worker, name=f"tls-soak-{i}", daemon=True)
            for i in range(cfg.threads)
        ]
        sip = threading.Thread(target=self._sip_loop, name="tls-soak-sip", daemon=True)
        for t in workers:
            t.start()
        if cfg.sip_every > 0:
            sip.start()
        join_by = self.deadline + 4 * cfg.io_timeout
        for t in workers:
            t.join(max(0.0, join_by - time.monotonic()))
        with self.lock:
            self.finished = True
            self.lock.notify_all()
        flood_seconds = time.monotonic() - started
        if cfg.sip_every > 0:
            sip.join(max(0.0, join_by + 60 - time.monotonic()))
        self.monitor.stop()
        r = self.result
        r.seconds = time.monotonic() - started
        r.connections_per_second = r.connections_attempted / flood_seconds if flood_seconds else 0.0
        r.stopped_by = "count" if r.connections_attempted >= cfg.connections else "time"
        if self.monitor.crashed:
            r.stopped_by = "crash"
        self._account_crashes()
        return r

    def _account_crashes(self) -> None:
        r, mon = self.result, self.monitor
        lines = crash_lines(self.log)
        r.crash_evidence = [f"pid {pid}: {what}" for pid, what in sorted(mon.gone.items())] + lines
        # One crash per worker killed by a signal (the main process then stops every other one).
        signalled = sum("exited by a signal" in ln for ln in lines)
        r.crashes = max(signalled, 1 if (mon.gone or lines) else 0)
        r.kamailio_processes = len(mon.pids)
        r.kamailio_rss_max_mb = round(max(mon.hwm_kb.values(), default=0.0) / 1024, 1)
        if mon.total_kb:
            r.kamailio_rss_total_start_mb = round(mon.total_kb[0] / 1024, 1)
            r.kamailio_rss_total_end_mb = round(mon.total_kb[-1] / 1024, 1)
            r.kamailio_rss_total_max_mb = round(max(mon.total_kb) / 1024, 1)


def run_soak(
    policy: Policy,
    peer: MicrosoftPeer,
    stack: Stack,
    workdir: Path,
    config: SoakConfig | None = None,
    *,
    target: SoakTarget | None = None,
    pki: Path | None = None,
) -> SoakResult:
    """Soak the running lab's Microsoft-side TLS listener; see the module docstring.

    `target` defaults to the policy's external listener with the lab PKI in `pki` (Microsoft's
    certificate; default: `workdir.parent / "pki"`, where the lab keeps it). SIPp traces go under
    `workdir`.
    """
    config = config or SoakConfig()
    if target is None:
        target = SoakTarget.for_lab(policy, pki or workdir.parent / "pki")
    workdir.mkdir(parents=True, exist_ok=True)
    return _Soak(policy, peer, stack, workdir=workdir, config=config, target=target).run()
