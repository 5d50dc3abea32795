"""A seeded, bounded mutation fuzzer for SIP messages (pure: no I/O, no clock).

The base messages are the seed exchange (sipp-scenarios/seed-call/uac.xml: CUCM 9.1's INVITE;
/work/shared/seeds/000_cbe866ecd25117ec.txt: Exchange UM's 200 OK), rebuilt with lab addresses. A
`Mutator` applies one operator per message, chosen by its own `random.Random(seed)`, so a seed gives
the same sequence of mutations on every run:

header corruption (delete, duplicate, garble, bad value), SDP corruption (bad m=, bad c=, huge
attribute, missing line), truncation, oversized field (a 10 kB header), wrong / negative / huge
Content-Length, odd bytes (NUL, high-bit, bare CR, bare LF).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from kemi_o365.lab import seed_sdp

CRLF = b"\r\n"


def _join(start: str, headers: list[tuple[str, str]], body: str) -> bytes:
    lines = [start, *(f"{n}: {v}" for n, v in headers), f"Content-Length: {len(body.encode())}"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def cucm_offer_sdp(ip: str, port: int) -> str:
    return seed_sdp.cucm_offer(ip, port)


def microsoft_sdp(ip: str, port: int) -> str:
    lines = [
        "v=0",
        f"o=- 85 0 IN IP4 {ip}",
        "s=session",
        f"c=IN IP4 {ip}",
        "t=0 0",
        f"m=audio {port} RTP/SAVP 0 101",
        "c=IN IP4 127.0.0.25",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16,36",
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:FHoHEZk7wM6b/frTeX+fzQ/K0PtuAvfIzRqjol9K",
    ]
    return "\r\n".join(lines) + "\r\n"


def seed_invite(
    *, ruri_host: str, local_ip: str, local_port: int, transport: str, call_id: str, branch: str
) -> bytes:
    """CUCM 9.1's INVITE of the seed call (sipp-scenarios/seed-call/uac.xml), header for header."""
    caller = '"10048 - Armstrong, Clint" <sip:10048@' + local_ip + ">"
    headers = [
        ("Via", f"SIP/2.0/{transport.upper()} {local_ip}:{local_port};branch=z9hG4bK{branch};rport"),
        ("From", f"{caller};tag=94213~3cc43a48-{branch}"),
        ("To", f"<sip:87000@{ruri_host}>"),
        ("Date", "Tue, 25 Nov 2025 14:00:00 GMT"),
        ("Call-ID", call_id),
        ("Supported", "timer,resource-priority,replaces"),
        ("Min-SE", " 1800"),
        ("User-Agent", "Cisco-CUCM9.1"),
        ("CSeq", "101 INVITE"),
        ("Expires", "180"),
        ("Allow-Events", "presence, kpml"),
        ("Supported", "X-cisco-srtp-fallback,X-cisco-original-called"),
        ("Cisco-Guid", "3357373952-0000065536-0000032693-0872546314"),
        ("Session-Expires", " 1800"),
        ("P-Asserted-Identity", caller),
        ("Remote-Party-ID", f"{caller};party=calling;screen=yes;privacy=off"),
        ("Contact", f"<sip:10048@{local_ip}:{local_port};transport={transport}>"),
        ("Max-Forwards", "70"),
        ("Content-Type", "application/sdp"),
    ]
    start = f"INVITE sip:87000@{ruri_host};transport={transport} SIP/2.0"
    return _join(start, headers, cucm_offer_sdp(local_ip, 24000))


def microsoft_invite(*, sbc_host: str, local_ip: str, local_port: int, call_id: str, branch: str) -> bytes:
    """An INVITE as Exchange UM starts one toward the SBC (Play on Phone), over TLS."""
    headers = [
        ("Via", f"SIP/2.0/TLS {local_ip}:{local_port};branch=z9hG4bK{branch}"),
        ("From", f"<sip:87000@um.example.net>;tag=ms{branch}"),
        ("To", f"<sip:10048@{sbc_host}>"),
        ("Call-ID", call_id),
        ("CSeq", "1 INVITE"),
        ("Contact", f"<sip:um.example.net:{local_port};transport=tls>"),
        ("Max-Forwards", "70"),
        ("User-Agent", "RTCC/ MSExchangeUM/15.01.0231.021"),
        ("Content-Type", "application/sdp"),
    ]
    start = f"INVITE sip:10048@{sbc_host};transport=tls SIP/2.0"
    return _join(start, headers, microsoft_sdp(local_ip, 54532))


