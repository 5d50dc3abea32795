"""`kemi-o365 preflight`: INVITEs from text files and real loopback captures, and the policy's TLS files."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import os
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kemi_o365 import preflight
from kemi_o365.lab.certs import LabPki, make_lab_pki, make_leaf
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy, Profile
from kemi_o365.preflight import (
    CapturedMessage,
    PolicyFinding,
    PreflightInputError,
    check_messages,
    check_policy_files,
    policy_errors,
    read_messages,
    select_invites,
    split_text,
)
from kemi_o365.rules import rules_for
from kemi_o365.sipmsg import parse
from tests.helpers import LAB_POLICY, lab_policy_text
from tests.tshark import LoopbackCapture

SBC_FQDN = "sbc-o365.example.com"
MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
KEY = base64.b64encode(bytes(range(30))).decode()
UM_RULES = len(rules_for(Profile.EXCHANGE_UM))


def _sdp(proto: str, crypto: bool, ip: str) -> str:
    lines = [
        "v=0",
        f"o=CiscoSystemsCCM-SIP 94213 1 IN IP4 {ip}",
        "s=SIP Call",
        f"c=IN IP4 {ip}",
        "t=0 0",
        f"m=audio 31182 {proto} 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
    ]
    if crypto:
        lines.append(f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}")
    lines.append("a=ptime:20")
    return "\r\n".join(lines) + "\r\n"


def cucm_invite(call_id: str = "c81d7600-5db10c85-9501-3402000a@127.0.0.4") -> str:
    """The seed INVITE as CUCM sends it to the SBC (sipp-scenarios/seed-call): plain RTP/AVP."""
    body = _sdp("RTP/AVP", False, "127.0.0.4")
    head = [
        "INVITE sip:87000@pstn-o365.example.com;transport=tcp SIP/2.0",
        "Via: SIP/2.0/TCP 127.0.0.4:5060;branch=z9hG4bK1fd3fd816943",
        'From: "10048 - Armstrong, Clint" <sip:10048@127.0.0.4>;tag=94213~3cc43a48',
        "To: <sip:87000@pstn-o365.example.com>",
        f"Call-ID: {call_id}",
        "Supported: timer,resource-priority,replaces",
        "Min-SE:  1800",
        "User-Agent: Cisco-CUCM9.1",
        "CSeq: 101 INVITE",
        "Contact: <sip:10048@127.0.0.4:5060;transport=tcp>",
        "Max-Forwards: 70",
        "Content-Type: application/sdp",
        f"Content-Length: {len(body)}",
    ]
    return "\r\n".join(head) + "\r\n\r\n" + body


def sbc_invite(call_id: str = "c81d7600-5db10c85-9501-3402000a@127.0.0.4") -> str:
    """The same INVITE as the SBC sends it to Microsoft (seed 000's 'Invite with Offer')."""
    body = _sdp("RTP/SAVP", True, "198.51.100.10")
    head = [
        f"INVITE sip:87000@{MS_FQDN};transport=tls SIP/2.0",
        f"Record-Route: <sip:{SBC_FQDN};transport=tls;r2=on;lr>",
        "Record-Route: <sip:127.0.0.1;transport=tcp;r2=on;lr>",
        f"Via: SIP/2.0/TLS {SBC_FQDN}:5061;branch=z9hG4bKf5ce.075c1223.0",
        "Via: SIP/2.0/TCP 127.0.0.4:5060;branch=z9hG4bK1fd3fd816943",
        f"To: <sip:87000@{MS_FQDN}>",
        'From: "10048 - Armstrong, Clint" <sip:10048@127.0.0.4>;tag=94213~3cc43a48',
        f"Call-ID: {call_id}",
        "CSeq: 101 INVITE",
        f"Contact: <sip:10048@{SBC_FQDN}:5061;transport=tls>",
        "Max-Forwards: 69",
        "Content-Type: application/sdp",
        f"Content-Length: {len(body)}",
    ]
    return "\r\n".join(head) + "\r\n\r\n" + body


def ok_response(invite: str) -> str:
    msg = parse(invite)
    head = [
        "SIP/2.0 200 OK",
        f"Via: {msg.get('Via')}",
        f"From: {msg.get('From')}",
        f"To: {msg.get('To')};tag=ee195713eb",
        f"Call-ID: {msg.get('Call-ID')}",
        "CSeq: 101 INVITE",
        "Content-Length: 0",
    ]
    return "\r\n".join(head) + "\r\n\r\n"


def _write(tmp_path: Path, text: str, name: str = "msgs.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


# ----- text files -----------------------------------------------------------------------------


def test_cucm_invite_fails_srtp_rule_and_sbc_invite_passes(tmp_path: Path) -> None:
    cucm = read_messages(_write(tmp_path, cucm_invite(), "cucm.txt"))
    sbc = read_messages(_write(tmp_path, sbc_invite(), "sbc.txt"))
    [bad] = check_messages(cucm, Profile.EXCHANGE_UM)
    [good] = check_messages(sbc, Profile.EXCHANGE_UM, expected_sbc_fqdn=SBC_FQDN)
    assert [v.rule.name for v in bad.violations] == ["srtp-required"]
    assert "RTP/AVP" in bad.violations[0].detail
    assert bad.rules_checked == UM_RULES
    assert good.ok and good.violations == ()


def test_crlf_and_lf_files_read_the_same_message(tmp_path: Path) -> None:
    crlf = read_messages(_write(tmp_path, cucm_invite(), "crlf.txt"))
    lf = read_messages(_write(tmp_path, cucm_invite().replace("\r\n", "\n"), "lf.txt"))
    assert len(crlf) == len(lf) == 1
    assert lf[0].msg.to_bytes() == crlf[0].msg.to_bytes() == parse(cucm_invite()).to_bytes()
    assert (lf[0].src, lf[0].dst, lf[0].transport, lf[0].time, lf[0].index) == ("", "", "", None, 1)


def test_content_length_counted_on_lf_lines_is_fixed_up() -> None:
    # Someone typed the message with LF and counted its body that way: 11 fewer bytes than on the wire.
    lf_body = _sdp("RTP/AVP", False, "127.0.0.4").replace("\r\n", "\n")
    text = cucm_invite().replace("\r\n", "\n").split("\n\n", 1)[0]
    text = text.rsplit("\n", 1)[0] + f"\nContent-Length: {len(lf_body)}\n\n" + lf_body
    [msg] = split_text(text)
    assert msg.body == _sdp("RTP/AVP", False, "127.0.0.4")
    assert msg.get("Content-Length") == str(len(msg.body.encode()))


def test_wrong_content_length_falls_back_to_the_block(tmp_path: Path) -> None:
    text = cucm_invite().replace(f"Content-Length: {len(_sdp('RTP/AVP', False, '127.0.0.4'))}", "l: 9999")
    [msg] = split_text(text + "\r\n\r\n" + sbc_invite())[:1]
    assert msg.sdp_lines[-1] == "a=ptime:20"
    assert msg.get("Content-Length") == str(len(msg.body.encode()))


def test_tcp_stream_concatenation_is_cut_by_content_length() -> None:
    stream = cucm_invite("a@x") + ok_response(cucm_invite("a@x")) + "\r\n\r\n" + sbc_invite("b@x")
    msgs = split_text(stream)
    assert [m.start_line.split()[0] for m in msgs] == ["INVITE", "SIP/2.0", "INVITE"]
    assert [m.get("Call-ID") for m in msgs] == ["a@x", "a@x", "b@x"]
    assert msgs[0].body == _sdp("RTP/AVP", False, "127.0.0.4")


def test_blank_line_blocks_with_prose_around_them() -> None:
    text = (
        "Invite with Offer\n\n"
        + cucm_invite("a@x").replace("\r\n", "\n")
        + "\n\nOK with Answer\n\n"
        + ok_response(cucm_invite("a@x")).replace("\r\n", "\n")
        + "\n"
        + sbc_invite("b@x").replace("\r\n", "\n")
        + "\n\n\n-- end of capture --\n"
    )
    msgs = split_text(text)
    assert [m.get("Call-ID") for m in msgs] == ["a@x", "a@x", "b@x"]
    assert msgs[0].sdp_lines[-1] == "a=ptime:20"
    # The trailing prose is after the last message's body, not part of it (Content-Length held).
    assert "end of capture" not in msgs[2].body


def test_headers_only_message_without_blank_line_before_next() -> None:
    text = "OPTIONS sip:a@b SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nCall-ID: 1\n" + cucm_invite()
    msgs = split_text(text)
    assert [m.method for m in msgs] == ["OPTIONS", "INVITE"]
    assert msgs[0].body == ""


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"hello world\nno sip here\n", "no SIP message found"),
        (b"\x00\x01\x02binary", "binary data"),
        (b"\xff\xfe INVITE", "not UTF-8"),
        (b"INVITE sip:a@b SIP/2.0\nthis line has no colon\n\n", "header line without colon"),
    ],
)
def test_unreadable_text_raises(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(PreflightInputError, match=why):
        read_messages(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(PreflightInputError, match="cannot read"):
        read_messages(tmp_path / "nope.pcap")


# ----- which INVITEs --------------------------------------------------------------------------


def _cm(text: str, src: str = "", dst: str = "") -> CapturedMessage:
    return CapturedMessage(parse(text), src, dst, "udp" if src else "")


def test_only_initial_invites_are_checked_and_retransmissions_once() -> None:
    reinvite = sbc_invite("a@x").replace(f"To: <sip:87000@{MS_FQDN}>", f"To: <sip:87000@{MS_FQDN}>;tag=t1")
    msgs = [
        _cm(cucm_invite("a@x"), "127.0.0.4:5060", "127.0.0.1:5060"),
        _cm(cucm_invite("a@x"), "127.0.0.4:5060", "127.0.0.1:5060"),  # UDP retransmission
        _cm(ok_response(cucm_invite("a@x")), "127.0.0.1:5060", "127.0.0.4:5060"),
        _cm(reinvite, "127.0.0.2:5061", "127.0.0.3:5061"),
        _cm(sbc_invite("a@x"), "127.0.0.2:5061", "127.0.0.3:5061"),
    ]
    picked = select_invites(msgs)
    assert [(c.dst, c.msg.get("Call-ID")) for c in picked] == [
        ("127.0.0.1:5060", "a@x"),
        ("127.0.0.3:5061", "a@x"),
    ]


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        (None, ["127.0.0.1:5060", "127.0.0.3:5061"]),
        ("127.0.0.3", ["127.0.0.3:5061"]),  # destination IP
        (MS_FQDN.upper(), ["127.0.0.3:5061"]),  # Request-URI host, case-insensitive
        ("pstn-o365.example.com", ["127.0.0.1:5060"]),
        ("192.0.2.1", []),
    ],
)
def test_to_filter(to: str | None, expected: list[str]) -> None:
    msgs = [
        _cm(cucm_invite("a@x"), "127.0.0.4:5060", "127.0.0.1:5060"),
        _cm(sbc_invite("a@x"), "127.0.0.2:40000", "127.0.0.3:5061"),
    ]
    assert [c.dst for c in select_invites(msgs, to=to)] == expected


