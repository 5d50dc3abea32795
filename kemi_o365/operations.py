"""What the people running the SBC see of each call: Prometheus counters and one JSON record per call.

Rule: no routing choices and no KSR here. The handler calls these around its read/decide/apply steps;
Kamailio is reached only through the adapter, rtpengine's statistics through its ng socket.
"""

from __future__ import annotations

import time

from kemi_o365 import calls, metrics, rtpengine_ng, topology
from kemi_o365 import ksr_adapter as adapter
from kemi_o365.decision import FailedBranch
from kemi_o365.policy.model import Policy
from kemi_o365.request import Method, Reply, Request, Side
from kemi_o365.routing import MICROSOFT_SET

RECORD_PREFIX = "kemi-o365 call-record "
# Local failures, not answers from Microsoft: a timeout (tm's 408) and a connection that failed (477).
_LOCAL_CODES = frozenset({408, 477})


def direction(side: Side) -> str:
    return {Side.CUCM: "to_microsoft", Side.MICROSOFT: "to_cucm"}.get(side, "unknown")


def plain_call_id(policy: Policy, call_id: str) -> str:
    """The Call-ID calls and rtpengine are keyed by: CUCM's own when Microsoft's copy is masked."""
    return topology.masker(policy).unmask(call_id) or call_id


def media_stats(policy: Policy, call_id: str, caller_tag: str) -> dict[str, int] | None:
    """rtpengine's packet counts for the call, read just before the SBC deletes the session."""
    rtp = policy.rtpengine
    try:
        reply = rtpengine_ng.command(
            rtp.control_address, rtp.control_port, {"command": "query", "call-id": call_id}, timeout=0.2
        )
    except (rtpengine_ng.NgError, OSError):
        metrics.RTPENGINE_ERRORS.labels("query").inc()
        return None
    return calls.media_summary(reply, caller_tag)


def initial_invite(policy: Policy, req: Request, outcome: int) -> None:
    """A new call from either side: counted, and remembered until it ends when it was relayed."""
    way = direction(req.side)
    if outcome == adapter.RELAYED:
        metrics.CALLS_ATTEMPTED.labels(way).inc()
        caller, callee = adapter.parties()
        state = calls.start_state(req.call_id, caller, callee, way, time.time())
        adapter.set_call_state(req.call_id, state)
    elif outcome >= 300:
        metrics.CALLS_FAILED.labels(way, str(outcome)).inc()
        caller, callee = adapter.parties()
        now = time.time()
        state = calls.start_state(req.call_id, caller, callee, way, now)
        _log(calls.record(state, ended=now, code=outcome, hung_up_by="sbc", diagnostic=None, media=None))


def ending_call(policy: Policy, req: Request) -> tuple[str, str] | None:
    """Before a BYE is relayed: the call it ends and what is known of it (None: not a call of ours)."""
    if req.method is not Method.BYE:
        return None
    call_id = plain_call_id(policy, req.call_id)
    state = adapter.call_state(call_id)
    if not state:
        return None
    return call_id, state


def _caller_tag(state: str, req: Request) -> str:
    # The caller's tag is the From tag of requests the caller sends, the To tag of the callee's.
    caller_side = Side.CUCM if calls.state_direction(state) == "to_microsoft" else Side.MICROSOFT
    return adapter.from_tag() if req.side is caller_side else adapter.to_tag()


def call_ended(req: Request, ending: tuple[str, str]) -> None:
    """After the BYE was relayed and rtpengine's session deleted (its reply holds the final counts)."""
    call_id, state = ending
    final = adapter.final_media_stats()
    if final is None:
        metrics.RTPENGINE_ERRORS.labels("delete").inc()
    media = calls.media_summary(final, _caller_tag(state, req)) if final is not None else None
    reason, ms_diag = adapter.diagnostic_headers(in_reply=False)
    who = "cucm" if req.side is Side.CUCM else "microsoft"
    _log(
        calls.record(
            state,
            ended=time.time(),
            code=200,
            hung_up_by=who,
            diagnostic=calls.diagnostic(reason, ms_diag),
            media=media,
        )
    )
    adapter.forget_call(call_id)


def answered(policy: Policy, reply: Reply) -> None:
    """The first 2xx to a call's INVITE: counted once, whichever worker sees retransmissions."""
    if reply.cseq_method is not Method.INVITE or not 200 <= reply.status < 300:
        return
    call_id = plain_call_id(policy, reply.call_id)
    state = adapter.call_state(call_id)
    if not state or calls.is_answered(state):
        return
    adapter.set_call_state(call_id, calls.with_answer(state, time.time()))
    metrics.CALLS_ANSWERED.labels("to_microsoft" if reply.side is Side.MICROSOFT else "to_cucm").inc()


def call_failed(policy: Policy, branch: FailedBranch, *, toward_microsoft: bool) -> None:
    """A relayed INVITE's final failure (no failover left): counted, Microsoft's rule named, logged."""
    way = "to_microsoft" if toward_microsoft else "to_cucm"
    code = branch.status
    metrics.CALLS_FAILED.labels(way, str(code)).inc()
    reason, ms_diag = adapter.diagnostic_headers(in_reply=True)
    if toward_microsoft and code >= 400 and code not in _LOCAL_CODES and not branch.canceled:
        rule = calls.rejection_rule(adapter.failed_reply_warning(), ms_diag)
        metrics.MICROSOFT_REJECTIONS.labels(rule, str(code)).inc()
    call_id = adapter.call_id()
    state = adapter.call_state(call_id)
    if not state:
        return
    if branch.canceled:
        who = "cucm" if toward_microsoft else "microsoft"
    elif code in _LOCAL_CODES:
        who = "sbc"
    else:
        who = "microsoft" if toward_microsoft else "cucm"
    media = media_stats(policy, call_id, adapter.from_tag())
    _log(
        calls.record(
            state,
            ended=time.time(),
            code=code,
            hung_up_by=who,
            diagnostic=calls.diagnostic(reason, ms_diag),
            media=media,
        )
    )
    adapter.forget_call(call_id)


def _log(line: str) -> None:
    adapter.log_info(RECORD_PREFIX + line)


def scrape(policy: Policy) -> tuple[int, str, str, str]:
    """The answer to an HTTP request on the metrics listener: (code, reason, content type, body)."""
    port, url = adapter.http_request()
    if policy.metrics is None or port != policy.metrics.port:
        return 403, "Forbidden", "text/plain", "not the metrics listener\n"
    if url.split("?", 1)[0] != "/metrics":
        return 404, "Not Found", "text/plain", "try /metrics\n"
    rtp = policy.rtpengine
    try:
        metrics.ACTIVE_CALLS.set(len(rtpengine_ng.list_calls(rtp.control_address, rtp.control_port)))
    except (rtpengine_ng.NgError, OSError):
        metrics.RTPENGINE_ERRORS.labels("list").inc()
    for proxy in policy.microsoft.proxies:
        uri = f"sip:{proxy.fqdn}:{proxy.port};transport=tls"
        metrics.PROXY_UP.labels(proxy.fqdn).set(1 if adapter.proxy_active(MICROSOFT_SET, uri) else 0)
    return 200, "OK", metrics.CONTENT_TYPE, metrics.exposition().decode()