def seed_ok(
    *, sbc_host: str, sbc_port: int, cucm_ip: str, cucm_port: int, call_id: str, branch: str
) -> bytes:
    """Exchange UM's 200 OK of the seed capture (000_cbe866ecd25117ec.txt), with lab addresses: the
    SBC's Via on top (as if it had relayed the INVITE), then CUCM's."""
    headers = [
        ("To", "<sip:87000@2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net>;tag=ee195713eb"),
        ("Via", f"SIP/2.0/TLS {sbc_host}:{sbc_port};branch=z9hG4bK{branch}.0;i=c"),
        ("Via", f"SIP/2.0/TCP {cucm_ip}:{cucm_port};branch=z9hG4bK{branch}"),
        ("From", f'"10048 - Armstrong, Clint" <sip:10048@{cucm_ip}>;tag=94213~3cc43a48-{branch}'),
        ("Call-ID", call_id),
        ("CSeq", "101 INVITE"),
        ("Record-Route", f"<sip:{sbc_host}:{sbc_port};transport=tls;r2=on;lr>"),
        ("Record-Route", f"<sip:{cucm_ip}:{cucm_port};transport=tcp;r2=on;lr>"),
        ("Contact", "<sip:um.example.net:5061;transport=tls>;automata;text;audio;video;image"),
        ("CONTENT-TYPE", "application/sdp"),
        ("P-ASSERTED-IDENTITY", "<sip:87000@2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net>"),
        ("SERVER", "RTCC/ MSExchangeUM/15.01.0231.021"),
        ("Content-ID", "c0284ce7-716b-4ff2-8ec3-c23379fe1184"),
        ("Session-Expires", "1800;refresher=uac"),
        ("Min-SE", "1800"),
    ]
    return _join("SIP/2.0 200 OK", headers, microsoft_sdp("127.0.0.3", 54532))


# ----- the mutator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    operator: str
    detail: str
    data: bytes