def test_destination_host_override_is_used_for_the_to_rule() -> None:
    [finding] = check_messages([_cm(sbc_invite())], Profile.EXCHANGE_UM, destination_host="other.example.net")
    assert [v.rule.name for v in finding.violations] == ["to-host-is-destination"]


def test_teams_profile_uses_expected_sbc_fqdn() -> None:
    [f] = check_messages([_cm(sbc_invite())], Profile.TEAMS_DIRECT_ROUTING, expected_sbc_fqdn="x.example.com")
    assert [v.rule.name for v in f.violations] == ["contact-is-paired-sbc-fqdn"]
    [f] = check_messages([_cm(sbc_invite())], Profile.TEAMS_DIRECT_ROUTING, expected_sbc_fqdn=SBC_FQDN)
    assert f.ok


# ----- the command line -----------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`preflight` through a throwaway parser, as cli.py will register it."""
    parser = argparse.ArgumentParser(prog="kemi-o365")
    sub = parser.add_subparsers(dest="command", required=True)
    preflight.add_parser(sub)
    args = parser.parse_args(["preflight", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = preflight.run(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_text_file_failing_invite(tmp_path: Path) -> None:
    path = _write(tmp_path, cucm_invite())
    code, out, err = run_cli([str(path)])
    assert code == preflight.EXIT_FAILED == 1
    assert err == ""
    assert out.splitlines() == [
        f"{path} message 1: INVITE sip:87000@pstn-o365.example.com;transport=tcp "
        "(Call-ID c81d7600-5db10c85-9501-3402000a@127.0.0.4)",
        "  FAIL srtp-required (488 Not Acceptable Here): audio is offered as RTP/AVP, not RTP/SAVP: "
        "'m=audio 31182 RTP/AVP 0 101'",
        "preflight FAILED: 1 INVITE checked against exchange-um rules: 1 would be refused (1 rule failure)",
    ]


def test_cli_text_file_passing_invite(tmp_path: Path) -> None:
    path = _write(tmp_path, ok_response(cucm_invite()) + sbc_invite())
    code, out, _ = run_cli([str(path), "--sbc-fqdn", SBC_FQDN])
    assert code == preflight.EXIT_OK == 0
    assert out.splitlines() == [
        f"{path} message 2: INVITE sip:87000@{MS_FQDN};transport=tls "
        "(Call-ID c81d7600-5db10c85-9501-3402000a@127.0.0.4)",
        f"  ok: passes all {UM_RULES} exchange-um rules",
        "preflight OK: 1 INVITE checked against exchange-um rules: 0 would be refused (0 rule failures)",
    ]


def test_cli_teams_profile_and_to_filter(tmp_path: Path) -> None:
    path = _write(tmp_path, cucm_invite("a@x") + sbc_invite("b@x"))
    code, out, _ = run_cli([str(path), "--profile", "teams-direct-routing", "--to", MS_FQDN])
    assert code == 0
    assert f"passes all {len(rules_for(Profile.TEAMS_DIRECT_ROUTING))} teams-direct-routing rules" in out
    assert "pstn-o365" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a FILE"),
        (["{tmp}/missing.txt"], "cannot read"),
        (["{tmp}/only-ok.txt"], "no initial INVITE among the 1 SIP messages"),
        (["{tmp}/cucm.txt", "--to", "192.0.2.1"], "no initial INVITE toward 192.0.2.1"),
        (["--policy", "{tmp}/missing.yaml"], "policy invalid"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, argv: list[str], message: str) -> None:
    _write(tmp_path, ok_response(cucm_invite()), "only-ok.txt")
    _write(tmp_path, cucm_invite(), "cucm.txt")
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in argv])
    assert code == preflight.EXIT_BAD_INPUT == 2
    assert message in err
    assert out == ""


# ----- captures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    pcap: Path
    keylog: Path
    udp: int
    tcp: int
    tls: int


def _free_port(ip: str, kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _send_udp(port: int) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", port))  # a listener, so no ICMP port-unreachable quotes the INVITE back
        tx.bind(("127.0.0.4", 0))
        for _ in range(2):  # the second is a retransmission, which preflight checks once
            tx.sendto(cucm_invite("u1@127.0.0.4").encode(), ("127.0.0.1", port))
            rx.recv(65535)


def _send_tcp(port: int) -> None:
    with (
        socket.create_server(("127.0.0.1", port)) as srv,
        socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.4", 0)) as c,
    ):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn, _ = srv.accept()
        with conn:
            c.sendall((cucm_invite("t1@127.0.0.4") + cucm_invite("t2@127.0.0.4")).encode())
            # One INVITE in three segments: tshark must reassemble it.
            split = cucm_invite("t3@127.0.0.4").encode()
            for chunk in (split[:100], split[100:400], split[400:]):
                c.sendall(chunk)
                time.sleep(0.05)
            c.shutdown(socket.SHUT_WR)
            conn.settimeout(5)
            while conn.recv(65535):
                pass


def _send_tls(port: int, pki: LabPki, keylog: Path) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.ms_cert, pki.ms_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.ca_cert)
    client.load_cert_chain(pki.sbc_cert, pki.sbc_key)
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # what Microsoft enforces (MICROSOFT-NOTES §1.2)
    client.keylog_filename = str(keylog)  # one side's secrets are enough to decrypt both directions
    with socket.create_server(("127.0.0.3", port)) as srv:
        srv.settimeout(5)
        received: list[bytes] = []

        def serve() -> None:
            raw, _ = srv.accept()
            with server.wrap_socket(raw, server_side=True) as s:
                s.settimeout(5)
                data = b""
                while b"a=ptime:20\r\n" not in data:
                    data += s.recv(65535)
                received.append(data)
                s.sendall(ok_response(sbc_invite("s1@127.0.0.4")).encode())

        thread = threading.Thread(target=serve)
        thread.start()
        raw = socket.create_connection(("127.0.0.3", port), timeout=5, source_address=("127.0.0.2", 0))
        with client.wrap_socket(raw, server_hostname=MS_FQDN) as c:
            c.sendall(sbc_invite("s1@127.0.0.4").encode())
            c.recv(65535)
        thread.join(timeout=10)
        assert received, "the TLS server got nothing"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), SBC_FQDN, MS_FQDN, valid_days=365)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory, pki: LabPki) -> Iterator[Capture]:
    """One real loopback capture: CUCM's INVITEs over UDP and TCP, the SBC's over TLS with a key log."""
    # A missing tshark fails these tests (make test installs it), it never skips them.
    assert shutil.which("tshark"), "tshark is not installed: run `make test` (it installs it)"
    tmp = tmp_path_factory.mktemp("capture")
    cap = Capture(
        pcap=tmp / "legs.pcapng",
        keylog=tmp / "keys.log",
        udp=_free_port("127.0.0.1", socket.SOCK_DGRAM),
        tcp=_free_port("127.0.0.1", socket.SOCK_STREAM),
        tls=_free_port("127.0.0.3", socket.SOCK_STREAM),
    )
    tshark = LoopbackCapture(cap.pcap, [cap.udp, cap.tcp, cap.tls])
    try:
        _send_udp(cap.udp)
        _send_tcp(cap.tcp)
        _send_tls(cap.tls, pki, cap.keylog)
        time.sleep(0.3)  # let the last packets reach the capture buffer
    finally:
        tshark.stop()
    yield cap


