"""Readable SIP ladder diagrams (plain ASCII) for test failures and lab reports.

    time     CUCM (SIPp)          SBC (Kamailio)       Microsoft (TLS peer)
                  |                     |                     |
                  |  INVITE sip:87000@pstn-o365.example.com (SDP RTP/AVP, PCMU ...)
    +0.000        |-------------------->|                     |
                  |              INVITE sip:87000@... (SDP RTP/SAVP, crypto, ...)
    +0.004        |                     |-------------------->|

Events are drawn in the order given (callers merge and sort traces from several peers themselves, since
their clocks and their idea of "the same moment" differ); time is relative to the earliest event.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kemi_o365.sipmsg import SipMessage, uri_host

# RFC 3551 static payload types: an SDP may name them only by number, with no a=rtpmap.
_STATIC_PT = {"0": "PCMU", "3": "GSM", "4": "G723", "8": "PCMA", "9": "G722", "18": "G729"}


@dataclass(frozen=True)
class LadderEvent:
    at: float  # epoch seconds
    src: str  # column name
    dst: str  # column name; equal to src for something that happened inside one party
    label: str
    note: str = ""


# ---------------------------------------------------------------------------------------------------------
# Labels.
# ---------------------------------------------------------------------------------------------------------


def _short_uri(uri: str) -> str:
    """sip:user@host without port and parameters: what a reader needs to follow a call."""
    scheme = uri.split(":", 1)[0] if ":" in uri else "sip"
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    user = rest.split("@", 1)[0] + "@" if "@" in rest else ""
    return f"{scheme}:{user}{uri_host(uri)}"


def _sdp_sections(lines: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Session-level lines, then one list of lines per m= section (starting with its m= line)."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def _codecs(m_line: str, attrs: Sequence[str]) -> list[str]:
    names: dict[str, str] = {}
    for a in attrs:
        hit = re.match(r"a=rtpmap:(\d+)\s+([^/\s]+)", a)
        if hit:
            names[hit.group(1)] = hit.group(2)
    return [names.get(pt, _STATIC_PT.get(pt, pt)) for pt in m_line.split()[3:]]


def _media_summary(section: Sequence[str], session: Sequence[str]) -> str:
    # m=<media> <port> <proto> <fmt>... (RFC 4566 5.14); pad so a truncated line cannot raise.
    kind, port, proto = [*section[0].removeprefix("m=").split(), "", "", ""][:3]
    attrs = [*session, *section[1:]]
    bits = [proto if kind == "audio" else f"{kind} {proto}"]
    if port == "0":
        bits.append("port 0")
    # The features Microsoft's SIP proxy is picky about (crypto required, no ICE, no rtcp-mux).
    for prefix, name in (("a=crypto:", "crypto"), ("a=fingerprint:", "DTLS"), ("a=ice-ufrag:", "ICE")):
        if any(a.startswith(prefix) for a in attrs):
            bits.append(name)
    if "a=rtcp-mux" in attrs:
        bits.append("rtcp-mux")
    for direction in ("a=sendonly", "a=recvonly", "a=inactive"):
        if direction in attrs:
            bits.append(direction.removeprefix("a="))
    codecs = _codecs(section[0], section[1:])
    if codecs:
        bits.append(" ".join(codecs))
    return ", ".join(bits)


def sdp_summary(msg: SipMessage) -> str:
    """'SDP RTP/SAVP, crypto, PCMU telephone-event' or '' when the message carries no SDP."""
    ctype = msg.get("Content-Type").lower()
    if "application/sdp" not in ctype and not msg.body.lstrip().startswith("v=0"):
        return ""
    session, media = _sdp_sections(msg.sdp_lines)
    if not media:
        return "SDP"
    return "SDP " + "; ".join(_media_summary(sec, session) for sec in media)


def describe(msg: SipMessage) -> str:
    """Short ladder label: 'INVITE sip:87000@host (SDP RTP/AVP, PCMU telephone-event)', '200 OK (BYE)'."""
    if msg.is_request:
        head = f"{msg.method} {_short_uri(msg.ruri)}"
    else:
        head = msg.start_line.split(" ", 1)[1]
        if msg.method != "INVITE":
            head += f" ({msg.method})"  # which transaction: a bare "200 OK" after a BYE is ambiguous
    sdp = sdp_summary(msg)
    return f"{head} ({sdp})" if sdp else head


# ---------------------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------------------


class _Canvas:
    """One text row at a time, with the lifelines pre-drawn."""

    def __init__(self, width: int, xs: Sequence[int]) -> None:
        self.width = width
        self.xs = xs

    def row(self) -> list[str]:
        cells = [" "] * self.width
        for x in self.xs:
            cells[x] = "|"
        return cells

    def put(self, cells: list[str], start: int, text: str, lo: int) -> None:
        """Write text from start, kept inside [lo, width)."""
        start = max(lo, min(start, self.width - len(text)))
        for i, ch in enumerate(text[: self.width - start]):
            cells[start + i] = ch

    def centre(self, cells: list[str], mid: int, text: str, lo: int) -> None:
        self.put(cells, mid - len(text) // 2, text, lo)


def _time_labels(events: Sequence[LadderEvent]) -> list[str]:
    if not events:
        return []
    t0 = min(e.at for e in events)
    return [f"+{e.at - t0:.3f}" for e in events]


def render_ladder(columns: Sequence[str], events: Sequence[LadderEvent], width: int = 100) -> str:
    """Draw events between columns as an ASCII ladder; relative seconds (ms precision) on the left."""
    if not columns:
        raise ValueError("a ladder needs at least one column")
    index = {name: i for i, name in enumerate(columns)}
    for e in events:
        for end in (e.src, e.dst):
            if end not in index:
                raise ValueError(f"event {e.label!r}: unknown column {end!r} (columns: {list(columns)})")
    times = _time_labels(events)
    gutter = max([len("time"), *map(len, times)]) + 1
    spacing = max(4, (width - gutter) // len(columns))
    xs = [gutter + spacing * i + spacing // 2 for i in range(len(columns))]
    width = max(width, xs[-1] + 1)
    canvas = _Canvas(width, xs)

    head = [" "] * width
    canvas.put(head, 0, "time", 0)
    for name, x in zip(columns, xs, strict=True):
        canvas.centre(head, x, name[: spacing - 1], gutter)
    lines = [head, canvas.row()]
    for event, stamp in zip(events, times, strict=True):
        lines += _event_rows(
            canvas, event, stamp, a=xs[index[event.src]], b=xs[index[event.dst]], gutter=gutter
        )
    return "\n".join("".join(cells).rstrip() for cells in lines) + "\n"


def _event_rows(
    canvas: _Canvas, e: LadderEvent, stamp: str, *, a: int, b: int, gutter: int
) -> list[list[str]]:
    label, arrow = canvas.row(), canvas.row()
    canvas.put(arrow, 0, stamp, 0)
    if a == b:  # something one party did on its own: a mark on its lifeline, text to the right
        canvas.put(arrow, a + 1, f" * {e.label}", gutter)
        rows = [arrow]
    else:
        lo, hi = sorted((a, b))
        for x in range(lo + 1, hi):
            arrow[x] = "-"
        if b > a:
            arrow[hi - 1] = ">"
        else:
            arrow[lo + 1] = "<"
        canvas.centre(label, (lo + hi) // 2 + 1, e.label, gutter)
        rows = [label, arrow]
    if e.note:
        note = canvas.row()
        canvas.centre(note, (a + b) // 2 + 1, f"({e.note})", gutter)
        rows.append(note)
    return rows


def events_from_trace(
    messages: Sequence[tuple[float, str, SipMessage]], me: str, peer: str
) -> list[LadderEvent]:
    """Ladder events from one party's (at, "sent"|"received", msg) trace, e.g. a SIPp run:
    [(t.at, t.direction, t.msg) for t in result.messages]."""
    return [
        LadderEvent(at, me if direction == "sent" else peer, peer if direction == "sent" else me, describe(m))
        for at, direction, m in messages
    ]