def _split(message: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head.split(CRLF), body


def _assemble(lines: list[bytes], body: bytes, *, fix_length: bool = True) -> bytes:
    if fix_length:
        lines = [
            re.sub(rb"^(Content-Length:\s*)\d+$", rb"\g<1>" + str(len(body)).encode(), ln, flags=re.I)
            for ln in lines
        ]
    return CRLF.join(lines) + b"\r\n\r\n" + body


_BAD_VALUES: dict[bytes, list[bytes]] = {
    b"cseq": [b"abc INVITE", b"-1 INVITE", b"99999999999999999999 INVITE", b"101 BYE", b"101", b""],
    b"max-forwards": [b"-1", b"256", b"abc", b"0", b"99999999999"],
    b"via": [
        b"SIP/2.0/XYZ 127.0.0.4:5060",
        b"SIP/3.0/UDP 127.0.0.4;branch=z9hG4bKx",
        b"SIP/2.0/UDP [::1:5060;branch=z9hG4bK1",
        b"SIP/2.0/UDP 127.0.0.4:99999;branch=z9hG4bK1",
        b"SIP/2.0/UDP ;branch=",
    ],
    b"from": [
        b"<sip:>",
        b"sip:10048@127.0.0.4",
        b'"unterminated <sip:a@b>;tag=1',
        b"<>;tag=",
        b"<sip:a@b;tag=x",
    ],
    b"to": [b"<sip:>", b"<sip:87000@>", b"<sip:87000@pstn-o365.example.com>;tag=", b"<<sip:a@b>>"],
    b"call-id": [b"", b" ", b"@", b"a b c"],
    b"contact": [b"<>", b"*", b"<sip:@:0>", b"<sip:10048@127.0.0.4:abc>", b"sip:a@b?Route=%3Csip:x%3E"],
    b"content-type": [b"application/sdp;;;", b"text/plain", b"application/", b"multipart/mixed;boundary="],
    b"expires": [b"-5", b"99999999999999999999", b"x"],
}

_BAD_M = [
    b"m=audio abc RTP/AVP 0",
    b"m=audio 99999 RTP/AVP 0 101",
    b"m=audio -1 RTP/AVP 0",
    b"m=audio 4000 RTP/AVP",
    b"m=audio 4000 RTP/AVP 0 101 abc 999",
    b"m=",
    b"m=video 0 UDP/TLS/RTP/SAVPF 96",
    b"m=audio 4000/2 RTP/SAVP 0",
    b"m=audio 4000 RTP/FOO 0",
]
_BAD_C = [
    b"c=IN IP4 ",
    b"c=IN IP6 ::1:::",
    b"c=IN IP4 999.1.1.1",
    b"c=XX YY ZZ",
    b"c=IN IP4 0.0.0.0",
    b"c=IN IP4 127.0.0.1/127/3",
    b"c=IN IP6 2001:db8::1",
    b"c=",
]
_ODD = [b"\x00", b"\xff", b"\x80", b"\r", b"\n", b"\xc3\x28", b"\x1b[0m"]


class Mutator:
    """One operator per call, chosen and parameterised by a random.Random(seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.operators: dict[str, Callable[[bytes], tuple[str, bytes]]] = {
            "header-delete": self._header_delete,
            "header-duplicate": self._header_duplicate,
            "header-garble": self._header_garble,
            "header-bad-value": self._header_bad_value,
            "sdp-bad-m": self._sdp_bad_m,
            "sdp-bad-c": self._sdp_bad_c,
            "sdp-huge-attribute": self._sdp_huge_attribute,
            "sdp-missing-line": self._sdp_missing_line,
            "truncate": self._truncate,
            "oversized-field": self._oversized_field,
            "content-length": self._content_length,
            "odd-bytes": self._odd_bytes,
        }

    def mutate(self, message: bytes, operator: str | None = None) -> Mutation:
        name = operator or self.rng.choice(sorted(self.operators))
        detail, data = self.operators[name](message)
        return Mutation(name, detail, data)

    # header operators (the body, hence Content-Length, stays as it was)

    def _header_index(self, lines: list[bytes]) -> int:
        return self.rng.randrange(1, len(lines))

    def _header_delete(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        i = self._header_index(lines)
        name = lines[i].split(b":", 1)[0].decode(errors="replace")
        return f"deleted {name}", _assemble(lines[:i] + lines[i + 1 :], body, fix_length=False)

    def _header_duplicate(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        i = self._header_index(lines)
        copy = lines[i]
        if self.rng.random() < 0.5:  # a second, different value
            name, _, value = copy.partition(b":")
            copy = name + b": " + value.strip()[::-1]
        at = self.rng.randrange(1, len(lines) + 1)
        name_text = lines[i].split(b":", 1)[0].decode(errors="replace")
        return f"duplicated {name_text}", _assemble([*lines[:at], copy, *lines[at:]], body, fix_length=False)

    def _header_garble(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        i = self._header_index(lines)
        line = bytearray(lines[i])
        for _ in range(self.rng.randint(1, 4)):
            pos = self.rng.randrange(len(line))
            line[pos] = self.rng.choice(b':;,<>"@ =%\\?[]')
        name = lines[i].split(b":", 1)[0].decode(errors="replace")
        lines[i] = bytes(line)
        return f"garbled {name}", _assemble(lines, body, fix_length=False)

    def _header_bad_value(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        present = [
            (i, ln.split(b":", 1)[0].strip().lower())
            for i, ln in enumerate(lines[1:], 1)
            if ln.split(b":", 1)[0].strip().lower() in _BAD_VALUES
        ]
        i, name = self.rng.choice(present)
        value = self.rng.choice(_BAD_VALUES[name])
        lines[i] = lines[i].split(b":", 1)[0] + b": " + value
        detail = f"{name.decode()}: {value.decode(errors='replace')!r}"
        return detail, _assemble(lines, body, fix_length=False)

    # SDP operators (Content-Length recomputed, so the SDP itself is what is wrong)

    def _sdp_lines(self, message: bytes) -> tuple[list[bytes], list[bytes]]:
        lines, body = _split(message)
        return lines, body.split(CRLF)

    def _sdp_replace(self, message: bytes, prefix: bytes, choices: list[bytes]) -> tuple[str, bytes]:
        lines, sdp = self._sdp_lines(message)
        found = [i for i, ln in enumerate(sdp) if ln.startswith(prefix)]
        new = self.rng.choice(choices)
        if found:
            sdp[self.rng.choice(found)] = new
        else:
            sdp.insert(max(0, len(sdp) - 1), new)
        return f"SDP {new.decode(errors='replace')!r}", _assemble(lines, CRLF.join(sdp))

    def _sdp_bad_m(self, message: bytes) -> tuple[str, bytes]:
        return self._sdp_replace(message, b"m=", _BAD_M)

    def _sdp_bad_c(self, message: bytes) -> tuple[str, bytes]:
        return self._sdp_replace(message, b"c=", _BAD_C)

    def _sdp_huge_attribute(self, message: bytes) -> tuple[str, bytes]:
        lines, sdp = self._sdp_lines(message)
        size = self.rng.choice([1024, 4096, 8000])
        attribute = b"a=" + self.rng.choice(
            [b"x-junk:", b"crypto:2 AES_CM_128_HMAC_SHA1_80 inline:", b"fmtp:101 "]
        )
        sdp.insert(max(0, len(sdp) - 1), attribute + b"A" * size)
        return f"SDP attribute of {size} bytes", _assemble(lines, CRLF.join(sdp))

    def _sdp_missing_line(self, message: bytes) -> tuple[str, bytes]:
        lines, sdp = self._sdp_lines(message)
        candidates = [i for i, ln in enumerate(sdp) if ln]
        i = self.rng.choice(candidates)
        gone = sdp.pop(i)
        return f"SDP without {gone[:12].decode(errors='replace')!r}", _assemble(lines, CRLF.join(sdp))

    # framing and size

    def _truncate(self, message: bytes) -> tuple[str, bytes]:
        cut = self.rng.randrange(1, len(message))
        return f"cut at {cut} of {len(message)} bytes", message[:cut]

    def _oversized_field(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        size = self.rng.choice([10 * 1024, 12 * 1024])
        where = self.rng.choice(["Subject", "From", "Via", "X-Fuzz"])
        filler = b"x" * size
        if where in {"Subject", "X-Fuzz"}:
            lines.insert(self._header_index(lines), where.encode() + b": " + filler)
        else:
            i = next((k for k, ln in enumerate(lines) if ln.lower().startswith(where.lower().encode())), 1)
            lines[i] = lines[i] + b";x=" + filler
        return f"{where} grown by {size} bytes", _assemble(lines, body, fix_length=False)

    def _content_length(self, message: bytes) -> tuple[str, bytes]:
        lines, body = _split(message)
        value = self.rng.choice(
            [
                str(len(body) + self.rng.randint(1, 50)).encode(),
                str(max(0, len(body) - self.rng.randint(1, 50))).encode(),
                b"-1",
                b"-999",
                b"99999999999",
                b"4294967296",
                b"abc",
                b"",
                None,
            ]
        )
        kept = [ln for ln in lines if not ln.lower().startswith(b"content-length")]
        if value is not None:
            kept.append(b"Content-Length: " + value)
        text = "removed" if value is None else value.decode()
        return f"Content-Length {text} (body {len(body)})", _assemble(kept, body, fix_length=False)

    def _odd_bytes(self, message: bytes) -> tuple[str, bytes]:
        data = bytearray(message)
        inserted = []
        for _ in range(self.rng.randint(1, 5)):
            odd = self.rng.choice(_ODD)
            pos = self.rng.randrange(len(data))
            data[pos:pos] = odd
            inserted.append(f"{odd!r}@{pos}")
        return "inserted " + ", ".join(inserted), bytes(data)