def test_capture_without_keylog_has_udp_and_reassembled_tcp(capture: Capture) -> None:
    msgs = read_messages(capture.pcap)
    seen = [(m.transport, m.msg.get("Call-ID"), m.src.split(":")[0], m.dst) for m in msgs]
    udp_dst, tcp_dst = f"127.0.0.1:{capture.udp}", f"127.0.0.1:{capture.tcp}"
    assert seen == [
        ("udp", "u1@127.0.0.4", "127.0.0.4", udp_dst),
        ("udp", "u1@127.0.0.4", "127.0.0.4", udp_dst),
        ("tcp", "t1@127.0.0.4", "127.0.0.4", tcp_dst),
        ("tcp", "t2@127.0.0.4", "127.0.0.4", tcp_dst),
        ("tcp", "t3@127.0.0.4", "127.0.0.4", tcp_dst),
    ]
    # Byte for byte what was sent, body included, whether it came in one segment, two, or three.
    assert all(m.msg.to_bytes() == parse(cucm_invite(m.msg.get("Call-ID"))).to_bytes() for m in msgs)
    assert all(m.time is not None and abs(m.time - time.time()) < 600 for m in msgs)
    assert msgs[2].index == msgs[3].index  # two INVITEs in one frame
    assert msgs[4].index > msgs[3].index


