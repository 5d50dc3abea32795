"""Raw-byte probes of the running SBC for the torture and fuzz tests.

Sends arbitrary bytes (not necessarily SIP) to one of the SBC's listeners over UDP, TCP or mutual TLS
and collects what comes back; plays CUCM as a recording sink; watches Kamailio's processes (PIDs,
resident memory) and log. Loopback addresses only.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from kemi_o365.sipmsg import SipParseError, parse
from tests.e2e.conftest import Lab

CUCM_SOURCE = "127.0.0.4"  # the only source the lab policy admits on the CUCM side
MICROSOFT_SOURCE = "127.0.0.3"  # the Microsoft network of the lab policy (microsoft.sources)
TRANSPORTS = ("udp", "tcp", "tls")
_STATUS = re.compile(rb"^SIP/2\.0 (\d{3})\b")
_TOP_VIA = re.compile(rb"^(?:via|v)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_VIA_PORT = re.compile(r"SIP\s*/\s*[^/\s]+\s*/\s*\S+\s+(\[[^\]]*\]|[^\s:;,]+)(?::(\d+))?")
INTERNAL_ERROR = "internal error in"


@dataclass
class Exchange:
    """What came back for one message: raw replies in order, and how the conversation ended."""

    transport: str
    replies: list[bytes] = field(default_factory=list)
    closed: bool = False
    """The SBC closed the stream connection (TCP/TLS)."""
    error: str | None = None
    """A local socket error (connect/handshake refused...)."""
    elapsed: float = 0.0

    @property
    def statuses(self) -> list[int]:
        out = []
        for raw in self.replies:
            m = _STATUS.match(raw)
            if m:
                out.append(int(m.group(1)))
        return out

    @property
    def final(self) -> int | None:
        return next((s for s in self.statuses if s >= 200), None)

    @property
    def provisional_only(self) -> bool:
        """A transaction left hanging: 1xx, then nothing final within the bound."""
        return bool(self.statuses) and self.final is None

    def outcome(self) -> str:
        """One word for tables: the final status, 'closed', 'dropped' (silence), or the error."""
        if self.error:
            return f"error({self.error})"
        if self.final is not None:
            return str(self.final)
        if self.provisional_only:
            return f"{self.statuses[-1]}-only"
        return "closed" if self.closed else "dropped"


def top_via_port(data: bytes) -> int:
    """Port of the top Via's sent-by (5060 if none or unreadable): where Kamailio sends UDP replies
    when the Via has no rport (it answers the source IP at the Via port, RFC 3261 §18.2.2)."""
    m = _TOP_VIA.search(data.split(b"\r\n\r\n", 1)[0])
    if not m:
        return 5060
    first = m.group(1).decode("latin-1").split(",", 1)[0]
    via = _VIA_PORT.search(first)
    if via and via.group(2) and 0 < int(via.group(2)) < 65536:
        return int(via.group(2))
    return 5060


def _split_replies(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Cut complete messages (by Content-Length) from a stream buffer."""
    out: list[bytes] = []
    while True:
        buffer = buffer.lstrip(b"\r\n")
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return out, buffer
        m = re.search(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)", buffer[:end], re.I | re.M)
        total = end + 4 + (int(m.group(1)) if m else 0)
        if len(buffer) < total:
            return out, buffer
        out.append(buffer[:total])
        buffer = buffer[total:]


