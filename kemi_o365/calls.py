"""Call records: one JSON line per finished call, and the words behind Microsoft's diagnostics.

Rule: pure. The handler passes the clock readings and what it read from Kamailio and rtpengine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# ITU-T Q.850 causes Microsoft and CUCM send most (Reason: Q.850;cause=N, RFC 3326).
Q850 = {
    1: "unallocated number",
    16: "normal call clearing",
    17: "user busy",
    18: "no user responding",
    19: "no answer from user",
    21: "call rejected",
    27: "destination out of order",
    28: "invalid number format",
    31: "normal, unspecified",
    34: "no circuit available",
    38: "network out of order",
    41: "temporary failure",
    47: "resource unavailable",
    65: "bearer capability not implemented",
    88: "incompatible destination",
    102: "recovery on timer expiry",
    127: "interworking, unspecified",
}

_PARAM = re.compile(r'(\w+)\s*=\s*("([^"]*)"|[^;,\s]+)')
_QUOTED = re.compile(r'"([^"]*)"')


def _params(value: str) -> dict[str, str]:
    return {m[1].lower(): (m[3] if m[3] is not None else m[2]) for m in _PARAM.finditer(value)}


def diagnostic(reason: str, ms_diagnostics: str) -> str | None:
    """Microsoft's (or CUCM's) explanation in words: ms-diagnostics first (Microsoft's own code and
    reason), then the Reason header (Q.850 cause, RFC 3326), None when neither says anything."""
    parts = []
    if ms_diagnostics.strip():
        code = ms_diagnostics.strip().split(";", 1)[0].strip()
        words = _params(ms_diagnostics).get("reason", "")
        parts.append(f"ms-diagnostics {code}: {words}".rstrip(": "))
    if reason.strip():
        protocol = reason.strip().split(";", 1)[0].strip()
        p = _params(reason)
        cause = p.get("cause", "")
        text = p.get("text") or (
            Q850.get(int(cause), "") if cause.isdigit() and protocol.upper() == "Q.850" else ""
        )
        parts.append(f"{protocol} cause {cause}: {text}".rstrip(": ") if cause else f"{protocol}: {text}")
    return "; ".join(parts) or None


def rejection_rule(warning: str, ms_diagnostics: str) -> str:
    """The rule a Microsoft refusal names: the first word of its Warning text ("399 host "rule:
    detail"", RFC 3261 §20.43), else the ms-diagnostics code, else "unnamed"."""
    quoted = _QUOTED.search(warning)
    if quoted:
        rule = quoted[1].split(":", 1)[0].strip()
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", rule):
            return rule
    code = ms_diagnostics.strip().split(";", 1)[0].strip()
    return f"ms-diagnostics-{code}" if code.isdigit() else "unnamed"


def media_summary(query: Mapping[str, Any], caller_tag: str) -> dict[str, int]:
    """Packet counts from rtpengine's query/delete statistics: RTP received from each party
    (rtpengine counts per From/To tag), RTP errors, and packets lost where RTCP reported it."""
    out = {"rtp_from_caller": 0, "rtp_from_callee": 0, "rtp_errors": 0, "rtcp_packets": 0, "lost": 0}
    tags = query.get("tags", {})
    for tag, info in tags.items() if isinstance(tags, Mapping) else ():
        key = "rtp_from_caller" if _text(tag) == caller_tag else "rtp_from_callee"
        for media in info.get("medias", []) if isinstance(info, Mapping) else ():
            for stream in media.get("streams", []):
                stats = stream.get("stats", {})
                flags = [_text(f) for f in stream.get("flags", [])]
                if "RTCP" in flags:
                    out["rtcp_packets"] += int(stats.get("packets", 0))
                else:
                    out[key] += int(stats.get("packets", 0))
                    out["rtp_errors"] += int(stats.get("errors", 0))
    ssrcs = query.get("SSRC", {})
    for info in ssrcs.values() if isinstance(ssrcs, Mapping) else ():
        lowest = info.get("lowest MOS", {}) if isinstance(info, Mapping) else {}
        out["lost"] += int(lowest.get("packet loss", 0)) if isinstance(lowest, Mapping) else 0
    return out


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def start_state(call_id: str, caller: str, callee: str, direction: str, now: float) -> str:
    """What is kept (Kamailio htable, shared by every worker) from the INVITE until the call ends."""
    return json.dumps(
        {"call_id": call_id, "from": caller, "to": callee, "direction": direction, "start": now}
    )


def state_direction(state: str) -> str:
    return str(json.loads(state).get("direction", ""))


# start_state writes json.dumps' default separators; inside a string value the quotes would be escaped.
_ANSWER_KEY = '"answer": '


def is_answered(state: str) -> bool:
    return _ANSWER_KEY in state


def with_answer(state: str, now: float) -> str:
    """The kept state once the call is answered (the first 2xx only): one more key, appended as
    text (this runs in the reply path of every call; no need to decode and encode the whole)."""
    if is_answered(state) or not state.endswith("}"):
        return state
    return f"{state[:-1]}, {_ANSWER_KEY}{json.dumps(now)}}}"


def record(
    state: str,
    *,
    ended: float,
    code: int,
    hung_up_by: str,
    diagnostic: str | None,
    media: Mapping[str, int] | None,
) -> str:
    """The call's one JSON line: Call-ID, parties, direction, times (UNIX seconds), final code, who
    ended it, Microsoft's diagnostic and rtpengine's packet counts."""
    start: dict[str, Any] = json.loads(state)
    answered = start.get("answer")
    start.update(
        answer=answered,
        end=ended,
        duration_s=round(ended - answered, 3) if answered else 0.0,
        final_code=code,
        hung_up_by=hung_up_by,
        diagnostic=diagnostic,
        media=dict(media) if media is not None else None,
    )
    return json.dumps(start, separators=(",", ":"))