def test_capture_with_keylog_decrypts_the_tls_leg(capture: Capture) -> None:
    msgs = read_messages(capture.pcap, tls_keylog=capture.keylog)
    tls = [m for m in msgs if m.transport == "tls"]
    assert [(m.msg.start_line.split()[0], m.src.split(":")[0], m.dst.split(":")[0]) for m in tls] == [
        ("INVITE", "127.0.0.2", "127.0.0.3"),
        ("SIP/2.0", "127.0.0.3", "127.0.0.2"),
    ]
    assert tls[0].dst == f"127.0.0.3:{capture.tls}"
    assert tls[0].msg.to_bytes() == parse(sbc_invite("s1@127.0.0.4")).to_bytes()


def test_cli_on_capture_reports_cucm_leg_and_passes_microsoft_leg(capture: Capture) -> None:
    argv = [str(capture.pcap), "--tls-keylog", str(capture.keylog), "--sbc-fqdn", SBC_FQDN]
    code, out, err = run_cli(argv)
    assert code == 1, err
    lines = out.splitlines()
    headers = [ln for ln in lines if not ln.startswith("  ")][:-1]
    assert len(headers) == 5  # u1 once (its retransmission skipped), t1, t2, t3, s1
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z frame \d+"
    assert re.fullmatch(
        rf"{stamp} 127\.0\.0\.4:\d+ -> 127\.0\.0\.1:{capture.udp} udp: "
        r"INVITE sip:87000@pstn-o365\.example\.com;transport=tcp \(Call-ID u1@127\.0\.0\.4\)",
        headers[0],
    )
    assert re.fullmatch(
        rf"{stamp} 127\.0\.0\.2:\d+ -> 127\.0\.0\.3:{capture.tls} tls: "
        rf"INVITE sip:87000@{re.escape(MS_FQDN)};transport=tls \(Call-ID s1@127\.0\.0\.4\)",
        headers[4],
    )
    assert (
        lines.count(
            "  FAIL srtp-required (488 Not Acceptable Here): audio is offered as RTP/AVP, not RTP/SAVP: "
            "'m=audio 31182 RTP/AVP 0 101'"
        )
        == 4
    )
    assert lines[-2] == f"  ok: passes all {UM_RULES} exchange-um rules"
    assert lines[-1] == (
        "preflight FAILED: 5 INVITEs checked against exchange-um rules: 4 would be refused (4 rule failures)"
    )


