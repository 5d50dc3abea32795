"""Entry point for Kamailio's app_python3: `mod_init()` returns the handler object.

Rule: each ksr_* method is a few lines: read facts, decide, apply. Every callback returns the int 1
(a None return leaves a pending TypeError that breaks the worker's next message: KAMAILIO-NOTES P2),
and no exception escapes into Kamailio: it is logged with the Call-ID and answered with 500.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

import KSR

from kemi_o365 import ksr_adapter as adapter
from kemi_o365 import routing
from kemi_o365.decision import Respond
from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy

POLICY_ENV = "KEMI_O365_POLICY"


class Kamailio:
    """The object app_python3 calls for every SIP message."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def child_init(self, rank: int) -> int:
        return 0

    def ksr_request_route(self, msg: object) -> int:
        return self._guarded("request", self._request)

    def ksr_reply_route(self, msg: object) -> int:
        # Work is done in tm callbacks; here only replies no transaction knows are stopped: the core
        # would forward them statelessly by their Via, past rtpengine and topology hiding.
        return self._guarded("stray reply", self._stray_reply)

    def ksr_onsend_route(self, msg: object) -> int:
        return 1

    def ksr_onreply_initial(self, msg: object) -> int:
        return self._guarded("reply", lambda: self._reply(initial=True))

    def ksr_onreply_in_dialog(self, msg: object) -> int:
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
        request = adapter.read_request(self.policy)
        decision = routing.decide(request, self.policy)
        if isinstance(decision, Respond) and decision.code >= 400:
            # Refusals are what an operator greps for when a peer "cannot get in".
            KSR.warn(
                f"kemi-o365: {decision.code} {decision.reason} to {request.method} from "
                f"{request.source_ip}:{request.source_port} on the {request.side} side "
                f"(Call-ID {adapter.call_id()})\n"
            )
        adapter.apply(decision)

    def _stray_reply(self) -> None:
        if not adapter.reply_has_transaction():
            adapter.drop_reply()

    def _reply(self, *, initial: bool, late_offer: bool = False) -> None:
        reply = adapter.read_reply(self.policy)
        adapter.apply_reply(routing.on_reply(reply, self.policy, initial=initial, late_offer=late_offer))

    def _failure(self, *, toward_microsoft: bool) -> None:
        branch = adapter.read_failed_branch()
        adapter.apply_failure(routing.on_failure(branch, self.policy, toward_microsoft=toward_microsoft))

    def _guarded(self, what: str, work: Callable[[], None]) -> int:
        try:
            work()
        except adapter.MediaRelayError as exc:
            KSR.err(f"kemi-o365: {what} Call-ID {adapter.call_id()}: {exc}\n")
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(exc)).strip()
            KSR.err(f"kemi-o365: internal error in {what} handler, Call-ID {adapter.call_id()}: {detail}\n")
            KSR.err("kemi-o365: " + traceback.format_exc().replace("\n", "\n  ") + "\n")
            if what == "request":
                adapter.respond_error(500, "Internal Server Error")
                adapter.release_media()
        return 1


def mod_init() -> Kamailio:
    """Called once by Kamailio before forking; a bad policy stops Kamailio here."""
    path = os.environ.get(POLICY_ENV)
    if not path:
        KSR.err(f"kemi-o365: {POLICY_ENV} is not set; start with `kemi-o365 run --policy FILE`\n")
        raise RuntimeError(f"{POLICY_ENV} is not set")
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        KSR.err(f"kemi-o365: refusing to start, the policy is invalid:\n{exc}\n")
        raise
    KSR.info(f"kemi-o365: policy {policy.source} loaded ({policy.microsoft.profile} profile)\n")
    return Kamailio(policy)