def hop_ack(sent: bytes, reply: bytes) -> bytes | None:
    """The ACK for a non-2xx final answer to an INVITE we sent (RFC 3261 §17.1.1.3), so the SBC's
    transaction ends at once instead of retransmitting its answer; None when none is due."""
    status = _STATUS.match(reply)
    if not sent.startswith(b"INVITE ") or status is None or int(status.group(1)) < 300:
        return None
    request_line = sent.split(b"\r\n", 1)[0].split()
    try:
        msg = parse(reply)
        number = int(msg.get("CSeq").split()[0])
    except (SipParseError, ValueError, IndexError):
        return None
    if len(request_line) < 2 or not msg.get_all("Via"):
        return None
    lines = [
        f"ACK {request_line[1].decode('latin-1')} SIP/2.0",
        f"Via: {msg.get_all('Via')[0]}",
        f"From: {msg.get('From')}",
        f"To: {msg.get('To')}",
        f"Call-ID: {msg.get('Call-ID')}",
        f"CSeq: {number} ACK",
        "Max-Forwards: 70",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(errors="replace")


def _ours(sent: bytes, reply: bytes) -> bool:
    """A UDP answer belongs to what we sent when its Call-ID is in it (a late retransmission of an
    earlier answer, to the same Via port, must not be counted for the next message)."""
    m = re.search(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", reply, re.I | re.M)
    return m is None or m.group(1).strip() in sent


def _wait_final(
    sock: socket.socket | ssl.SSLSocket,
    ex: Exchange,
    timeout: float,
    *,
    sent: bytes,
    reply_to: tuple[str, int] | None = None,
) -> None:
    """Collect answers until a final one or `timeout`; ACK a failed INVITE. `reply_to`: UDP target."""
    stream = reply_to is None
    deadline = time.monotonic() + timeout
    buffer = b""
    while ex.final is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not select.select([sock], [], [], remaining)[0]:
            return
        sock.settimeout(max(0.01, min(remaining, 0.2)))
        try:
            data = sock.recv(65535)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            ex.closed = True
            return
        if stream and not data:
            ex.closed = True
            return
        if stream:
            got, buffer = _split_replies(buffer + data)
        else:
            got = [data] if _ours(sent, data) else []
        ex.replies += got
        for reply in got:
            ack = hop_ack(sent, reply)
            if ack is None:
                continue
            with suppress(OSError):
                if reply_to is None:
                    sock.sendall(ack)
                else:
                    sock.sendto(ack, reply_to)


def send_udp(data: bytes, target: tuple[str, int], *, src_ip: str, timeout: float) -> Exchange:
    """One datagram from src_ip at the top Via's port (where the answer comes back)."""
    ex = Exchange("udp")
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((src_ip, top_via_port(data)))
        try:
            sock.sendto(data, target)
        except OSError as exc:  # e.g. a datagram over 64 kB
            ex.error = type(exc).__name__
            return ex
        _wait_final(sock, ex, timeout, sent=data, reply_to=target)
    ex.elapsed = time.monotonic() - start
    return ex


def send_stream(
    data: bytes,
    target: tuple[str, int],
    *,
    src_ip: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> Exchange:
    """One connection (TLS when `tls` is given), the bytes, the replies until a final one, close."""
    ex = Exchange("tls" if tls else "tcp")
    start = time.monotonic()
    try:
        raw = socket.create_connection(target, timeout=3.0, source_address=(src_ip, 0))
    except OSError as exc:
        ex.error = f"connect: {exc}"
        return ex
    sock: socket.socket | ssl.SSLSocket = raw
    try:
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname=server_name)
        sock.sendall(data)
        _wait_final(sock, ex, timeout, sent=data)
    except (ssl.SSLError, OSError) as exc:
        ex.error = f"{type(exc).__name__}: {exc}"
    finally:
        with suppress(OSError):
            sock.close()
        raw.close()
    ex.elapsed = time.monotonic() - start
    return ex


def microsoft_tls_context(lab: Lab) -> ssl.SSLContext:
    """Microsoft's client side: the lab peer's certificate, which the SBC admits (microsoft.trusted_names)."""
    pki = lab.root / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(pki / "ms.crt", pki / "ms.key")
    return ctx


class Sender:
    """Sends raw bytes to the SBC as CUCM (udp, tcp) or as Microsoft (tls)."""

    def __init__(self, lab: Lab, timeout: float) -> None:
        self.lab = lab
        self.timeout = timeout
        self._tls = microsoft_tls_context(lab)
        internal = lab.policy.sbc.internal
        self.cucm_listener = (internal.address, internal.port)

    def send(self, transport: str, data: bytes, timeout: float | None = None) -> Exchange:
        wait = self.timeout if timeout is None else timeout
        if transport == "udp":
            return send_udp(data, self.cucm_listener, src_ip=CUCM_SOURCE, timeout=wait)
        if transport == "tcp":
            return send_stream(data, self.cucm_listener, src_ip=CUCM_SOURCE, timeout=wait)
        return send_stream(
            data,
            self.lab.microsoft_listener,
            src_ip=MICROSOFT_SOURCE,
            timeout=wait,
            tls=self._tls,
            server_name=self.lab.policy.sbc.fqdn,
        )

    def options(self, transport: str, tag: str) -> Exchange:
        """A valid OPTIONS the SBC answers itself (200) on that transport's listener."""
        src = MICROSOFT_SOURCE if transport == "tls" else CUCM_SOURCE
        sbc = self.lab.policy.sbc
        host = sbc.fqdn if transport == "tls" else sbc.internal.address
        data = (
            f"OPTIONS sip:{host} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport.upper()} {src}:5999;branch=z9hG4bK-probe-{tag};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:probe@{src}>;tag=p{tag}\r\n"
            f"To: <sip:{host}>\r\n"
            f"Call-ID: probe-{tag}@{src}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        if transport == "udp":
            # rport: the answer comes back to our ephemeral port, whatever the Via says.
            ex = Exchange("udp")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((src, 0))
                sock.sendto(data, self.cucm_listener)
                _wait_final(sock, ex, 3.0, sent=data, reply_to=self.cucm_listener)
            return ex
        return self.send(transport, data, timeout=3.0)


# ----- CUCM: a recording sink ---------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float
    transport: str
    raw: bytes


class CucmSink:
    """Listens where the SBC sends CUCM's traffic (UDP and TCP), records every message, answers
    each request but ACK with 486 so no transaction or media session stays open."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.received: list[Arrival] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def __enter__(self) -> CucmSink:
        self._udp.bind((self.address, self.port))
        self._tcp.bind((self.address, self.port))
        self._tcp.listen(16)
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, daemon=True, name=f"cucm-sink-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(3.0)
        self._udp.close()
        self._tcp.close()

    def since(self, index: int) -> list[Arrival]:
        with self._lock:
            return self.received[index:]

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def _record(self, transport: str, raw: bytes) -> bytes | None:
        with self._lock:
            self.received.append(Arrival(time.monotonic(), transport, raw))
        return _busy_answer(raw)

    def _serve_udp(self) -> None:
        self._udp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, addr = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._record("udp", data)
            if answer is not None:
                with suppress(OSError):
                    self._udp.sendto(answer, addr)

    def _serve_tcp(self) -> None:
        self._tcp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve_conn(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    data = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                messages, buffer = _split_replies(buffer + data)
                for raw in messages:
                    answer = self._record("tcp", raw)
                    if answer is not None:
                        with suppress(OSError):
                            conn.sendall(answer)


def _busy_answer(raw: bytes) -> bytes | None:
    try:
        msg = parse(raw)
    except (SipParseError, ValueError):
        return None
    if not msg.is_request or msg.method == "ACK":
        return None
    to = msg.get("To")
    if ";tag=" not in to:
        to += ";tag=sink"
    lines = ["SIP/2.0 486 Busy Here"]
    lines += [f"Via: {v}" for v in msg.get_all("Via")]
    lines += [f"From: {msg.get('From')}", f"To: {to}", f"Call-ID: {msg.get('Call-ID')}"]
    lines += [f"CSeq: {msg.get('CSeq')}", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextmanager
def cucm_sink(lab: Lab) -> Iterator[CucmSink]:
    cucm = lab.policy.cucm
    assert cucm.address is not None, "the lab policy names CUCM's address"
    with CucmSink(cucm.address, cucm.port) as sink:
        yield sink


# ----- Kamailio's processes and log ---------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: fields start after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> set[int]:
    """Direct children of `pid` (Kamailio forks all its workers from the main process)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _ppid(int(entry.name)) == pid:
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    return state is not None and state.group(1) not in ("Z", "X")


def rss_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


class KamailioWatch:
    """Kamailio's main PID and its workers: every one must still be there after each message."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.main = lab.stack.procs["kamailio"].pid
        self.workers = self._settled_children()
        assert self.workers, "Kamailio has no worker processes"
        self.log = lab.stack.run.kamailio_log

    def _settled_children(self, timeout: float = 5.0) -> set[int]:
        """The workers once Kamailio has forked them all (RPC answers before the last fork)."""
        deadline = time.monotonic() + timeout
        last = children(self.main)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = children(self.main)
            if now == last:
                return now
            last = now
        return last

    def problems(self) -> list[str]:
        """Empty while Kamailio (main and every worker it started with) is alive and unchanged."""
        out = []
        if self.lab.stack.procs["kamailio"].poll() is not None or not alive(self.main):
            out.append(f"Kamailio main process {self.main} exited")
        now = children(self.main)
        dead = sorted(p for p in self.workers if not alive(p) or p not in now)
        if dead:
            out.append(f"Kamailio workers gone: {dead}")
        new = sorted(now - self.workers)
        if new:
            out.append(f"Kamailio workers replaced/forked: {new}")
        return out

    def rss(self) -> dict[int, int]:
        pids = [self.main, *sorted(self.workers)]
        return {pid: kb for pid in pids if (kb := rss_kb(pid)) is not None}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def internal_errors(self) -> list[str]:
        return [ln for ln in self.log_text().splitlines() if INTERNAL_ERROR in ln]

    def log_excerpt(self, needle: str, context: int = 3, limit: int = 12) -> str:
        lines = self.log_text().splitlines()
        picked: list[str] = []
        for i, ln in enumerate(lines):
            if needle in ln:
                picked += lines[max(0, i - 1) : i + context]
            if len(picked) >= limit:
                break
        return "\n".join(picked[:limit])


class TerminalSummary:
    """A pytest plugin registered at run time: prints a section in the terminal summary."""

    def __init__(self, title: str, lines: list[str]) -> None:
        self.title = title
        self.lines = lines

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.section(self.title)
        for text in self.lines:
            terminalreporter.line(text)
