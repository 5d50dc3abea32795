"""A thin runner for SIPp 3.6.1 (the "sipp-wrapper" lab role): build the command, run it bounded in time,
read back SIPp's own message trace as parsed SIP messages.

Rules: no third-party dependencies; every run has a hard deadline and a process we start is the only
process we ever signal (by its PID / its own process group); lab traffic stays on loopback unless the
caller explicitly allows otherwise.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kemi_o365.sipmsg import SipMessage, SipParseError, parse

SIPP_BINARY = "sipp"

# Keywords our scenarios (sipp-scenarios/*/uac.xml) use. SIPp 3.6.1 refuses to load a scenario with an
# unknown [keyword], while an unused -key is harmless, so the runner always passes these defaults.
DEFAULT_KEYS: Mapping[str, str] = {
    "ruri_host": "pstn-o365.example.com",
    "hold_ms": "500",
}

# SIPp's documented exit codes (docs/sipp.rst "Exit codes", include/defines.h EXIT_*).
EXIT_MEANINGS: Mapping[int, str] = {
    0: "all calls were successful",
    # 1 is also what SIPp 3.6.1 returns when it dies before loading a scenario (bad option, unreadable XML):
    # sipp_exit() forces EXIT_TEST_FAILED when there is no scenario yet (src/sipp.cpp).
    1: "at least one call failed",
    97: "exit on internal command (calls may have been processed) or global timeout",
    99: "normal exit without calls processed",
    254: "bind error: SIPp could not bind its local port (-2)",
    255: "fatal error: SIPp aborted (-1), e.g. connection refused, or global -timeout with -timeout_error",
}

# Grace given to SIPp after its own -timeout before we kill it: it must still close calls and write files.
KILL_GRACE_S = 10.0
# How long stop() waits for SIPp to quit on SIGTERM before killing it.
STOP_GRACE_S = 5.0


def exit_meaning(returncode: int) -> str:
    """Readable meaning of a SIPp exit status (negative: killed by that signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"terminated by {name}"
    return EXIT_MEANINGS.get(returncode, f"unknown exit code {returncode}")


# SIPp's error events: "2026-11-25<TAB>14:49:51.321629<TAB>1795618191.321629: <text>", sometimes with no
# newline between two events in the -error_file.
_ERROR_EVENT = re.compile(r"\d{4}-\d\d-\d\d\t\d\d:\d\d:\d\d\.\d{6}\t\d+\.\d{6}: ")


def sipp_complaint(errors: str, stderr: str) -> str:
    """The last error SIPp reported (error file first, then stderr), on one line; "" if none."""
    for text in (errors, stderr):
        events = [e.strip() for e in _ERROR_EVENT.split(text)[1:] if e.strip()]
        if events:
            return " ".join(events[-1].split())
    return ""


@dataclass(frozen=True)
class TracedMessage:
    """One SIP message as SIPp logged it with -trace_msg."""

    at: float  # epoch seconds
    direction: Literal["sent", "received"]
    transport: str  # UDP, TCP, TLS, SCTP
    # SIPp 3.6.1 does not log the remote address of a message, so this is "" for its traces; kept so that
    # traces from peers which do know it (our Python lab peers) share one type.
    peer: str
    msg: SipMessage

    @property
    def summary(self) -> str:
        arrow = "->" if self.direction == "sent" else "<-"
        return f"{arrow} {self.msg.start_line}"


@dataclass(frozen=True)
class SippResult:
    returncode: int
    exit_meaning: str
    messages: list[TracedMessage]
    errors: str  # content of the -error_file
    stdout: str
    stderr: str
    command: list[str]
    # True when the runner ended SIPp (stop(), or kill at the deadline): SIPp may then still exit 0,
    # since a call cut short is counted neither successful nor failed.
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.interrupted

    def sent(self) -> list[SipMessage]:
        return [t.msg for t in self.messages if t.direction == "sent"]

    def received(self) -> list[SipMessage]:
        return [t.msg for t in self.messages if t.direction == "received"]

    def describe(self) -> str:
        """Multi-line report for assertion messages: command, exit, message flow, errors."""
        lines = [
            "$ " + " ".join(self.command),
            f"exit {self.returncode}: {self.exit_meaning}",
        ]
        lines += [f"  {t.summary}" for t in self.messages]
        if self.errors.strip():
            lines += ["errors:", self.errors.strip()]
        if self.stderr.strip():
            lines += ["stderr:", self.stderr.strip()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# -trace_msg parser.
#
# SIPp 3.6.1 src/socket.cpp writes every message it sends or receives as
#   "----------------------------------------------- 2026-11-25 14:46:34.364410\n"   (localtime, microseconds)
#   "TCP message sent (1290 bytes):\n\n" <exactly 1290 bytes> "\n"
# or
#   "TCP message received [359] bytes :\n\n" <exactly 359 bytes> "\n"
# ("control " precedes "message" for 3PCC control sockets). Other blocks in the same file are notes about
# messages already logged above ("Unexpected TCP message received:", "Ignoring provisional ...",
# "Dead call ...": separator WITHOUT timestamp) or failures ("Error sending ..."), and loose lines such as
# "Problem EAGAIN on socket 6" can appear between blocks. Only the timestamped sent/received blocks are
# messages on the wire, and their byte counts say exactly where each message ends.
# ---------------------------------------------------------------------------------------------------------

_BLOCK = re.compile(
    rb"^-{47} (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})\n"
    rb"(?P<transport>[A-Z]+) (?P<control>control )?message "
    rb"(?:sent \((?P<sent>\d+) bytes\):|received \[(?P<recv>\d+)\] bytes :)\n\n",
    re.MULTILINE,
)


def _trace_time(stamp: bytes, tz: dt.tzinfo | None) -> float:
    naive = dt.datetime.strptime(stamp.decode("ascii"), "%Y-%m-%d %H:%M:%S.%f")
    # tz None: SIPp used the local zone of this machine, which naive .timestamp() assumes too.
    return (naive.replace(tzinfo=tz) if tz else naive).timestamp()


def parse_message_trace(data: bytes | str, *, tz: dt.tzinfo | None = dt.UTC) -> list[TracedMessage]:
    """Parse a SIPp 3.6.1 -trace_msg file into the messages sent and received, in file order.

    tz is the zone SIPp wrote its local time in: run_sipp runs SIPp with TZ=UTC (the default here);
    pass None for a trace written in this machine's local zone.
    """
    raw = data.encode() if isinstance(data, str) else data
    out: list[TracedMessage] = []
    for m in _BLOCK.finditer(raw):
        if m.group("control"):
            continue  # SIPp-to-SIPp 3PCC control traffic, not SIP on the wire
        size = int(m.group("sent") or m.group("recv"))
        body = raw[m.end() : m.end() + size]
        try:
            msg = parse(body)
        except SipParseError:
            continue  # keep-alive CRLFs or garbage: nothing a ladder could show
        out.append(
            TracedMessage(
                at=_trace_time(m.group("ts"), tz),
                direction="sent" if m.group("sent") else "received",
                transport=m.group("transport").decode(),
                peer="",
                msg=msg,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Running SIPp.
# ---------------------------------------------------------------------------------------------------------


def free_port(ip: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port the OS considers free on ip right now (small race: someone may take it before SIPp)."""
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def free_both(ip: str) -> int:
    """A port free for UDP and TCP at once (the SBC's CUCM listener and SIPp as CUCM open both)."""
    for _ in range(50):
        port = free_port(ip, socket.SOCK_STREAM)
        try:
            with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port on {ip} free for both UDP and TCP")


def _host_of(target: str) -> str:
    """Host of a SIPp remote host[:port] argument ("127.0.0.1:5060", "[::1]:5060", "localhost")."""
    if target.startswith("["):
        return target[1 : target.index("]")]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def _check_loopback(**addresses: str) -> None:
    """The lab only ever talks to itself: refuse anything but loopback, before SIPp sends a byte."""
    for what, host in addresses.items():
        if host == "localhost":
            continue
        try:
            loop = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loop = False
        if not loop:
            raise ValueError(f"{what}={host!r} is not a loopback address (pass allow_remote=True to insist)")


def build_command(
    scenario: Path,
    target: str,
    *,
    transport: str,
    local_ip: str,
    local_port: int,
    media_ip: str,
    media_port: int | None,
    service: str,
    keys: Mapping[str, str],
    calls: int,
    rate: float | None,
    timeout_s: float,
    message_file: Path,
    error_file: Path,
    extra_args: Sequence[str],
    sipp: str = SIPP_BINARY,
) -> list[str]:
    """The exact SIPp command line (kept separate so it can be shown and tested without running)."""
    cmd = [sipp, target, "-sf", str(scenario), "-t", transport, "-i", local_ip, "-p", str(local_port)]
    cmd += ["-s", service, "-m", str(calls)]
    if rate is not None:
        cmd += ["-r", f"{rate:g}"]
    # -timeout_error turns SIPp's global timeout into a fatal error (exit 255) instead of a quiet exit 97,
    # so a hung scenario can never pass for a finished one.
    cmd += ["-nostdin", "-timeout", f"{max(1, round(timeout_s * 1000))}ms", "-timeout_error"]
    cmd += ["-trace_msg", "-message_file", str(message_file)]
    cmd += ["-trace_err", "-error_file", str(error_file)]
    cmd += ["-mi", media_ip]
    if media_port is not None:
        cmd += ["-mp", str(media_port)]
    # [rtp_port] is the audio port CUCM's SDP announces. SIPp binds its own -mp port (and +2) for
    # itself, so a test that sends and receives real media passes its own socket's port here.
    rtp_port = {"rtp_port": str(media_port or 6000)}
    for name, value in {**DEFAULT_KEYS, **rtp_port, **keys}.items():
        cmd += ["-key", name, value]
    cmd += list(extra_args)
    return cmd


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""  # SIPp died before creating it (bad option) or had nothing to write


@dataclass
class SippProcess:
    """A SIPp run in the background: wait() for it, or stop() it."""

    command: list[str]
    workdir: Path
    message_file: Path
    error_file: Path
    default_wait_s: float
    _proc: subprocess.Popen[bytes]
    _result: SippResult | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to exit (default: its own -timeout plus a grace); kill it if it does not."""
        if self._result is not None:
            return self._result
        limit = self.default_wait_s if timeout is None else timeout
        try:
            self._proc.wait(limit)
        except subprocess.TimeoutExpired:
            self._kill()
            return self._finish(f"killed by the runner: still running after {limit:g} s", interrupted=True)
        return self._finish(None)

    def stop(self) -> SippResult:
        """Ask SIPp to quit (SIGTERM: it closes its traces and screens), kill it if it will not."""
        if self._result is not None:
            return self._result
        if self._proc.poll() is not None:
            return self._finish(None)  # it had already finished on its own
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._kill()
            return self._finish(
                f"killed by the runner: no exit {STOP_GRACE_S:g} s after SIGTERM", interrupted=True
            )
        return self._finish(
            f"stopped by the runner (SIGTERM), SIPp exit {self._proc.returncode}", interrupted=True
        )

    def _kill(self) -> None:
        # SIPp was started in its own session, so its process group id is its PID: this reaches SIPp
        # and anything it forked, and nothing else.
        with contextlib.suppress(ProcessLookupError):  # already gone by itself
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def _finish(self, override: str | None, *, interrupted: bool = False) -> SippResult:
        code = self._proc.returncode
        errors = _read_text(self.error_file)
        stderr = _read_text(self.workdir / "sipp.stderr")
        meaning = override or exit_meaning(code)
        complaint = sipp_complaint(errors, stderr) if code != 0 else ""
        self._result = SippResult(
            returncode=code,
            # Exit codes alone are coarse (1 covers "a call failed" and "bad option"): add SIPp's own words.
            exit_meaning=f"{meaning}; SIPp: {complaint}" if complaint else meaning,
            messages=parse_message_trace(
                self.message_file.read_bytes() if self.message_file.exists() else b""
            ),
            errors=errors,
            stdout=_read_text(self.workdir / "sipp.stdout"),
            stderr=stderr,
            command=self.command,
            interrupted=interrupted,
        )
        return self._result

    def __enter__(self) -> SippProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sipp(
    scenario: Path,
    target: str,
    *,
    transport: str = "t1",
    local_ip: str = "127.0.0.1",
    local_port: int = 0,
    media_ip: str = "127.0.0.1",
    media_port: int | None = None,
    service: str = "87000",
    keys: Mapping[str, str] | None = None,
    calls: int = 1,
    rate: float | None = None,
    timeout_s: float = 30,
    workdir: Path,
    extra_args: Sequence[str] = (),
    allow_remote: bool = False,
    sipp: str = SIPP_BINARY,
) -> SippProcess:
    """Start SIPp in the background; files (traces, stdout, stderr) go to workdir.

    local_port 0 picks a free port (SIPp itself would fall back to 5060). media_port None lets SIPp bind
    its RTP echo socket on the first free even port from 6000.
    """
    if not allow_remote:
        _check_loopback(target=_host_of(target), local_ip=local_ip, media_ip=media_ip)
    # SIPp runs with cwd=workdir, so every path it gets must be absolute.
    scenario, workdir = scenario.resolve(), workdir.resolve()
    if not scenario.is_file():
        raise FileNotFoundError(scenario)
    workdir.mkdir(parents=True, exist_ok=True)
    message_file = workdir / "messages.log"
    error_file = workdir / "errors.log"
    for stale in (message_file, error_file):
        stale.unlink(missing_ok=True)  # SIPp appends; an old run must not leak into this result
    command = build_command(
        scenario,
        target,
        transport=transport,
        local_ip=local_ip,
        local_port=local_port or free_port(local_ip),
        media_ip=media_ip,
        media_port=media_port,
        service=service,
        keys=keys or {},
        calls=calls,
        rate=rate,
        timeout_s=timeout_s,
        message_file=message_file,
        error_file=error_file,
        extra_args=extra_args,
        sipp=sipp,
    )
    # Output goes to files, not pipes: SIPp redraws its statistics screen all run long and would block on
    # a full pipe nobody reads while the test does something else.
    with (
        open(workdir / "sipp.stdout", "wb") as out,
        open(workdir / "sipp.stderr", "wb") as err,
    ):
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            # SIPp stamps its traces in local time: pin it to UTC so the stamps parse unambiguously.
            env={**os.environ, "TZ": "UTC"},
            start_new_session=True,  # own process group, so a kill reaches SIPp and only SIPp
        )
    return SippProcess(
        command=command,
        workdir=workdir,
        message_file=message_file,
        error_file=error_file,
        default_wait_s=timeout_s + KILL_GRACE_S,
        _proc=proc,
    )


def run_sipp(
    scenario: Path,
    target: str,
    *,
    transport: str = "t1",
    local_ip: str = "127.0.0.1",
    local_port: int = 0,
    media_ip: str = "127.0.0.1",
    media_port: int | None = None,
    service: str = "87000",
    keys: Mapping[str, str] | None = None,
    calls: int = 1,
    rate: float | None = None,
    timeout_s: float = 30,
    workdir: Path,
    extra_args: Sequence[str] = (),
    allow_remote: bool = False,
    sipp: str = SIPP_BINARY,
) -> SippResult:
    """Run SIPp to completion (hard limit: timeout_s + KILL_GRACE_S) and return what happened."""
    return start_sipp(
        scenario,
        target,
        transport=transport,
        local_ip=local_ip,
        local_port=local_port,
        media_ip=media_ip,
        media_port=media_port,
        service=service,
        keys=keys,
        calls=calls,
        rate=rate,
        timeout_s=timeout_s,
        workdir=workdir,
        extra_args=extra_args,
        allow_remote=allow_remote,
        sipp=sipp,
    ).wait()