@pytest.mark.parametrize(("to", "code", "fails"), [("127.0.0.3", 0, 0), ("127.0.0.1", 1, 4)])
def test_cli_on_capture_one_leg_at_a_time(capture: Capture, to: str, code: int, fails: int) -> None:
    got, out, _ = run_cli([str(capture.pcap), "--tls-keylog", str(capture.keylog), "--to", to])
    assert got == code
    assert out.count("  FAIL srtp-required ") == fails
    assert out.count("  ok: passes all") == 1 - min(fails, 1)


def test_capture_cut_short_still_reads_what_is_there(capture: Capture, tmp_path: Path) -> None:
    data = capture.pcap.read_bytes()
    cut = tmp_path / "cut.pcapng"
    # Past the UDP packets, into the TCP ones: what a capture still being written looks like.
    cut.write_bytes(data[: data.index(b"t2@127.0.0.4") + 40])
    notes: list[str] = []
    msgs = read_messages(cut, notes=notes)
    assert [m.msg.get("Call-ID") for m in msgs][:2] == ["u1@127.0.0.4", "u1@127.0.0.4"]
    assert any("cut short" in n for n in notes), notes


def test_corrupt_capture_is_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\xd4\xc3\xb2\xa1" + os.urandom(64))
    with pytest.raises(PreflightInputError, match="tshark failed"):
        read_messages(bad)


def test_tshark_is_bounded_in_time(capture: Capture) -> None:
    with pytest.raises(PreflightInputError, match="tshark took more than"):
        read_messages(capture.pcap, timeout=0.001)


def test_missing_keylog_is_bad_input(capture: Capture, tmp_path: Path) -> None:
    with pytest.raises(PreflightInputError, match="TLS key log not found"):
        read_messages(capture.pcap, tls_keylog=tmp_path / "none.log")


# ----- the policy's TLS files -----------------------------------------------------------------

NOW = dt.datetime.now(dt.UTC)


def write_policy(
    tmp_path: Path,
    pki: LabPki,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    profile: str = "exchange-um",
    tls_versions: str = "[TLSv1.2, TLSv1.3]",
) -> Path:
    """The lab policy naming these files (the lab PKI's by default)."""
    text = lab_policy_text(pki.dir, LAB_POLICY)
    for old, new in (
        (f"{pki.dir}/sbc.crt", cert),
        (f"{pki.dir}/sbc.key", key),
        (f"{pki.dir}/ca.crt", ca),
        ("profile: exchange-um", f"profile: {profile}"),
        ("tls_versions: [TLSv1.2, TLSv1.3]", f"tls_versions: {tls_versions}"),
    ):
        assert old in text, old
        if new is not None:
            text = text.replace(old, str(new))
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def policy_with(
    tmp_path: Path,
    pki: LabPki,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    profile: str = "exchange-um",
    tls_versions: str = "[TLSv1.2, TLSv1.3]",
) -> Policy:
    path = write_policy(tmp_path, pki, cert=cert, key=key, ca=ca, profile=profile, tls_versions=tls_versions)
    return load_policy(path)


