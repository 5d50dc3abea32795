"""The RFC 4475 and RFC 5118 SIP torture corpora: files, what each RFC expects, and wire bytes.

Pure: reads the fixture files, no sockets. The expectation table is transcribed from the corpora's
INDEX.md (tests/fixtures/sip/rfc4475/INDEX.md, tests/fixtures/sip/rfc5118/INDEX.md), i.e. from the
RFC text, with the SBC's role (a proxy toward both sides) applied:

- ACCEPT: well-formed; any answer, and forwarding is allowed.
- REJECT: the RFC wants it refused: a 4xx-6xx answer, or a drop / a closed connection; never a 2xx,
  never forwarded.
- NOT_FORWARDED: malformed, but the RFC lets a liberal element accept it (e.g. answer an OPTIONS
  itself); any answer, never forwarded.
- LIBERAL: malformed, and the RFC text explicitly lets a liberal proxy forward it on one condition
  (e.g. ltgtruri: "If the element forwards the request, it must not include the brackets"); any
  answer; a forwarded copy must meet that condition (`liberal_problems`).
- DISCARD: a response that must simply be dropped: no answer, never forwarded.
- UNDEFINED: test.dat, in the archive but described nowhere: only liveness is checked.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sip"


class Expect(enum.StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    NOT_FORWARDED = "not-forwarded"
    LIBERAL = "liberal"
    DISCARD = "discard"
    UNDEFINED = "undefined"


# file -> (RFC section, RFC class, expectation, what the RFC says), from INDEX.md.
RFC4475: dict[str, tuple[str, str, Expect, str]] = {
    "wsinv": ("3.1.1.1", "valid", Expect.ACCEPT, "well-formed; proxy forwards the unusual header"),
    "intmeth": ("3.1.1.2", "valid", Expect.ACCEPT, "unknown method; proxy forwards or 404"),
    "esc01": ("3.1.1.3", "valid", Expect.ACCEPT, "parser must accept % escapes"),
    "escnull": ("3.1.1.4", "valid", Expect.ACCEPT, "must accept %00 in URIs"),
    "esc02": ("3.1.1.5", "valid", Expect.ACCEPT, "method RE%47IST%45R is unknown, not REGISTER"),
    "lwsdisp": ("3.1.1.6", "valid", Expect.ACCEPT, "no LWS before <: accept as well formed"),
    "longreq": ("3.1.1.7", "valid", Expect.ACCEPT, "long values; must parse"),
    "dblreq": ("3.1.1.8", "valid", Expect.ACCEPT, "REGISTER handled; trailing octets never forwarded"),
    "semiuri": ("3.1.1.9", "valid", Expect.ACCEPT, "user part 'user;par=u@example.net'"),
    "transports": ("3.1.1.10", "valid", Expect.ACCEPT, "unknown transports in lower Vias"),
    "mpart01": ("3.1.1.11", "valid", Expect.ACCEPT, "multipart body with NULs; frame by Content-Length"),
    "unreason": ("3.1.1.12", "valid", Expect.DISCARD, "a 200 with a UTF-8 reason (no transaction here)"),
    "noreason": ("3.1.1.13", "valid", Expect.DISCARD, "a 100 with an empty reason (no transaction here)"),
    "badinv01": ("3.1.2.1", "invalid", Expect.REJECT, "400 Bad Request"),
    "clerr": ("3.1.2.2", "invalid", Expect.REJECT, "UDP 400; stream: wait for the rest or close"),
    "ncl": ("3.1.2.3", "invalid", Expect.REJECT, "error; stream framing unrecoverable"),
    "scalar02": ("3.1.2.4", "invalid", Expect.REJECT, "400 (CSeq > 2**32-1)"),
    "scalarlg": ("3.1.2.5", "invalid", Expect.DISCARD, "a response with overlarge scalars: discard"),
    "quotbal": ("3.1.2.6", "invalid", Expect.LIBERAL, "400, or infer the quote; forwarded: quotes balanced"),
    "ltgtruri": ("3.1.2.7", "invalid", Expect.LIBERAL, "400 reasonable; forwarded: without the <>"),
    "lwsruri": ("3.1.2.8", "invalid", Expect.LIBERAL, "400, or ignore the LWS; forwarded: without it"),
    "lwsstart": ("3.1.2.9", "invalid", Expect.LIBERAL, "may reject; forwarded: without the extra SP"),
    "trws": ("3.1.2.10", "invalid", Expect.NOT_FORWARDED, "may reject as malformed"),
    "escruri": ("3.1.2.11", "invalid", Expect.LIBERAL, "400, or forward without the escaped headers"),
    "baddate": ("3.1.2.12", "invalid", Expect.LIBERAL, "may reject; a liberal element ignores Date"),
    "regbadct": ("3.1.2.13", "invalid", Expect.NOT_FORWARDED, "400 reasonable"),
    "badaspec": ("3.1.2.14", "invalid", Expect.NOT_FORWARDED, "parser must not break; 400 reasonable"),
    "baddn": ("3.1.2.15", "invalid", Expect.NOT_FORWARDED, "400; never propagate downstream"),
    "badvers": ("3.1.2.16", "invalid", Expect.REJECT, "505 Version Not Supported"),
    "mismatch01": ("3.1.2.17", "invalid", Expect.REJECT, "400 Bad Request"),
    "mismatch02": ("3.1.2.18", "invalid", Expect.REJECT, "501 (400 acceptable)"),
    "bigcode": ("3.1.2.19", "invalid", Expect.DISCARD, "response code > 699: drop"),
    "badbranch": ("3.2.1", "transaction", Expect.ACCEPT, "400, or RFC 2543 transaction matching"),
    "insuf": ("3.3.1", "application (invalid)", Expect.REJECT, "no Call-ID/From/To: 400"),
    "unkscm": ("3.3.2", "application", Expect.REJECT, "416 Unsupported URI Scheme"),
    "novelsc": ("3.3.3", "application", Expect.REJECT, "416, or 404"),
    "unksm2": ("3.3.4", "application", Expect.ACCEPT, "proxies treat as any other request"),
    "bext01": ("3.3.5", "application", Expect.REJECT, "420 Bad Extension"),
    "invut": ("3.3.6", "application", Expect.ACCEPT, "proxy processes as any other INVITE"),
    "regaut01": ("3.3.7", "application", Expect.ACCEPT, "proxy forwards Authorization unchanged"),
    "multi01": ("3.3.8", "application (invalid)", Expect.REJECT, "multiple single-value headers: 400"),
    "mcl01": ("3.3.9", "application (invalid)", Expect.REJECT, "error; stream framing unrecoverable"),
    "bcast": ("3.3.10", "application", Expect.DISCARD, "200 with broadcast Via: proxies drop it"),
    "zeromf": ("3.3.11", "application", Expect.NOT_FORWARDED, "483 (an OPTIONS may be answered)"),
    "cparam01": ("3.3.12", "application", Expect.ACCEPT, "REGISTER with a contact-param"),
    "cparam02": ("3.3.13", "application", Expect.ACCEPT, "REGISTER with a url-parameter"),
    "regescrt": ("3.3.14", "application", Expect.ACCEPT, "REGISTER with an escaped header in Contact"),
    "sdp01": ("3.3.15", "application", Expect.ACCEPT, "406/400 at a UA; a proxy forwards"),
    "inv2543": ("3.4.1", "backward-compat", Expect.ACCEPT, "RFC 2543 syntax; accept"),
    "test": ("-", "n/a", Expect.UNDEFINED, "not described by the RFC: out of pass/fail"),
}

RFC5118: dict[str, tuple[str, str, Expect, str]] = {
    "ipv6-good": ("4.1", "valid", Expect.ACCEPT, "IPv6 reference in R-URI, Via, Contact"),
    "ipv6-bad": ("4.2", "invalid", Expect.REJECT, "R-URI IPv6 without [ ]: 400"),
    "port-ambiguous": ("4.3", "valid", Expect.ACCEPT, "[2001:db8::10:5070] has no port"),
    "port-unambiguous": ("4.4", "valid", Expect.ACCEPT, "[2001:db8::10]:5070"),
    "via-received-param-with-delim": ("4.5", "tolerate", Expect.ACCEPT, "received=[v6]: keep going"),
    "via-received-param-no-delim": ("4.5", "valid", Expect.ACCEPT, "received=v6 without brackets"),
    "ipv6-in-sdp": ("4.6", "valid", Expect.ACCEPT, "c=IN IP6 in SDP"),
    "mult-ip-in-header": ("4.7", "valid", Expect.ACCEPT, "IPv4 and IPv6 Vias"),
    "mult-ip-in-sdp": ("4.8", "valid", Expect.ACCEPT, "IP4 audio, IP6 video"),
    "ipv4-mapped-ipv6": ("4.9", "valid", Expect.ACCEPT, "::ffff:192.0.2.x everywhere"),
    "ipv6-bug-abnf-3-colons": ("4.10", "tolerate", Expect.ACCEPT, "extra colon: tolerate"),
    "ipv6-correct-abnf-2-colons": ("4.10", "valid", Expect.ACCEPT, "correct syntax"),
}

_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_URI_HOST = re.compile(rb"(?i)(sips?:)([^@\s>]*@)?(\[[^\]\s]*\]|[A-Za-z0-9.\-]+)")
_CONTENT_LENGTH = re.compile(rb"^(content-length|l)([ \t]*:[ \t]*)\d+", re.IGNORECASE | re.MULTILINE)
# dblreq.dat: the INVITE-looking octets after the REGISTER (one UDP datagram; RFC 4475 §3.1.1.8).
DBLREQ_TRAILING_CALL_ID = b"dblreq.0ha0isnda977644900765@192.0.2.15"


_NEVER_FORWARDED = (Expect.REJECT, Expect.NOT_FORWARDED, Expect.DISCARD)


@dataclass(frozen=True)
class Case:
    corpus: str  # "rfc4475" or "rfc5118"
    name: str
    section: str
    rfc_class: str
    expect: Expect
    rfc_says: str

    @property
    def path(self) -> Path:
        return FIXTURES / self.corpus / f"{self.name}.dat"

    @property
    def label(self) -> str:
        return f"{self.corpus}/{self.name}"

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def wire(self) -> bytes:
        """The bytes to send: RFC 4475 files as they are; RFC 5118 files (bare LF) with CRLF line
        ends, the empty line that ends the headers, and Content-Length recomputed (INDEX.md)."""
        data = self.raw()
        return data if self.corpus == "rfc4475" else crlf_message(data)

    @property
    def is_request(self) -> bool:
        return not self.raw().startswith(b"SIP/")

    def call_ids(self) -> list[bytes]:
        return [m.group(1).strip() for m in _CALL_ID.finditer(self.raw())]

    def forbidden_call_ids(self, transport: str) -> list[bytes]:
        """Call-IDs that must never reach Microsoft or CUCM when sent over `transport`."""
        if self.expect in _NEVER_FORWARDED:
            return self.call_ids()
        if self.name == "dblreq" and transport == "udp":
            # One datagram: the trailing INVITE is junk there; on a stream it is a second message.
            return [DBLREQ_TRAILING_CALL_ID]
        return []

    def must_not_forward(self, transport: str) -> bool:
        return self.expect in _NEVER_FORWARDED or bool(self.forbidden_call_ids(transport))


def crlf_message(data: bytes) -> bytes:
    """Bare-LF SIP text as it must go on the wire: CRLF, a header terminator, Content-Length right."""
    text = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = text.partition(b"\r\n\r\n")
    if not sep:
        head, body = text.rstrip(b"\r\n"), b""
    head, count = _CONTENT_LENGTH.subn(lambda m: m.group(1) + m.group(2) + str(len(body)).encode(), head)
    if count == 0 and body:
        head += b"\r\nContent-Length: " + str(len(body)).encode()
    return head + b"\r\n\r\n" + body


def rewrite_ruri_host(data: bytes, host: str) -> bytes | None:
    """The same message with only the Request-URI host (request line only) replaced by `host`;
    None for a response or a Request-URI without a SIP host (unknown scheme)."""
    if data.startswith(b"SIP/"):
        return None
    line, sep, rest = data.partition(b"\r\n")
    m = _URI_HOST.search(line)
    if m is None:
        return None
    new = line[: m.start(3)] + host.encode() + line[m.end(3) :]
    return new + sep + rest


def cases() -> list[Case]:
    out = []
    for corpus, table in (("rfc4475", RFC4475), ("rfc5118", RFC5118)):
        for name, (section, rfc_class, expect, says) in table.items():
            out.append(Case(corpus, name, section, rfc_class, expect, says))
    return out


def corpus_files() -> set[str]:
    """Every .dat file in the fixtures, as corpus/name (the table must cover each one)."""
    return {f"{p.parent.name}/{p.stem}" for d in ("rfc4475", "rfc5118") for p in (FIXTURES / d).glob("*.dat")}


def _request_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def _headers(data: bytes, *names: bytes) -> list[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    wanted = {n.lower() for n in names}
    return [ln for ln in head.split(b"\r\n")[1:] if ln.split(b":", 1)[0].strip().lower() in wanted]


def liberal_problems(name: str, forwarded: bytes) -> list[str]:
    """What a forwarded copy of a LIBERAL file breaks, per the condition its RFC 4475 section sets."""
    line = _request_line(forwarded)
    problems = []
    if name == "ltgtruri" and (b"<" in line or b">" in line):
        problems.append("forwarded with <> around the Request-URI (RFC 4475 §3.1.2.7)")
    if name in ("lwsstart", "lwsruri") and len(line.split(b" ")) != 3:
        problems.append("forwarded Request-Line still has extra/embedded LWS (§3.1.2.8-9)")
    if name == "escruri":
        if b"?" in line or b"%3C" in line.upper():
            problems.append("escaped headers left in the forwarded Request-URI (§3.1.2.11)")
        if any(b"sip:example.com" in h for h in _headers(forwarded, b"route")):
            problems.append("escaped Route turned into a real header (§3.1.2.11)")
    if name == "quotbal" and any(h.count(b'"') % 2 for h in _headers(forwarded, b"to", b"t")):
        problems.append("forwarded To still has an unterminated quoted string (§3.1.2.6)")
    # baddate: "an element wishing to be liberal ... could ignore this value altogether" (§3.1.2.12).
    return problems
