"""SIP messages as plain data, for the lab peers, preflight and the tests (never imported by Kamailio).

Rule: parsing is lenient enough to read what Kamailio, SIPp and our peers send, and strict enough
to refuse a stream that is not SIP; it does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CRLF = "\r\n"

# RFC 3261 §7.3.3 compact forms, so lookups work whichever form a peer used.
_COMPACT = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
}


class SipParseError(ValueError):
    """The bytes are not a SIP message we can read."""


def _canon(name: str) -> str:
    low = name.strip().lower()
    return _COMPACT.get(low, low)


@dataclass
class SipMessage:
    """One SIP request or response: start line, ordered headers, body."""

    start_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""

    @property
    def is_request(self) -> bool:
        return not self.start_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str:
        """Request method, or the CSeq method of a response."""
        if self.is_request:
            return self.start_line.split(" ", 1)[0]
        return self.get("CSeq").split()[-1]

    @property
    def status(self) -> int:
        if self.is_request:
            raise ValueError("a request has no status")
        return int(self.start_line.split(" ", 2)[1])

    @property
    def ruri(self) -> str:
        return self.start_line.split(" ")[1]

    def get_all(self, name: str) -> list[str]:
        want = _canon(name)
        return [v for n, v in self.headers if _canon(n) == want]

    def get(self, name: str, default: str = "") -> str:
        values = self.get_all(name)
        return values[0] if values else default

    def has(self, name: str) -> bool:
        return bool(self.get_all(name))

    def set(self, name: str, value: str) -> None:
        """Replace every header of that name by one, in the place of the first."""
        want = _canon(name)
        out: list[tuple[str, str]] = []
        done = False
        for n, v in self.headers:
            if _canon(n) == want:
                if not done:
                    out.append((name, value))
                    done = True
                continue
            out.append((n, v))
        if not done:
            out.append((name, value))
        self.headers = out

    def remove(self, name: str) -> None:
        want = _canon(name)
        self.headers = [(n, v) for n, v in self.headers if _canon(n) != want]

    def to_bytes(self) -> bytes:
        """Serialise with a correct Content-Length (body counted in bytes)."""
        body = self.body.encode()
        lines = [self.start_line]
        lines += [f"{n}: {v}" for n, v in self.headers if _canon(n) != "content-length"]
        lines.append(f"Content-Length: {len(body)}")
        return (CRLF.join(lines) + CRLF + CRLF).encode() + body

    def __str__(self) -> str:
        return self.to_bytes().decode(errors="replace")

    @property
    def sdp_lines(self) -> list[str]:
        return [ln for ln in self.body.replace(CRLF, "\n").split("\n") if ln]


def parse(data: bytes | str) -> SipMessage:
    """Parse one complete message (headers, blank line, body)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    head, sep, body = text.partition("\r\n\r\n")
    if not sep:
        head, sep, body = text.partition("\n\n")
    raw_lines = re.split(r"\r?\n", head)
    if not raw_lines or not raw_lines[0].strip():
        raise SipParseError("empty message")
    start = raw_lines[0].strip()
    if not (start.startswith("SIP/2.0 ") or start.endswith(" SIP/2.0")):
        raise SipParseError(f"not a SIP start line: {start[:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in raw_lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # RFC 3261 §7.3.1 folded header line
            n, v = headers[-1]
            headers[-1] = (n, v + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SipParseError(f"header line without colon: {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return SipMessage(start, headers, body)


class StreamReader:
    """Cuts SIP messages out of a byte stream (TCP/TLS), by Content-Length (RFC 3261 §18.3)."""

    def __init__(self) -> None:
        self._buf = b""
        self.keepalives = 0
        """Double-CRLF keep-alive pings seen between messages (RFC 5626 §3.5.1)."""

    def feed(self, data: bytes) -> list[SipMessage]:
        self._buf += data
        out: list[SipMessage] = []
        while True:
            # Keep-alive CRLFs between messages (RFC 5626 §3.5.1) carry nothing; count the pings.
            stripped = self._buf.lstrip(b"\r\n")
            self.keepalives += (len(self._buf) - len(stripped)) // 4
            self._buf = stripped
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head = self._buf[:end].decode("utf-8", errors="replace")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if _canon(name) == "content-length":
                    try:
                        length = int(value.strip())
                    except ValueError as exc:
                        raise SipParseError(f"bad Content-Length {value.strip()!r}") from exc
            total = end + 4 + length
            if len(self._buf) < total:
                return out
            raw, self._buf = self._buf[:total], self._buf[total:]
            out.append(parse(raw))


def header_param(value: str, name: str) -> str | None:
    """A ;name=value parameter of a header value (tag, branch, received...)."""
    m = re.search(r";\s*" + re.escape(name) + r"=([^;>,\s]+)", value, re.IGNORECASE)
    return m.group(1) if m else None


def uri_of(value: str) -> str:
    """The URI inside a name-addr (`"x" <sip:a@b>;tag=1` -> `sip:a@b`) or the addr-spec itself."""
    m = re.search(r"<([^>]*)>", value)
    if m:
        return m.group(1)
    return value.split(";", 1)[0].strip()


def uri_host(uri: str) -> str:
    """Host part of a SIP URI, without port or parameters."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[1] if "@" in rest else rest
    rest = re.split(r"[;?>]", rest, maxsplit=1)[0]
    if rest.startswith("["):
        return rest[: rest.index("]") + 1]
    return rest.split(":", 1)[0]
