"""The SIPp runner against real SIPp 3.6.1 and a tiny Python SIP peer, on 127.0.0.1 ports 26000-26999."""

from __future__ import annotations

import datetime as dt
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Literal

import pytest

from kemi_o365.lab.sipp import (
    DEFAULT_KEYS,
    SippResult,
    TracedMessage,
    build_command,
    exit_meaning,
    parse_message_trace,
    run_sipp,
    start_sipp,
)
from kemi_o365.sipmsg import SipMessage, StreamReader, header_param, uri_of

SCENARIOS = Path(__file__).resolve().parents[2] / "sipp-scenarios"
LOOP = "127.0.0.1"


def test_sipp_is_installed() -> None:
    # A missing SIPp fails the suite (make test installs sip-tester); nothing here is skipped.
    assert shutil.which("sipp"), "sipp (Debian sip-tester) is not installed: run `make test`"


def lab_port() -> int:
    """A free TCP port in the range reserved for these tests."""
    for port in random.sample(range(26000, 27000), 1000):
        with socket.socket() as s:
            try:
                s.bind((LOOP, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 26000-26999")


# ---------------------------------------------------------------------------------------------------------
# A minimal SIP UAS over TCP: just enough to drive the three scenarios to their end.
# ---------------------------------------------------------------------------------------------------------

Mode = Literal["answer", "hangup", "ring", "silent"]

ANSWER_SDP = (
    "v=0\r\no=- 85 0 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 26990 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


class TinyUas:
    """answer: 100/180/200 then 200 to BYE; hangup: same but sends BYE itself after the ACK;
    ring: 100/180 then 200 + 487 to CANCEL; silent: 100/180/200 and never a BYE."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.port = lab_port()
        self.received: list[SipMessage] = []
        self.sent: list[SipMessage] = []
        self._invite: SipMessage | None = None
        self._tag = "uas-tag-1"
        self._stop = threading.Event()
        self._server = socket.create_server((LOOP, self.port))
        self._server.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def target(self) -> str:
        return f"{LOOP}:{self.port}"

    def __enter__(self) -> TinyUas:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        reader = StreamReader()
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for msg in reader.feed(data):
                self.received.append(msg)
                self._handle(conn, msg)

    def _send(self, conn: socket.socket, msg: SipMessage) -> None:
        self.sent.append(msg)
        conn.sendall(msg.to_bytes())

    def _reply(self, req: SipMessage, status: str, *, tag: bool = True, sdp: str = "") -> SipMessage:
        headers = [(n, v) for n, v in req.headers if n.lower() in ("via", "from", "call-id", "cseq")]
        to = req.get("To") + (f";tag={self._tag}" if tag and not header_param(req.get("To"), "tag") else "")
        headers.append(("To", to))
        contact = f"<sip:87000@{LOOP}:{self.port};transport=tcp>"
        headers += [("Contact", contact), ("Server", "TinyUas")]
        if status.startswith("200") and req.method == "INVITE":
            # A Record-Route makes SIPp build [routes], as it will behind the SBC.
            headers.insert(0, ("Record-Route", f"<sip:{LOOP}:{self.port};transport=tcp;lr>"))
        if sdp:
            headers.append(("Content-Type", "application/sdp"))
        return SipMessage(f"SIP/2.0 {status}", headers, sdp)

    def _bye(self, invite: SipMessage) -> SipMessage:
        return SipMessage(
            f"BYE {uri_of(invite.get('Contact'))} SIP/2.0",
            [
                ("Via", f"SIP/2.0/TCP {LOOP}:{self.port};branch=z9hG4bK-tinyuas-bye"),
                ("From", f"{invite.get('To')};tag={self._tag}"),
                ("To", invite.get("From")),
                ("Call-ID", invite.get("Call-ID")),
                ("CSeq", "1 BYE"),
                ("Max-Forwards", "70"),
            ],
        )

    def _handle(self, conn: socket.socket, msg: SipMessage) -> None:
        if not msg.is_request:
            return  # the 200 to our BYE
        if msg.method == "INVITE":
            self._invite = msg
            self._send(conn, self._reply(msg, "100 Trying", tag=False))
            self._send(conn, self._reply(msg, "180 Ringing"))
            if self.mode != "ring":
                self._send(conn, self._reply(msg, "200 OK", sdp=ANSWER_SDP))
        elif msg.method == "ACK" and self.mode == "hangup" and self._invite is not None:
            time.sleep(0.2)  # let the call "talk" briefly before Microsoft hangs up
            self._send(conn, self._bye(self._invite))
        elif msg.method in ("BYE", "CANCEL"):
            self._send(conn, self._reply(msg, "200 OK"))
            if msg.method == "CANCEL" and self._invite is not None:
                self._send(conn, self._reply(self._invite, "487 Request Terminated"))


@pytest.fixture
def sipp_port() -> int:
    return lab_port()


def flow(result: SippResult) -> list[tuple[str, str]]:
    """(direction, method-or-status) per traced message, e.g. ("sent", "INVITE"), ("received", "200")."""
    return [
        (t.direction, t.msg.method if t.msg.is_request else f"{t.msg.status} {t.msg.method}")
        for t in result.messages
    ]


def first(result: SippResult, direction: str, label: str) -> TracedMessage:
    for t, f in zip(result.messages, flow(result), strict=True):
        if f == (direction, label):
            return t
    raise AssertionError(f"no {direction} {label}:\n{result.describe()}")


# ---------------------------------------------------------------------------------------------------------
# Scenarios end to end.
# ---------------------------------------------------------------------------------------------------------

SEED_HEADERS = {
    "Supported": ["timer,resource-priority,replaces", "X-cisco-srtp-fallback,X-cisco-original-called"],
    "Min-SE": ["1800"],
    "User-Agent": ["Cisco-CUCM9.1"],
    "CSeq": ["101 INVITE"],
    "Expires": ["180"],
    "Allow-Events": ["presence, kpml"],
    "Cisco-Guid": ["3357373952-0000065536-0000032693-0872546314"],
    "Session-Expires": ["1800"],
    "Max-Forwards": ["70"],
    "Content-Type": ["application/sdp"],
}


def test_seed_call_runs_to_completion_with_every_cucm_header(tmp_path: Path, sipp_port: int) -> None:
    with TinyUas("answer") as uas:
        result = run_sipp(
            SCENARIOS / "seed-call" / "uac.xml",
            uas.target,
            local_port=sipp_port,
            keys={"hold_ms": "300"},
            timeout_s=15,
            workdir=tmp_path,
        )
    assert result.ok, result.describe()
    assert result.exit_meaning == "all calls were successful"
    assert flow(result) == [
        ("sent", "INVITE"),
        ("received", "100 INVITE"),
        ("received", "180 INVITE"),
        ("received", "200 INVITE"),
        ("sent", "ACK"),
        ("sent", "BYE"),
        ("received", "200 BYE"),
    ]
    assert all(t.transport == "TCP" for t in result.messages)

    invite = first(result, "sent", "INVITE").msg
    assert invite.start_line == "INVITE sip:87000@pstn-o365.example.com;transport=tcp SIP/2.0"
    for name, values in SEED_HEADERS.items():
        assert invite.get_all(name) == values, name
    clint = '"10048 - Armstrong, Clint" <sip:10048@127.0.0.1>'
    assert invite.get("Via").startswith(f"SIP/2.0/TCP {LOOP}:{sipp_port};branch=z9hG4bK")
    assert invite.get("From").startswith(clint + ";tag=94213~")
    assert invite.get("To") == "<sip:87000@pstn-o365.example.com>"
    assert invite.get("Date").endswith(" GMT")
    assert invite.get("Call-ID")
    assert invite.get("Call-Info") == (
        "<urn:x-cisco-remotecc:callinfo>; security= NotAuthenticated; gci= 1-4270982, "
        f'<sip:{LOOP}:{sipp_port}>;method="NOTIFY;Event=telephone-event;Duration=500"'
    )
    assert invite.get("P-Asserted-Identity") == clint
    assert invite.get("Remote-Party-ID") == clint + ";party=calling;screen=yes;privacy=off"
    assert invite.get("Contact") == f"<sip:10048@{LOOP}:{sipp_port};transport=tcp>"
    # CUCM's own offer: plain RTP, no crypto, with ptime (the seed shows it only after the SBC rewrote it).
    sdp = invite.sdp_lines
    assert sdp[0] == "v=0"
    assert sdp[1] == f"o=CiscoSystemsCCM-SIP 94213 1 IN IP4 {LOOP}"
    assert f"c=IN IP4 {LOOP}" in sdp
    assert next(ln for ln in sdp if ln.startswith("m=")).endswith(" RTP/AVP 0 101")
    assert sdp[-4:] == [
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "a=ptime:20",
    ]
    assert not any(ln.startswith("a=crypto") for ln in sdp)
    assert int(invite.get("Content-Length")) == len(invite.body.encode())

    # In-dialog requests follow the 200's Contact and Record-Route (rrs="true").
    ack, bye = first(result, "sent", "ACK"), first(result, "sent", "BYE")
    for req, cseq in ((ack.msg, "101 ACK"), (bye.msg, "102 BYE")):
        assert req.ruri == f"sip:87000@{LOOP}:{uas.port};transport=tcp"
        assert req.get("Route") == f"<sip:{LOOP}:{uas.port};transport=tcp;lr>"
        assert req.get("To").endswith(";tag=uas-tag-1")
        assert req.get("CSeq") == cseq
        assert req.get("From") == invite.get("From")
    assert bye.at - ack.at >= 0.3  # -key hold_ms 300
    assert bye.at - ack.at < 5
    # The peer saw what SIPp says it sent.
    assert [m.method for m in uas.received] == ["INVITE", "ACK", "BYE"]
    assert uas.received[0].to_bytes() == invite.to_bytes()


def test_ms_hangup_answers_the_far_side_bye(tmp_path: Path, sipp_port: int) -> None:
    with TinyUas("hangup") as uas:
        proc = start_sipp(
            SCENARIOS / "ms-hangup" / "uac.xml",
            uas.target,
            local_port=sipp_port,
            timeout_s=15,
            workdir=tmp_path,
        )
        result = proc.wait()
    assert result.ok, result.describe()
    assert flow(result)[-3:] == [("sent", "ACK"), ("received", "BYE"), ("sent", "200 BYE")]
    ok_bye = result.messages[-1].msg
    bye = result.messages[-2].msg
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        assert ok_bye.get(name) == bye.get(name), name
    assert uas.received[-1].start_line == "SIP/2.0 200 OK"


def test_cancel_cancels_and_acks_the_487(tmp_path: Path, sipp_port: int) -> None:
    with TinyUas("ring") as uas:
        result = run_sipp(
            SCENARIOS / "cancel" / "uac.xml", uas.target, local_port=sipp_port, timeout_s=15, workdir=tmp_path
        )
    assert result.ok, result.describe()
    assert flow(result) == [
        ("sent", "INVITE"),
        ("received", "100 INVITE"),
        ("received", "180 INVITE"),
        ("sent", "CANCEL"),
        ("received", "200 CANCEL"),
        ("received", "487 INVITE"),
        ("sent", "ACK"),
    ]
    invite, cancel, ack = (first(result, "sent", m).msg for m in ("INVITE", "CANCEL", "ACK"))
    # RFC 3261 9.1 and 17.1.1.3: same R-URI, Via branch, From, Call-ID and CSeq number as the INVITE.
    for req in (cancel, ack):
        assert req.ruri == invite.ruri
        assert req.get("Via") == invite.get("Via")
        for name in ("From", "Call-ID"):
            assert req.get(name) == invite.get(name)
    assert cancel.get("To") == invite.get("To")
    assert cancel.get("CSeq") == "101 CANCEL"
    assert ack.get("CSeq") == "101 ACK"
    assert ack.get("To") == invite.get("To") + ";tag=uas-tag-1"
    assert [m.method for m in uas.received] == ["INVITE", "CANCEL", "ACK"]


def test_closed_port_fails_with_a_readable_reason(tmp_path: Path, sipp_port: int) -> None:
    closed = lab_port()  # nobody listens there
    result = run_sipp(
        SCENARIOS / "seed-call" / "uac.xml",
        f"{LOOP}:{closed}",
        local_port=sipp_port,
        timeout_s=5,
        workdir=tmp_path,
    )
    assert not result.ok
    assert result.returncode != 0
    assert result.exit_meaning
    assert not result.exit_meaning.startswith(("unknown", "killed"))
    assert result.command[:2] == ["sipp", f"{LOOP}:{closed}"]
    assert not [t for t in result.messages if t.direction == "received"]


def test_stop_and_wait_deadline_end_a_call_that_never_ends(tmp_path: Path, sipp_port: int) -> None:
    with TinyUas("silent") as uas:
        proc = start_sipp(
            SCENARIOS / "ms-hangup" / "uac.xml",
            uas.target,
            local_port=sipp_port,
            timeout_s=20,
            workdir=tmp_path / "a",
        )
        t0 = time.monotonic()
        waited = proc.wait(timeout=1.5)  # the scenario waits 30 s for a BYE: the runner must not
        assert time.monotonic() - t0 < 5
        assert waited.exit_meaning.startswith("killed by the runner")
        assert waited.interrupted
        assert waited.returncode == -9
        assert not waited.ok
        assert ("sent", "ACK") in flow(waited)  # the trace was flushed before the kill
        assert proc.stop() is waited  # idempotent

        with start_sipp(
            SCENARIOS / "ms-hangup" / "uac.xml",
            uas.target,
            local_port=lab_port(),
            timeout_s=20,
            workdir=tmp_path / "b",
        ) as proc2:
            deadline = time.monotonic() + 5
            while [m.method for m in uas.received].count("ACK") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # until this second call is up too
            assert proc2.running()
            stopped = proc2.stop()
        assert stopped.interrupted
        assert not stopped.ok  # SIPp itself exits 0 on SIGTERM: a cut call is not counted as failed
        assert stopped.exit_meaning.startswith("stopped by the runner (SIGTERM)")
        assert ("sent", "ACK") in flow(stopped)
        assert not proc2.running()


# ---------------------------------------------------------------------------------------------------------
# Pieces without SIPp.
# ---------------------------------------------------------------------------------------------------------

# Shaped exactly like a SIPp 3.6.1 -trace_msg file (UAC side, TZ=UTC), including the loose lines and the
# untimestamped "Unexpected" note SIPp writes between messages; the runs above parse genuine ones.
_OPTIONS = (
    b"OPTIONS sip:87000@127.0.0.1:26001 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:26002;branch=z9hG4bK-4342-1-0\r\n"
    b"Call-ID: 1-4342@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 3\r\n\r\nabc"
)
_OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:26002;branch=z9hG4bK-4342-1-0\r\n"
    b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)
SAMPLE_TRACE = (
    b"Problem EAGAIN on socket  6 and poll_idx  is 1 \n"
    b"Exit problem event on socket 6 \n"
    b"----------------------------------------------- 2026-11-25 14:44:15.935955\n"
    + b"TCP message sent (%d bytes):\n\n" % len(_OPTIONS)
    + _OPTIONS
    + b"\n"
    b"----------------------------------------------- 2026-11-25 14:44:15.936230\n"
    + b"TCP message received [%d] bytes :\n\n" % len(_OK)
    + _OK
    + b"\n"
    b"-----------------------------------------------\n"
    b"Unexpected TCP message received:\n\n" + _OK + b"\n"
)


def test_parse_message_trace_reads_sipp_blocks() -> None:
    msgs = parse_message_trace(SAMPLE_TRACE)
    assert [(t.direction, t.transport, t.msg.start_line) for t in msgs] == [
        ("sent", "TCP", "OPTIONS sip:87000@127.0.0.1:26001 SIP/2.0"),
        ("received", "TCP", "SIP/2.0 200 OK"),
    ]
    assert msgs[0].msg.body == "abc"  # the trace's own trailing newline is not part of the body
    assert msgs[0].at == pytest.approx(1795617855.935955)  # 2026-11-25 14:44:15.935955 UTC
    assert msgs[1].at - msgs[0].at == pytest.approx(0.000275, abs=1e-6)
    assert msgs[0].peer == ""


def test_parse_message_trace_local_time() -> None:
    local = parse_message_trace(SAMPLE_TRACE, tz=None)[0].at
    naive = dt.datetime(2026, 11, 25, 14, 44, 15, 935955).timestamp()
    assert local == pytest.approx(naive)


def test_parse_message_trace_ignores_control_and_empty() -> None:
    assert parse_message_trace(b"") == []
    control = (
        b"----------------------------------------------- 2026-11-25 14:44:15.935955\n"
        b"TCP control message sent (20 bytes):\n\nSIP/2.0 200 OK\r\n\r\n12\n"
    )
    assert parse_message_trace(control) == []


def test_build_command_is_exactly_what_sipp_gets(tmp_path: Path) -> None:
    cmd = build_command(
        Path("/s/uac.xml"),
        "127.0.0.1:5060",
        transport="t1",
        local_ip="127.0.0.1",
        local_port=26100,
        media_ip="127.0.0.1",
        media_port=26200,
        service="87000",
        keys={"hold_ms": "900", "x": "y"},
        calls=2,
        rate=0.5,
        timeout_s=30,
        message_file=tmp_path / "m.log",
        error_file=tmp_path / "e.log",
        extra_args=["-aa"],
    )
    assert cmd == [
        "sipp", "127.0.0.1:5060", "-sf", "/s/uac.xml", "-t", "t1", "-i", "127.0.0.1", "-p", "26100",
        "-s", "87000", "-m", "2", "-r", "0.5",
        "-nostdin", "-timeout", "30000ms", "-timeout_error",
        "-trace_msg", "-message_file", str(tmp_path / "m.log"),
        "-trace_err", "-error_file", str(tmp_path / "e.log"),
        "-mi", "127.0.0.1", "-mp", "26200",
        "-key", "ruri_host", DEFAULT_KEYS["ruri_host"], "-key", "hold_ms", "900", "-key", "rtp_port", "26200",
        "-key", "x", "y",
        "-aa",
    ]  # fmt: skip


def test_exit_meanings() -> None:
    assert exit_meaning(0) == "all calls were successful"
    assert exit_meaning(1) == "at least one call failed"
    assert "global timeout" in exit_meaning(97)
    assert "without calls" in exit_meaning(99)
    assert exit_meaning(254).startswith("bind error")
    assert exit_meaning(255).startswith("fatal")
    assert exit_meaning(3) == "unknown exit code 3"
    assert exit_meaning(-9) == "terminated by SIGKILL"


@pytest.mark.parametrize(
    ("target", "local_ip"),
    [("192.0.2.1:5060", LOOP), ("127.0.0.1:5060", "0.0.0.0"), ("x.example:5060", LOOP)],
)
def test_refuses_non_loopback(tmp_path: Path, target: str, local_ip: str) -> None:
    with pytest.raises(ValueError, match="not a loopback"):
        start_sipp(SCENARIOS / "seed-call" / "uac.xml", target, local_ip=local_ip, workdir=tmp_path)
