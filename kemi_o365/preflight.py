"""`kemi-o365 preflight`: what Microsoft would refuse, found before a call is placed.

Two halves. Traffic: read a SIP text file or a pcap/pcapng (decoded by tshark), pick every initial
INVITE and run the Microsoft rules (`kemi_o365.rules`) on it. Policy: check the files the policy
names (certificate, key, CA) the way Microsoft's side of the TLS handshake would, with no traffic.

Rule: this module reads files and runs tshark, never the network; it returns data and exit codes,
and only `run` prints.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.model import Policy, Profile
from kemi_o365.rules import InviteView, Violation, evaluate, rules_for
from kemi_o365.sipmsg import SipMessage, SipParseError, header_param, parse, uri_host

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# How long one tshark run may take; a capture big enough to need more should be cut first.
TSHARK_TIMEOUT_S = 120.0
# Renewal is a manual job at most sites: a month's notice leaves time to buy and deploy a certificate.
EXPIRY_WARNING = dt.timedelta(days=30)

_PCAP_MAGICS = (
    b"\xd4\xc3\xb2\xa1",  # pcap, little-endian, microseconds
    b"\xa1\xb2\xc3\xd4",  # pcap, big-endian
    b"\x4d\x3c\xb2\xa1",  # pcap, little-endian, nanoseconds
    b"\xa1\xb2\x3c\x4d",  # pcap, big-endian, nanoseconds
    b"\x0a\x0d\x0d\x0a",  # pcapng section header block
)
_START_LINE = re.compile(r"^(?:[A-Za-z]+ \S+ SIP/2\.0|SIP/2\.0 \d{3}(?: .*)?)$")


class PreflightInputError(Exception):
    """The input cannot be read as SIP (missing file, not SIP, tshark failed): exit status 2."""


# ---------------------------------------------------------------------------------------------
# Reading traffic


@dataclass(frozen=True)
class CapturedMessage:
    """One SIP message as seen in the input, with where it went when the input says so."""

    msg: SipMessage
    src: str
    """`ip:port` (`[v6]:port`) of the sender; "" for a text file."""
    dst: str
    """`ip:port` of the receiver; "" for a text file."""
    transport: str
    """"udp", "tcp" or "tls" from a capture; "" for a text file."""
    time: float | None = None
    """Capture time (Unix epoch seconds); None for a text file."""
    index: int = 0
    """pcap frame number, or the message's 1-based position in a text file."""


def is_capture(path: Path) -> bool:
    """pcap or pcapng, by magic bytes (tshark itself reads almost anything, even plain text)."""
    with path.open("rb") as fh:
        return fh.read(4) in _PCAP_MAGICS


def read_messages(
    path: Path,
    *,
    tls_keylog: Path | None = None,
    notes: list[str] | None = None,
    timeout: float = TSHARK_TIMEOUT_S,
) -> list[CapturedMessage]:
    """Every SIP message in a text file or capture, in file order.

    `notes` collects things worth telling the user that do not stop the reading (a capture cut short).
    Raises PreflightInputError when the input cannot be read as SIP at all.
    """
    path = Path(path)
    try:
        capture = is_capture(path)
    except OSError as exc:
        raise PreflightInputError(f"{path}: cannot read: {exc.strerror}") from exc
    if capture:
        return _read_capture(path, tls_keylog, notes if notes is not None else [], timeout)
    if tls_keylog is not None and notes is not None:
        notes.append(f"{path}: a text file, --tls-keylog ignored")
    return read_text(path)