def leaf(
    tmp_path: Path,
    pki: LabPki,
    *,
    wildcard: bool = False,
    eku_server: bool = True,
    eku_client: bool = True,
    cn: str | None = None,
    san: list[str] | None = None,
) -> tuple[Path, Path]:
    """A lab-CA leaf lasting a year, so only the defect asked for shows."""
    return make_leaf(
        tmp_path / "leaves",
        pki,
        SBC_FQDN,
        wildcard=wildcard,
        eku_server=eku_server,
        eku_client=eku_client,
        cn=cn,
        san=san,
        valid_days=365,
    )


def sign(
    tmp_path: Path,
    stem: str,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    ca: bool = False,
    cn: str = SBC_FQDN,
) -> tuple[Path, Path, x509.Certificate, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]:
    """A certificate make_leaf cannot make (expired, not yet valid, EC, another CA, an intermediate)."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, cert, key


def lab_ca(pki: LabPki) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return cert, key


def findings(policy: Policy, profile: Profile | None = None) -> list[tuple[str, str, str]]:
    """What check_policy_files finds, less the Teams trust-store warning the lab CA always earns
    (it holds no Microsoft root; test_teams_trust_store_needs_both_microsoft_roots covers it)."""
    found = check_policy_files(policy, now=NOW, profile=profile)
    return [(f.severity, f.key, f.message) for f in found if not _roots_warning(f)]


def _roots_warning(f: PolicyFinding) -> bool:
    return f.key == "sbc.tls.ca" and "DigiCert Global Root G2" in f.message


def only(found: list[tuple[str, str, str]], severity: str, key: str, *words: str) -> None:
    """Exactly one finding, of that severity and key, its message holding every word."""
    assert len(found) == 1, found
    assert found[0][:2] == (severity, key), found
    assert all(w in found[0][2] for w in words), found


@pytest.mark.parametrize("profile", ["exchange-um", "teams-direct-routing"])
def test_good_lab_certificate_has_no_findings(tmp_path: Path, pki: LabPki, profile: str) -> None:
    policy = policy_with(tmp_path, pki, profile=profile)
    assert findings(policy) == []
    assert policy_errors(policy) == []


def test_teams_trust_store_needs_both_microsoft_roots(tmp_path: Path, pki: LabPki) -> None:
    policy = policy_with(tmp_path, pki, profile="teams-direct-routing")
    (warning,) = [f for f in check_policy_files(policy, now=NOW) if f.key == "sbc.tls.ca"]
    assert warning.severity == "warning"
    assert "lacks DigiCert Global Root G2, Baltimore CyberTrust Root" in warning.message
    # A bundle with both roots (stand-ins named as Microsoft's) next to the lab CA is complete.
    year = dt.timedelta(days=365)
    roots = [
        sign(tmp_path, stem, None, not_before=NOW - year, not_after=NOW + year, ca=True, cn=cn)[0]
        for stem, cn in (("g2", "DigiCert Global Root G2"), ("baltimore", "Baltimore CyberTrust Root"))
    ]
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + b"".join(r.read_bytes() for r in roots))
    complete = policy_with(tmp_path, pki, ca=bundle, profile="teams-direct-routing")
    assert [f for f in check_policy_files(complete, now=NOW) if f.key == "sbc.tls.ca"] == []
    # Exchange UM never talked to those roots: no such warning there.
    assert [f for f in check_policy_files(policy_with(tmp_path, pki), now=NOW) if f.key == "sbc.tls.ca"] == []


def test_wildcard_under_exchange_um_is_403_error_but_fine_for_teams(tmp_path: Path, pki: LabPki) -> None:
    cert, key = leaf(tmp_path, pki, wildcard=True)
    policy = policy_with(tmp_path, pki, cert=cert, key=key)
    found = findings(policy)
    assert [f[:2] for f in found] == [("error", "sbc.tls.certificate")] * 3
    assert "wildcard name '*.example.com'" in found[0][2] and "403" in found[0][2]
    assert "subject CN '*.example.com' is not exactly the SBC FQDN 'sbc-o365.example.com'" in found[1][2]
    assert "subjectAltName *.example.com lacks" in found[2][2]
    assert findings(policy, Profile.TEAMS_DIRECT_ROUTING) == []
    errors = policy_errors(policy)
    assert len(errors) == 3
    assert errors[0].startswith(f"{cert}: sbc.tls.certificate: wildcard name '*.example.com'")


def test_wildcard_over_two_labels_does_not_cover_for_teams(tmp_path: Path, pki: LabPki) -> None:
    cert, key = leaf(tmp_path, pki, cn="*.com", san=["*.com"])
    only(
        findings(policy_with(tmp_path, pki, cert=cert, key=key), Profile.TEAMS_DIRECT_ROUTING),
        "error",
        "sbc.tls.certificate",
        "neither CN nor subjectAltName covers the SBC FQDN 'sbc-o365.example.com' (names: *.com, *.com)",
    )


@pytest.mark.parametrize("cn", ["other.example.com", "SBC-o365.example.com"])
def test_cn_not_exactly_the_fqdn_is_um_error(tmp_path: Path, pki: LabPki, cn: str) -> None:
    cert, key = leaf(tmp_path, pki, cn=cn, san=[SBC_FQDN])
    policy = policy_with(tmp_path, pki, cert=cert, key=key)
    only(findings(policy), "error", "sbc.tls.certificate", f"subject CN '{cn}' is not exactly", "403")
    assert findings(policy, Profile.TEAMS_DIRECT_ROUTING) == []  # Teams reads the SAN


def test_san_lacking_the_fqdn(tmp_path: Path, pki: LabPki) -> None:
    cert, key = leaf(tmp_path, pki, cn=SBC_FQDN, san=["other.example.com"])
    policy = policy_with(tmp_path, pki, cert=cert, key=key)
    only(findings(policy), "error", "sbc.tls.certificate", "subjectAltName other.example.com lacks")
    only(
        findings(policy, Profile.TEAMS_DIRECT_ROUTING),
        "warning",
        "sbc.tls.certificate",
        "only in the CN",
    )


def test_no_san_at_all_is_a_um_warning(tmp_path: Path, pki: LabPki) -> None:
    cert, key = leaf(tmp_path, pki, san=[])
    policy = policy_with(tmp_path, pki, cert=cert, key=key)
    only(findings(policy), "warning", "sbc.tls.certificate", "no subjectAltName")
    assert findings(policy, Profile.TEAMS_DIRECT_ROUTING) == []


@pytest.mark.parametrize(
    ("flags", "missing"),
    [
        ({"eku_client": False}, "clientAuth"),
        ({"eku_server": False}, "serverAuth"),
        ({"eku_server": False, "eku_client": False}, "serverAuth and clientAuth"),
    ],
)
def test_missing_eku_is_teams_error_um_warning(
    tmp_path: Path, pki: LabPki, flags: dict[str, bool], missing: str
) -> None:
    cert, key = leaf(
        tmp_path, pki, eku_server=flags.get("eku_server", True), eku_client=flags.get("eku_client", True)
    )
    policy = policy_with(tmp_path, pki, cert=cert, key=key, profile="teams-direct-routing")
    only(findings(policy), "error", "sbc.tls.certificate", f"lacks {missing}:", "2024-03-19")
    only(findings(policy, Profile.EXCHANGE_UM), "warning", "sbc.tls.certificate", f"lacks {missing}:")


def test_expired_and_not_yet_valid_are_errors_soon_expiring_a_warning(tmp_path: Path, pki: LabPki) -> None:
    day = dt.timedelta(days=1)
    for stem, start, end, severity, words in (
        ("expired", NOW - 400 * day, NOW - day, "error", "certificate expired"),
        ("future", NOW + day, NOW + 400 * day, "error", "certificate not valid before"),
        ("soon", NOW - day, NOW + 10 * day, "warning", "expires"),
    ):
        cert, key, _, _ = sign(tmp_path, stem, lab_ca(pki), not_before=start, not_after=end)
        only(findings(policy_with(tmp_path, pki, cert=cert, key=key)), severity, "sbc.tls.certificate", words)


def test_key_that_does_not_match(tmp_path: Path, pki: LabPki) -> None:
    policy = policy_with(tmp_path, pki, key=pki.ms_key)
    only(findings(policy), "error", "sbc.tls.private_key", "does not match the certificate 'CN=sbc-o365")
    assert policy_errors(policy)[0].startswith(f"{pki.ms_key}: sbc.tls.private_key: does not match")


def test_encrypted_or_garbage_key(tmp_path: Path, pki: LabPki) -> None:
    key = serialization.load_pem_private_key(pki.sbc_key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    only(findings(policy_with(tmp_path, pki, key=locked)), "error", "sbc.tls.private_key", "encrypted")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    only(
        findings(policy_with(tmp_path, pki, key=junk)),
        "error",
        "sbc.tls.private_key",
        "not a PEM private key",
    )


def test_signed_by_another_ca(tmp_path: Path, pki: LabPki) -> None:
    other = make_lab_pki(tmp_path / "other", SBC_FQDN, MS_FQDN, valid_days=365)
    policy = policy_with(tmp_path, pki, cert=other.sbc_cert, key=other.sbc_key)
    only(findings(policy), "error", "sbc.tls.ca", "does not chain to any CA in this file")
    assert policy_errors(policy)[0].startswith(f"{pki.ca_cert}: sbc.tls.ca: ")


def test_chain_through_an_intermediate_in_the_certificate_file(tmp_path: Path, pki: LabPki) -> None:
    year = dt.timedelta(days=365)
    _, _, inter, inter_key = sign(
        tmp_path,
        "inter",
        lab_ca(pki),
        not_before=NOW - year,
        not_after=NOW + year,
        ca=True,
        cn="Intermediate",
    )
    assert isinstance(inter_key, rsa.RSAPrivateKey)
    cert, key, _, _ = sign(tmp_path, "leaf", (inter, inter_key), not_before=NOW - year, not_after=NOW + year)
    chained = tmp_path / "chained.crt"
    chained.write_bytes(cert.read_bytes() + inter.public_bytes(serialization.Encoding.PEM))
    assert findings(policy_with(tmp_path, pki, cert=chained, key=key)) == []
    # Without the intermediate the leaf cannot be tied to the CA.
    only(findings(policy_with(tmp_path, pki, cert=cert, key=key)), "error", "sbc.tls.ca", "does not chain")


def test_ec_key_is_refused(tmp_path: Path, pki: LabPki) -> None:
    year = dt.timedelta(days=365)
    cert, key, _, _ = sign(
        tmp_path,
        "ec",
        lab_ca(pki),
        not_before=NOW - year,
        not_after=NOW + year,
        key=ec.generate_private_key(ec.SECP256R1()),
    )
    only(
        findings(policy_with(tmp_path, pki, cert=cert, key=key)),
        "error",
        "sbc.tls.certificate",
        "not an RSA key",
    )


def test_unreadable_certificate_and_ca_files(tmp_path: Path, pki: LabPki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("placeholder\n")
    only(
        findings(policy_with(tmp_path, pki, cert=junk)),
        "error",
        "sbc.tls.certificate",
        "not a PEM certificate",
    )
    only(findings(policy_with(tmp_path, pki, ca=junk)), "error", "sbc.tls.ca", "not a PEM CA bundle")


@pytest.mark.parametrize(
    ("versions", "words"),
    [
        ("[TLSv1, TLSv1.1, TLSv1.2, TLSv1.3]", ["TLSv1, TLSv1.1 offered: Microsoft enforces TLS 1.2"]),
        ("[TLSv1.1]", ["TLSv1.1 offered", "TLSv1.2 not offered"]),
        ("[TLSv1.2]", []),
    ],
)
def test_tls_versions(tmp_path: Path, pki: LabPki, versions: str, words: list[str]) -> None:
    policy = policy_with(tmp_path, pki, tls_versions=versions)
    found = check_policy_files(policy, now=NOW)
    assert [(f.severity, f.file, f.key) for f in found] == [
        ("warning", str(policy.source), "sbc.external.tls_versions")
    ] * len(words)
    assert all(w in f.message for w, f in zip(words, found, strict=True))
    assert policy_errors(policy) == []


def test_cli_policy_good_and_bad(tmp_path: Path, pki: LabPki) -> None:
    good = write_policy(tmp_path, pki)
    code, out, err = run_cli(["--policy", str(good)])
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{good}: exchange-um policy for {SBC_FQDN}, TLS versions offered: TLSv1.2, TLSv1.3",
        "  ok: certificate, key, CA and TLS versions pass",
        "preflight OK: policy files: 0 errors, 0 warnings",
    ]
    cert, key = leaf(tmp_path, pki, wildcard=True, eku_client=False)
    bad = write_policy(tmp_path, pki, cert=cert, key=key)
    code, out, _ = run_cli(["--policy", str(bad)])
    assert code == 1
    lines = out.splitlines()
    assert lines[1].startswith(f"  ERROR {cert}: sbc.tls.certificate: wildcard name '*.example.com'")
    assert lines[-2].startswith(f"  WARN {cert}: sbc.tls.certificate: extended key usage lacks clientAuth")
    assert lines[-1] == "preflight FAILED: policy files: 3 errors, 1 warning"
    # Teams accepts the wildcard but not the missing EKU; --profile applies to the policy checks too.
    code, out, _ = run_cli(["--policy", str(bad), "--profile", "teams-direct-routing"])
    assert code == 1
    # Teams: the lab CA bundle also lacks Microsoft's two roots (a warning).
    assert out.splitlines()[-1] == "preflight FAILED: policy files: 1 error, 1 warning"


def test_cli_traffic_and_policy_together(tmp_path: Path, pki: LabPki) -> None:
    policy = write_policy(tmp_path, pki, profile="teams-direct-routing")
    invite = _write(tmp_path, sbc_invite().replace(SBC_FQDN, "other.example.com"))
    code, out, _ = run_cli([str(invite), "--policy", str(policy)])
    assert code == 1  # the policy's FQDN is what the Contact is compared with
    assert "  FAIL contact-is-paired-sbc-fqdn (403 Forbidden): " in out
    assert out.splitlines()[-1] == (
        "preflight FAILED: 1 INVITE checked against teams-direct-routing rules: 1 would be refused "
        "(1 rule failure); policy files: 0 errors, 1 warning"
    )


def test_policy_finding_reads_file_key_message() -> None:
    finding = PolicyFinding("error", "/etc/sbc.crt", "sbc.tls.certificate", "expired")
    assert str(finding) == "/etc/sbc.crt: sbc.tls.certificate: expired"


def test_cli_capture_without_keylog_hints_at_it(capture: Capture) -> None:
    code, out, err = run_cli([str(capture.pcap), "--to", "127.0.0.3"])
    assert (code, out) == (2, "")
    assert "no initial INVITE toward 127.0.0.3 among the 5 SIP messages" in err
    assert "(a TLS leg needs --tls-keylog)" in err
