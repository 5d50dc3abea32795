"""Entry point for Kamailio's app_python3: `mod_init()` returns the handler object.

Rule: each ksr_* method is a few lines: read facts, decide, apply. Every callback returns the int 1
(a None return leaves a pending TypeError that breaks the worker's next message: KAMAILIO-NOTES P2),
and no exception escapes into Kamailio: it is logged with the Call-ID and answered with 500.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable

import KSR

from kemi_o365 import ksr_adapter as adapter
from kemi_o365 import metrics, operations, routing
from kemi_o365.decision import GiveUp, Respond
from kemi_o365.policy.errors import PolicyError, Problem
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy
from kemi_o365.policy.reload import restart_needed
from kemi_o365.request import Method, Side

POLICY_ENV = "KEMI_O365_POLICY"


class Kamailio:
    """The object app_python3 calls for every SIP message."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def child_init(self, rank: int) -> int:
        # Each forked process says which policy it runs (`kemi-o365 status`); reloads update it.
        adapter.record_policy(self.policy.version, str(self.policy.source))
        return 0

    def ksr_request_route(self, msg: object) -> int:
        return self._guarded("request", self._request)

    def ksr_stray_reply(self, msg: object, evname: str = "") -> int:
        # tm's on_sl_reply: a reply no transaction knows. The core would forward it statelessly by
        # its Via, past rtpengine and topology hiding; nothing the SBC sent is waiting for it.
        try:
            adapter.drop_reply()
        except Exception as exc:
            metrics.HANDLER_EXCEPTIONS.labels("stray reply").inc()
            KSR.err(f"kemi-o365: internal error in stray reply handler: {exc!r}\n")
        return 1

    def ksr_onsend_route(self, msg: object) -> int:
        return 1

    def ksr_onreply_initial(self, msg: object) -> int:
        if adapter.is_trying():
            return 1
        return self._guarded("reply", lambda: self._reply(initial=True))

    def ksr_onreply_in_dialog(self, msg: object) -> int:
        if adapter.is_trying():
            return 1
        return self._guarded("reply", lambda: self._reply(initial=False))

    def ksr_failure_microsoft(self, msg: object) -> int:
        return self._guarded("failure", lambda: self._failure(toward_microsoft=True))

    def ksr_failure_cucm(self, msg: object) -> int:
        return self._guarded("failure", lambda: self._failure(toward_microsoft=False))

    def ksr_crlf_keepalive(self, msg: object, evname: str = "") -> int:
        return self._guarded(
            "keep-alive", lambda: adapter.send_keepalives(routing.keepalive_targets(self.policy))
        )

    def ksr_tm_event(self, msg: object, evname: str) -> int:
        if evname == "tm:local-request":
            self._guarded("tm event", lambda: adapter.add_ping_contact(routing.sbc_contact(self.policy)))
        return 1

    def ksr_onreply_late_offer(self, msg: object) -> int:
        if adapter.is_trying():
            return 1
        return self._guarded("reply", lambda: self._reply(initial=False, late_offer=True))

    def _request(self) -> None:
        source_ip, local_ip, local_port = adapter.source()
        side = adapter.side_of(local_ip, local_port, self.policy)
        # Before anything is parsed or answered: a flood must cost as little as possible.
        limit = self.policy.sbc.flood_limit
        if routing.flood_limited(side, source_ip, self.policy) and adapter.flood_refused(
            source_ip, limit.ban_seconds
        ):
            return
        if not adapter.passes_sanity():
            return
        if side is Side.CUCM:
            ping = adapter.plain_ping()
            quick = routing.cucm_ping(source_ip, *ping, self.policy) if ping is not None else None
            if quick is not None:
                adapter.apply(quick)
                return
        request = adapter.read_request(self.policy, source_ip, side)
        decision = routing.decide(request, self.policy)
        if isinstance(decision, Respond) and decision.code >= 400:
            # Refusals are what an operator greps for when a peer "cannot get in".
            KSR.warn(
                f"kemi-o365: {decision.code} {decision.reason} to {request.method} from "
                f"{request.source_ip}:{request.source_port} on the {request.side} side "
                f"(Call-ID {adapter.call_id()})\n"
            )
        ending = operations.ending_call(self.policy, request) if request.to_tag else None
        try:
            outcome = adapter.apply(decision)
        except adapter.MediaRelayError as exc:
            # Answered 503 by the adapter; the call never started.
            outcome = 503
            metrics.RTPENGINE_ERRORS.labels("offer").inc()
            KSR.err(f"kemi-o365: request Call-ID {adapter.call_id()}: {exc}, answered 503\n")
        if request.method is Method.INVITE and not request.to_tag:
            operations.initial_invite(self.policy, request, outcome)
        elif ending is not None and outcome == adapter.RELAYED:
            operations.call_ended(request, ending)

    def _reply(self, *, initial: bool, late_offer: bool = False) -> None:
        reply = adapter.read_reply(self.policy)
        adapter.apply_reply(routing.on_reply(reply, self.policy, initial=initial, late_offer=late_offer))
        if initial:
            operations.answered(self.policy, reply)

    def _failure(self, *, toward_microsoft: bool) -> None:
        branch = adapter.read_failed_branch()
        action = routing.on_failure(branch, self.policy, toward_microsoft=toward_microsoft)
        if isinstance(action, GiveUp):
            # Before the media session goes: the record carries rtpengine's counts.
            operations.call_failed(self.policy, branch, toward_microsoft=toward_microsoft)
        adapter.apply_failure(action)

    def ksr_xhttp_event(self, msg: object, evname: str = "") -> int:
        return self._guarded("metrics", lambda: adapter.http_reply(*operations.scrape(self.policy)))

    def _guarded(self, what: str, work: Callable[[], None]) -> int:
        started = time.perf_counter()
        try:
            work()
        except adapter.MediaRelayError as exc:
            metrics.RTPENGINE_ERRORS.labels(what).inc()
            KSR.err(f"kemi-o365: {what} Call-ID {adapter.call_id()}: {exc}\n")
        except Exception as exc:
            metrics.HANDLER_EXCEPTIONS.labels(what).inc()
            detail = "".join(traceback.format_exception_only(exc)).strip()
            KSR.err(f"kemi-o365: internal error in {what} handler, Call-ID {adapter.call_id()}: {detail}\n")
            KSR.err("kemi-o365: " + traceback.format_exc().replace("\n", "\n  ") + "\n")
            if what == "request":
                adapter.respond_error(500, "Internal Server Error")
                adapter.release_media()
        metrics.handler_seconds(what).observe(time.perf_counter() - started)
        return 1