def read_text(path: Path) -> list[CapturedMessage]:
    """SIP messages written out as text: a TCP stream's worth, or blocks separated by blank lines."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PreflightInputError(f"{path}: cannot read: {exc.strerror}") from exc
    if b"\x00" in raw:
        raise PreflightInputError(f"{path}: binary data, neither SIP text nor a pcap/pcapng capture")
    try:
        messages = split_text(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PreflightInputError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    except SipParseError as exc:
        raise PreflightInputError(f"{path}: {exc}") from exc
    if not messages:
        raise PreflightInputError(f"{path}: no SIP message found (no request or status line)")
    return [CapturedMessage(m, "", "", "", None, i) for i, m in enumerate(messages, 1)]


def split_text(text: str) -> list[SipMessage]:
    """Cut SIP messages out of text; lines not inside a message (prose, comments) are skipped.

    Line endings are made CRLF first, because SIP's are and a copy pasted through an editor or a log
    has LF. A body is then taken by Content-Length when that ends exactly where the next message (or
    the text) starts, as on a TCP stream; otherwise it is everything up to the next start line, and
    Content-Length is rewritten to match, so a hand-edited or LF-counted message still reads.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    starts = [m.start() for m in re.finditer(r"^.*$", text, re.MULTILINE) if _is_start(text, m.start())]

    def next_start(at: int) -> int:
        i = bisect.bisect_left(starts, at)
        return starts[i] if i < len(starts) else len(text)

    out: list[SipMessage] = []
    pos = 0
    for start in starts:
        if start < pos:  # a start-line look-alike inside the previous message's body
            continue
        following = next_start(start + 1)
        head_end = text.find("\r\n\r\n", start, following)
        if head_end < 0:  # no blank line before the next message (or the end): headers only
            head, after = text[start:following], following
        else:
            head, after = text[start:head_end], head_end + 4
        nxt = next_start(after)
        msg = parse(head.rstrip("\r\n") + "\r\n\r\n")
        body, pos = _body(text, after, nxt, msg)
        msg.body = body
        if msg.has("Content-Length") or body:
            msg.set("Content-Length", str(len(body.encode())))
        out.append(msg)
    return out


def _is_start(text: str, at: int) -> bool:
    end = text.find("\r\n", at)
    return bool(_START_LINE.match(text[at : end if end >= 0 else len(text)]))


def _body(text: str, after: int, nxt: int, msg: SipMessage) -> tuple[str, int]:
    """The body starting at `after` and the position just past it; see `split_text`."""
    declared = msg.get("Content-Length").strip()
    if declared.isdigit():
        length = int(declared)
        # Content-Length counts bytes; the text is str, so measure the candidate encoded.
        candidate = text[after:nxt].encode()[:length].decode("utf-8", errors="ignore")
        end = after + len(candidate)
        rest = text[end:nxt]
        # The body must end where a line ends and be followed by nothing or a blank line (then prose
        # or the next message); a Content-Length counted on LF lines ends mid-line and is not trusted.
        blank_after = rest.startswith("\r\n\r\n") or (
            rest.startswith("\r\n") and (not candidate or candidate.endswith("\r\n"))
        )
        if len(candidate.encode()) == length and (not rest.strip("\r\n") or blank_after):
            return candidate, end
    block = text[after:nxt].rstrip("\r\n")
    # SDP lines each end with CRLF (RFC 4566 §5); blank lines after the last one were separators.
    return (block + "\r\n" if block else ""), nxt


def _read_capture(path: Path, keylog: Path | None, notes: list[str], timeout: float) -> list[CapturedMessage]:
    tshark = shutil.which("tshark")
    if tshark is None:
        raise PreflightInputError(f"{path}: a capture, but tshark is not installed (apt install tshark)")
    opts = ["-n"]  # never resolve names: preflight must not touch the network
    if keylog is not None:
        if not keylog.is_file():
            raise PreflightInputError(f"{keylog}: TLS key log not found")
        opts += ["-o", f"tls.keylog_file:{keylog.absolute()}"]
        # Wireshark has no SIP heuristic on decrypted TLS; only 5061 is SIP by default, so the server
        # ports of the capture's TLS handshakes are told to carry SIP.
        for port in _tls_server_ports(tshark, path, opts, timeout):
            opts += ["-d", f"tls.port=={port},sip"]
    cmd = [tshark, *tshark_sip_args(path), *opts]
    out = _run_tshark(cmd, path, timeout, notes)
    try:
        packets = json.loads(out, object_pairs_hook=_multi)
    except json.JSONDecodeError as exc:
        raise PreflightInputError(f"{path}: tshark output is not JSON: {exc}") from exc
    return list(_captured(packets))


def tshark_sip_args(path: Path) -> list[str]:
    """tshark arguments giving, per frame, each SIP message's raw bytes (`sip_raw`) and addresses.

    `-x` adds `<layer>_raw` hex; a SIP message reassembled from TCP segments or decrypted from TLS
    is given whole, from its own data source. `-j` keeps only the layers read here.
    """
    return ["-r", str(path), "-Y", "sip", "-T", "json", "-x", "-j", "frame ip ipv6 udp tcp sip"]