class _Running:
    """The policy this process runs: kept across app_python.reload, which re-runs mod_init in each
    process (this module itself is not re-imported, only kamailio/sbc.py)."""

    policy: Policy | None = None


def mod_init() -> Kamailio:
    """Called by Kamailio before forking (a bad policy stops it there), and again in each process
    after `kemi-o365 reload` (RPC app_python.reload): then a policy that does not load, or that
    changes what only a restart can change, is refused and the running one stays."""
    running = _Running.policy
    path = os.environ.get(POLICY_ENV)
    if not path:
        KSR.err(f"kemi-o365: {POLICY_ENV} is not set; start with `kemi-o365 run --policy FILE`\n")
        raise RuntimeError(f"{POLICY_ENV} is not set")
    try:
        policy = load_policy(path)
        problems = restart_needed(running, policy) if running is not None else []
        if problems:
            raise PolicyError([Problem(path, 0, "", f"needs a restart, not a reload: {', '.join(problems)}")])
    except PolicyError as exc:
        if running is None:
            KSR.err(f"kemi-o365: refusing to start, the policy is invalid:\n{exc}\n")
            raise
        # A reload must never leave a worker without a handler (app_python3 would retry it on
        # every message): keep the running policy.
        metrics.POLICY_RELOADS.labels("refused").inc()
        KSR.err(f"kemi-o365: reload refused, still running policy {running.version}:\n{exc}\n")
        return Kamailio(running)
    if running is not None:
        metrics.POLICY_RELOADS.labels("ok").inc()
        KSR.info(f"kemi-o365: policy reloaded, version {running.version} -> {policy.version}\n")
    else:
        KSR.info(
            f"kemi-o365: policy {policy.source} version {policy.version} loaded "
            f"({policy.microsoft.profile} profile)\n"
        )
    _Running.policy = policy
    adapter.record_policy(policy.version, str(policy.source))
    return Kamailio(policy)