def _tls_server_ports(tshark: str, path: Path, opts: list[str], timeout: float) -> list[int]:
    cmd = [tshark, "-r", str(path), *opts, "-Y", "tls.handshake.type == 1", "-T", "fields"]
    out = _run_tshark([*cmd, "-e", "tcp.dstport"], path, timeout, [])
    return sorted({int(p) for p in out.split() if p.isdigit()})


def _run_tshark(cmd: list[str], path: Path, timeout: float, notes: list[str]) -> str:
    try:
        # subprocess.run kills the child it started when the timeout expires.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PreflightInputError(f"{path}: tshark took more than {timeout:.0f}s") from exc
    except OSError as exc:
        raise PreflightInputError(f"{path}: cannot run tshark: {exc.strerror}") from exc
    errors = [
        ln.removeprefix("tshark: ").strip()
        for ln in done.stderr.splitlines()
        if ln.strip() and "dangerous" not in ln  # tshark's warning about running as root
    ]
    if done.returncode != 0:
        # A capture cut short (still being written, or copied mid-write) still has its first packets.
        if done.stdout.strip().startswith("[") and done.stdout.strip().endswith("]"):
            notes += [f"{path}: {e}" for e in errors]
            return done.stdout
        raise PreflightInputError(f"{path}: tshark failed: {' '.join(errors) or done.returncode}")
    return done.stdout


def _multi(pairs: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    """JSON object hook keeping every value of a repeated key (one frame can hold several SIP messages)."""
    out: dict[str, list[Any]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def _first(layer: dict[str, list[Any]] | None, key: str) -> str:
    if not layer or key not in layer:
        return ""
    value = layer[key][-1]
    return value if isinstance(value, str) else ""


def _captured(packets: Any) -> Iterable[CapturedMessage]:
    if not isinstance(packets, list):
        raise PreflightInputError("tshark output is not a list of packets")
    for packet in packets:
        layers: dict[str, list[Any]] = packet["_source"][0]["layers"][0]
        frame = layers.get("frame", [{}])[0]
        # The innermost IP header is the one SIP rode in (tunnels wrap it in another).
        ip = (layers.get("ip") or layers.get("ipv6") or [{}])[-1]
        family = "ip" if "ip" in layers else "ipv6"
        protocols = _first(frame, "frame.protocols").split(":")
        transport = "tls" if "tls" in protocols else "tcp" if "tcp" in protocols else "udp"
        l4 = (layers.get("tcp" if transport != "udp" else "udp") or [{}])[-1]
        l4name = "udp" if transport == "udp" else "tcp"
        src = _endpoint(_first(ip, f"{family}.src"), _first(l4, f"{l4name}.srcport"))
        dst = _endpoint(_first(ip, f"{family}.dst"), _first(l4, f"{l4name}.dstport"))
        epoch = _first(frame, "frame.time_epoch")
        number = _first(frame, "frame.number")
        for raw in layers.get("sip_raw", []):
            data = bytes.fromhex(raw[0])
            try:
                msg = parse(data)
            except SipParseError:
                continue  # tshark called a fragment SIP that is not a whole message: nothing to check
            yield CapturedMessage(
                msg,
                src,
                dst,
                transport,
                float(epoch) if epoch else None,
                int(number) if number.isdigit() else 0,
            )


def _endpoint(host: str, port: str) -> str:
    if not host:
        return ""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else shown


# ---------------------------------------------------------------------------------------------
# Checking INVITEs


@dataclass(frozen=True)
class Finding:
    """The rules one INVITE fails under one profile (none: it passes)."""

    message: CapturedMessage
    profile: Profile
    violations: tuple[Violation, ...]
    """In rule order (Microsoft answers with the first)."""
    rules_checked: int

    @property
    def ok(self) -> bool:
        return not self.violations


def _host_of(endpoint: str) -> str:
    if endpoint.startswith("["):
        return endpoint[1 : endpoint.index("]")]
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint


def _same_host(a: str, b: str) -> bool:
    a, b = a.strip("[]").lower().rstrip("."), b.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def select_invites(messages: Sequence[CapturedMessage], *, to: str | None = None) -> list[CapturedMessage]:
    """Initial INVITEs (no To tag), retransmissions dropped; `to` keeps those whose Request-URI host
    or destination IP is that host."""
    out: list[CapturedMessage] = []
    seen: set[tuple[str, str, str, str, str]] = set()
    for cm in messages:
        msg = cm.msg
        if not msg.is_request or msg.method != "INVITE" or header_param(msg.get("To"), "tag"):
            continue
        # A UDP retransmission (or the same INVITE captured twice) repeats Call-ID, CSeq and branch.
        key = (
            cm.src,
            cm.dst,
            msg.get("Call-ID"),
            msg.get("CSeq"),
            header_param(msg.get("Via"), "branch") or "",
        )
        if key in seen:
            continue
        seen.add(key)
        if to is not None and not (
            _same_host(uri_host(msg.ruri), to) or (cm.dst and _same_host(_host_of(cm.dst), to))
        ):
            continue
        out.append(cm)
    return out


def check_messages(
    messages: Sequence[CapturedMessage],
    profile: Profile,
    *,
    destination_host: str | None = None,
    expected_sbc_fqdn: str | None = None,
    to: str | None = None,
) -> list[Finding]:
    """Run the profile's rules on every initial INVITE in `messages` (see `select_invites`)."""
    checked = len(rules_for(profile))
    findings = []
    for cm in select_invites(messages, to=to):
        view = InviteView(
            msg=cm.msg,
            destination_host=destination_host or uri_host(cm.msg.ruri),
            # A capture does not show which certificate names the TLS peer presented.
            tls_client_names=None,
            expected_sbc_fqdn=expected_sbc_fqdn,
        )
        findings.append(Finding(cm, profile, tuple(evaluate(view, profile)), checked))
    return findings


# ---------------------------------------------------------------------------------------------
# Checking the policy's files


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class PolicyFinding:
    """One thing about the policy's TLS files; "error": Microsoft would refuse (403, handshake)."""

    severity: Severity
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


def _pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _covers(pattern: str, fqdn: str) -> bool:
    """RFC 6125 §6.4.3 as Microsoft applies it: exact (case-insensitive), or `*.` over one label."""
    pattern, fqdn = pattern.lower().rstrip("."), fqdn.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = fqdn.partition(".")
        return bool(head) and rest == pattern[2:] and "*" not in rest
    return pattern == fqdn


def check_policy_files(
    policy: Policy, *, now: dt.datetime, profile: Profile | None = None
) -> list[PolicyFinding]:
    """What Microsoft would make of the certificate, key and CA the policy names, and the TLS versions.

    `profile` defaults to the policy's own; the name and EKU rules differ between UM and Teams.
    """
    tls = policy.sbc.tls
    profile = profile or policy.microsoft.profile
    out: list[PolicyFinding] = []
    cert_file, key_file, ca_file = str(tls.certificate), str(tls.private_key), str(tls.ca)

    def add(severity: Severity, file: str, key: str, message: str) -> None:
        out.append(PolicyFinding(severity, file, key, message))

    try:
        chain = _pem_certs(tls.certificate)
    except (OSError, ValueError) as exc:
        add("error", cert_file, "sbc.tls.certificate", f"not a PEM certificate: {_why(exc)}")
        chain = []
    if chain:
        leaf = chain[0]
        out += _name_findings(leaf, policy.sbc.fqdn, profile, cert_file)
        out += _eku_findings(leaf, profile, cert_file)
        out += _validity_findings(chain, now, cert_file)
        if not isinstance(leaf.public_key(), rsa.RSAPublicKey):
            add(
                "error",
                cert_file,
                "sbc.tls.certificate",
                "not an RSA key: Microsoft negotiates only ECDHE-RSA cipher suites (MICROSOFT-NOTES §1.2)",
            )
        out += _key_findings(leaf, tls.private_key, key_file)
        out += _chain_findings(chain, tls.ca, ca_file, now)
    if profile is Profile.TEAMS_DIRECT_ROUTING:
        out += _microsoft_roots_findings(tls.ca, ca_file)
    out += _tls_version_findings(policy)
    return out


# Microsoft's SIP certificates chain to one of these; the trust store must hold both (MICROSOFT-NOTES
# §1.2: the move from Baltimore to DigiCert Global Root G2, "do not remove the old one").
MICROSOFT_ROOTS = ("DigiCert Global Root G2", "Baltimore CyberTrust Root")


def _microsoft_roots_findings(ca_path: Path, ca_file: str) -> list[PolicyFinding]:
    try:
        names = {_subject(cert) for cert in _pem_certs(ca_path)}
    except (OSError, ValueError):
        return []  # the chain check has reported an unreadable CA file already
    missing = [root for root in MICROSOFT_ROOTS if not any(root in name for name in names)]
    if not missing:
        return []
    message = (
        f"the CA bundle lacks {', '.join(missing)}: the SBC could not verify Microsoft's SIP certificates "
        "(keep both roots, MICROSOFT-NOTES §1.2)"
    )
    return [PolicyFinding("warning", ca_file, "sbc.tls.ca", message)]


def _why(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _name_findings(leaf: x509.Certificate, fqdn: str, profile: Profile, file: str) -> list[PolicyFinding]:
    from kemi_o365.lab.certs import cert_cn, cert_san_dns

    key = "sbc.tls.certificate"
    cn = cert_cn(leaf)
    sans = cert_san_dns(leaf)
    out: list[PolicyFinding] = []
    if profile is Profile.EXCHANGE_UM:
        wild = [n for n in (cn, *sans) if n and "*" in n]
        if wild:
            out.append(
                PolicyFinding(
                    "error",
                    file,
                    key,
                    f"wildcard name {wild[0]!r}: Exchange UM answers 403 to a wildcard certificate "
                    "(seed 000, requirement 1)",
                )
            )
        if cn != fqdn:
            out.append(
                PolicyFinding(
                    "error",
                    file,
                    key,
                    f"subject CN {cn!r} is not exactly the SBC FQDN {fqdn!r}: Exchange UM compares "
                    "case-sensitively and answers 403 (MICROSOFT-NOTES §1.9)",
                )
            )
        if not sans:
            out.append(
                PolicyFinding(
                    "warning",
                    file,
                    key,
                    f"no subjectAltName: verifiers following RFC 6125 want {fqdn!r} there too",
                )
            )
        elif fqdn not in sans:
            out.append(
                PolicyFinding(
                    "error",
                    file,
                    key,
                    f"subjectAltName {', '.join(sans)} lacks {fqdn!r}: a verifier reads the SAN, not the CN, "
                    "when the SAN is present (RFC 6125 §6.4.4), so the name check fails",
                )
            )
        return out
    # Teams Direct Routing: the FQDN in CN or SAN, a one-label wildcard allowed (MICROSOFT-NOTES §1.2).
    in_san = any(_covers(n, fqdn) for n in sans)
    in_cn = cn is not None and _covers(cn, fqdn)
    if not (in_san or in_cn):
        names = ", ".join(n for n in (cn, *sans) if n) or "none"
        out.append(
            PolicyFinding(
                "error",
                file,
                key,
                f"neither CN nor subjectAltName covers the SBC FQDN {fqdn!r} (names: {names}); "
                "Teams checks it against Contact/Record-Route and refuses the connection",
            )
        )
    elif sans and not in_san:
        out.append(
            PolicyFinding(
                "warning",
                file,
                key,
                f"{fqdn!r} only in the CN: verifiers following RFC 6125 ignore the CN when a SAN is present",
            )
        )
    return out


def _eku_findings(leaf: x509.Certificate, profile: Profile, file: str) -> list[PolicyFinding]:
    try:
        usages = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = set()
    missing = [
        label
        for oid, label in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        )
        if oid not in usages
    ]
    if not missing:
        return []
    # Teams has refused certificates without both EKUs since 2024-03-19; UM predates that rule.
    severity: Severity = "error" if profile is Profile.TEAMS_DIRECT_ROUTING else "warning"
    return [
        PolicyFinding(
            severity,
            file,
            "sbc.tls.certificate",
            f"extended key usage lacks {' and '.join(missing)}: the SBC is a TLS server and client "
            "(mutual TLS); Microsoft requires both since 2024-03-19 (MICROSOFT-NOTES §1.2)",
        )
    ]


def _validity_findings(chain: list[x509.Certificate], now: dt.datetime, file: str) -> list[PolicyFinding]:
    out: list[PolicyFinding] = []
    for i, cert in enumerate(chain):
        what = "certificate" if i == 0 else f"chain certificate {i} ({_subject(cert)})"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            out.append(
                PolicyFinding(
                    "error", file, "sbc.tls.certificate", f"{what} not valid before {start:%Y-%m-%d %H:%M}Z"
                )
            )
        elif now > end:
            out.append(
                PolicyFinding("error", file, "sbc.tls.certificate", f"{what} expired {end:%Y-%m-%d %H:%M}Z")
            )
        elif end - now < EXPIRY_WARNING:
            days = (end - now).days
            out.append(
                PolicyFinding(
                    "warning",
                    file,
                    "sbc.tls.certificate",
                    f"{what} expires {end:%Y-%m-%d} (in {days} day{'s' if days != 1 else ''}); "
                    "after renewing, restart so TLS connections are re-established",
                )
            )
    return out


def _key_findings(leaf: x509.Certificate, key_path: Path, file: str) -> list[PolicyFinding]:
    key = "sbc.tls.private_key"
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        # Kamailio starts unattended: it cannot be asked for a passphrase.
        return [PolicyFinding("error", file, key, "the key is encrypted; Kamailio needs it unencrypted")]
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        return [PolicyFinding("error", file, key, f"not a PEM private key: {_why(exc)}")]
    if _spki(private.public_key()) != _spki(leaf.public_key()):
        return [
            PolicyFinding(
                "error",
                file,
                key,
                f"does not match the certificate {leaf.subject.rfc4514_string()!r}: the TLS handshake fails",
            )
        ]
    return []


def _subject(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _chain_findings(
    chain: list[x509.Certificate], ca_path: Path, ca_file: str, now: dt.datetime
) -> list[PolicyFinding]:
    key = "sbc.tls.ca"
    try:
        anchors = _pem_certs(ca_path)
    except (OSError, ValueError) as exc:
        return [PolicyFinding("error", ca_file, key, f"not a PEM CA bundle: {_why(exc)}")]
    # Walk up from the leaf through the intermediates sent with it until a configured CA signed one.
    current, pool, steps = chain[0], chain[1:], 0
    while steps <= len(chain):
        anchor = next((a for a in anchors if _issued_by(current, a)), None)
        if anchor is not None:
            if not anchor.not_valid_before_utc <= now <= anchor.not_valid_after_utc:
                return [
                    PolicyFinding(
                        "error",
                        ca_file,
                        key,
                        f"CA {_subject(anchor)!r} is outside its validity "
                        f"({anchor.not_valid_before_utc:%Y-%m-%d} .. {anchor.not_valid_after_utc:%Y-%m-%d})",
                    )
                ]
            return []
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            break
        current, steps = parent, steps + 1
    return [
        PolicyFinding(
            "error",
            ca_file,
            key,
            f"the certificate (issuer {chain[0].issuer.rfc4514_string()!r}) does not chain to any CA in "
            "this file: the peer cannot verify it",
        )
    ]


def _tls_version_findings(policy: Policy) -> list[PolicyFinding]:
    versions = policy.sbc.external.tls_versions
    file, key = str(policy.source), "sbc.external.tls_versions"
    out: list[PolicyFinding] = []
    old = [v for v in versions if v in ("TLSv1", "TLSv1.1")]
    if old:
        out.append(
            PolicyFinding(
                "warning",
                file,
                key,
                f"{', '.join(old)} offered: Microsoft enforces TLS 1.2 since 2022-04-03 "
                "(MICROSOFT-NOTES §1.2)",
            )
        )
    if "TLSv1.2" not in versions:
        out.append(
            PolicyFinding(
                "warning",
                file,
                key,
                "TLSv1.2 not offered: Microsoft's documented cipher suites are TLS 1.2 ones",
            )
        )
    return out


def policy_errors(policy: Policy, *, now: dt.datetime | None = None) -> list[str]:
    """The error-severity findings as "FILE: key: message", for `policy check` to refuse on."""
    when = now or dt.datetime.now(dt.UTC)
    return [str(f) for f in check_policy_files(policy, now=when) if f.severity == "error"]


# ---------------------------------------------------------------------------------------------
# Command line


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `preflight` on the top-level subcommands."""
    p = sub.add_parser(
        "preflight",
        help="what Microsoft would refuse: INVITEs in a SIP text file or capture; the policy's TLS files",
        description=__doc__,
    )
    p.add_argument("file", nargs="?", help="SIP messages as text, or a pcap/pcapng capture")
    p.add_argument("--policy", help="policy file: check its certificate, key, CA and TLS versions")
    p.add_argument(
        "--profile",
        choices=[x.value for x in Profile],
        help="rules to apply (default: the policy's profile, else exchange-um)",
    )
    p.add_argument(
        "--to", metavar="HOST", help="only INVITEs whose Request-URI host or destination IP is HOST"
    )
    p.add_argument(
        "--sbc-fqdn", help="the SBC's FQDN, for rules on Record-Route/Contact (default: the policy's)"
    )
    p.add_argument(
        "--tls-keylog", metavar="FILE", help="TLS key log (SSLKEYLOGFILE format) to decrypt a TLS leg"
    )
    p.set_defaults(func=run)


def _when(cm: CapturedMessage, source: str) -> str:
    if cm.time is None:
        return f"{source} message {cm.index}"
    stamp = dt.datetime.fromtimestamp(cm.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    path = f" {cm.src} -> {cm.dst} {cm.transport}" if cm.src or cm.dst else ""
    return f"{stamp}Z frame {cm.index}{path}"


def _report_findings(findings: list[Finding], source: str, out: TextIO) -> int:
    failures = 0
    for f in findings:
        msg = f.message.msg
        print(f"{_when(f.message, source)}: INVITE {msg.ruri} (Call-ID {msg.get('Call-ID')})", file=out)
        for v in f.violations:
            print(f"  FAIL {v.rule.name} ({v.rule.code} {v.rule.reason}): {v.detail}", file=out)
        if f.ok:
            print(f"  ok: passes all {f.rules_checked} {f.profile} rules", file=out)
        failures += len(f.violations)
    return failures


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The `preflight` command; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not args.file and not args.policy:
        print("preflight: give a FILE to check, --policy FILE, or both", file=err)
        return EXIT_BAD_INPUT
    policy: Policy | None = None
    if args.policy:
        from kemi_o365.policy.load import load_policy

        try:
            policy = load_policy(args.policy)
        except PolicyError as exc:
            print(f"policy invalid:\n{exc}", file=err)
            return EXIT_BAD_INPUT
    profile = (
        Profile(args.profile) if args.profile else policy.microsoft.profile if policy else Profile.EXCHANGE_UM
    )
    summary: list[str] = []
    failed = False
    if args.file:
        notes: list[str] = []
        try:
            messages = read_messages(
                Path(args.file),
                tls_keylog=Path(args.tls_keylog) if args.tls_keylog else None,
                notes=notes,
            )
        except PreflightInputError as exc:
            print(f"preflight: {exc}", file=err)
            return EXIT_BAD_INPUT
        for note in notes:
            print(f"note: {note}", file=err)
        findings = check_messages(
            messages,
            profile,
            expected_sbc_fqdn=args.sbc_fqdn or (policy.sbc.fqdn if policy else None),
            to=args.to,
        )
        if not findings:
            # Checking nothing must not look like passing.
            where = f" toward {args.to}" if args.to else ""
            hint = (
                ""
                if args.tls_keylog or not is_capture(Path(args.file))
                else " (a TLS leg needs --tls-keylog)"
            )
            print(
                f"preflight: no initial INVITE{where} among the {len(messages)} SIP messages "
                f"in {args.file}{hint}",
                file=err,
            )
            return EXIT_BAD_INPUT
        failures = _report_findings(findings, args.file, out)
        bad = sum(1 for f in findings if not f.ok)
        failed = bad > 0
        summary.append(
            f"{len(findings)} INVITE{'s' if len(findings) != 1 else ''} checked against {profile} rules: "
            f"{bad} would be refused ({failures} rule failure{'s' if failures != 1 else ''})"
        )
    if policy is not None:
        found = check_policy_files(policy, now=dt.datetime.now(dt.UTC), profile=profile)
        versions = ", ".join(policy.sbc.external.tls_versions)
        print(
            f"{policy.source}: {profile} policy for {policy.sbc.fqdn}, TLS versions offered: {versions}",
            file=out,
        )
        for pf in found:
            print(f"  {'ERROR' if pf.severity == 'error' else 'WARN'} {pf}", file=out)
        errors = sum(1 for pf in found if pf.severity == "error")
        warnings = len(found) - errors
        if not found:
            print("  ok: certificate, key, CA and TLS versions pass", file=out)
        failed = failed or errors > 0
        summary.append(f"policy files: {_count(errors, 'error')}, {_count(warnings, 'warning')}")
    print(f"preflight {'FAILED' if failed else 'OK'}: {'; '.join(summary)}", file=out)
    return EXIT_FAILED if failed else EXIT_OK
