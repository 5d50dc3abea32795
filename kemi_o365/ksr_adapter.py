"""The only module that talks to Kamailio: reads facts through KSR and carries out decisions.

Rule: no routing choices here. Everything that decides lives in `routing`; this module turns
KSR's int return codes into exceptions in one place (`_ok`) and keeps the KSR call order that
Kamailio needs (KAMAILIO-NOTES §1.4, §1.7).
"""

from __future__ import annotations

import os
from typing import Any, assert_never

import KSR

from kemi_o365 import rtpengine_ng, topology
from kemi_o365.decision import (
    Decision,
    Drop,
    FailedBranch,
    Failover,
    FailureAction,
    GiveUp,
    HeaderEdits,
    Media,
    MediaAction,
    NgControl,
    RelayCancel,
    RelayInDialog,
    RelayToCucm,
    RelayToMicrosoft,
    ReplyAction,
    Respond,
)
from kemi_o365.policy.model import Policy, Transport
from kemi_o365.request import Method, Reply, Request, Side
from kemi_o365.routing import CONTACT_PARAM, MASKED_DIALOG_PARAM

# rtpengine reads the SDP from this variable (modparam read_sdp_pv in kamailio.cfg), so the core
# can hand it an edited body; it must therefore be set before every offer and answer.
SDP_PV = "$var(kemi_o365_sdp)"

# CUCM's masked Contact, read back from the Request-URI of Microsoft's in-dialog requests.
CONTACT_TOKEN_PV = f"$(ru{{uri.param,{CONTACT_PARAM}}})"
# Kept with the transaction (AVPs live as long as it): CUCM's Via lines hidden from Microsoft, and
# "mask the Call-ID of CUCM's replies" for requests whose masked Call-ID was restored.
STASH_AVP = "$avp(kemi_o365_via)"
MASK_AVP = "$avp(kemi_o365_mask)"

# tm onreply callbacks: method names on the handler object (kemi.Kamailio), kept as constants so a
# test can check each names a real method (a typo is silent in Kamailio 5.6).
ONREPLY_INITIAL = "ksr_onreply_initial"
ONREPLY_IN_DIALOG = "ksr_onreply_in_dialog"
ONREPLY_LATE_OFFER = "ksr_onreply_late_offer"
FAILURE_MICROSOFT = "ksr_failure_microsoft"
FAILURE_CUCM = "ksr_failure_cucm"
# Remembered per transaction: a provisional other than 100 came from Microsoft (no failover after).
PROVISIONAL_AVP = "$avp(kemi_o365_prov)"
TLS_SNI_XAVP = "$xavp(tls=>server_name)"
# Proxies skipped until their Retry-After runs out (htable in kamailio.cfg; key = the proxy's URI).
HOLD_TABLE = "ms_hold"

# sanity module checks (sanity README §3): 1 R-URI SIP version, 2 R-URI scheme, 4 required headers,
# 32 CSeq method, 64 CSeq value, 128 Content-Length, 256 Expires, 512 Proxy-Require (420 Bad
# Extension: the SBC supports none), 1024 parse URIs, 16384 duplicate tags.
SANITY_MSG_CHECKS = 18407
SANITY_URI_CHECKS = 7
MAX_FORWARDS_DEFAULT = 70


class KsrError(Exception):
    """A KSR call failed; the message names the call so logs say what broke."""


class MediaRelayError(KsrError):
    """rtpengine did not accept an offer or answer."""


def _ok(rc: int, what: str) -> int:
    """KEMI ints: >0 success, <0 failure, 0 'stop' (KAMAILIO-NOTES §1.4, P4)."""
    if rc < 0:
        raise KsrError(f"{what} failed (rc={rc})")
    return rc


def _true(ok: bool, what: str) -> None:
    """Core KEMI functions such as seturi return a Python bool, False on failure."""
    if not ok:
        raise KsrError(f"{what} failed")


def side_of(local_ip: str, local_port: int, policy: Policy) -> Side:
    sbc = policy.sbc
    if local_ip == sbc.internal.address and local_port == sbc.internal.port:
        return Side.CUCM
    if local_ip == sbc.external.address and local_port == sbc.external.port:
        return Side.MICROSOFT
    return Side.UNKNOWN


def _side() -> tuple[str, int]:
    return KSR.pv.gete("$Ri"), int(KSR.pv.geti("$Rp"))


class MalformedBody(ValueError):
    """Headers or a body Python cannot hold as text (bytes that are not UTF-8, RFC 3261 §7.3.1)."""


def _sdp_body() -> tuple[bool, str]:
    if KSR.textops.has_body_type("application/sdp") < 0:
        return False, ""
    try:
        return True, KSR.pv.gete("$rb")
    except UnicodeDecodeError as exc:
        # app_python3 decodes strings as UTF-8 and raises on anything else.
        raise MalformedBody("SDP is not UTF-8 text") from exc


def _malformed(raw_max_forwards: str, sdp: str) -> str:
    if raw_max_forwards and not raw_max_forwards.isdigit():
        return "Max-Forwards is not a number"
    if raw_max_forwards.isdigit() and int(raw_max_forwards) > 255:
        return "Max-Forwards above 255"
    if "\0" in sdp:
        return "NUL byte in the SDP"
    return ""


# Sources pike found flooding, ignored until their entry expires (htable in kamailio.cfg).
BAN_TABLE = "ipban"


def source() -> tuple[str, str, int]:
    """(source IP, local IP, local port): enough to tell a side and a stranger before parsing more."""
    local_ip, local_port = _side()
    return KSR.pv.gete("$si"), local_ip, local_port


def flood_refused(source_ip: str, ban_seconds: int) -> bool:
    """True while `source_ip` is banned, or when pike finds it over the limit now (then banned)."""
    if KSR.htable.sht_gete(BAN_TABLE, source_ip):
        return True
    if KSR.pike.pike_check_req() >= 0:
        return False
    KSR.htable.sht_setxi(BAN_TABLE, source_ip, 1, ban_seconds)
    KSR.warn(f"kemi-o365: flood from {source_ip}: no answers to it for {ban_seconds} s\n")
    return True


def passes_sanity() -> bool:
    """Malformed requests get the sanity module's own reply and go no further."""
    return KSR.sanity.sanity_check(SANITY_MSG_CHECKS, SANITY_URI_CHECKS) > 0


def plain_ping() -> tuple[str, str] | None:
    """For an OPTIONS outside a dialog without a body: (raw Max-Forwards, Require); else None."""
    if not KSR.is_OPTIONS() or KSR.siputils.has_totag() > 0 or KSR.textops.has_body() > 0:
        return None
    return KSR.hdr.gete("Max-Forwards").strip(), KSR.hdr.gete("Require").strip()


def read_request(policy: Policy, source_ip: str, side: Side) -> Request:
    """The request's facts; `source_ip` and `side` are what the handler read first (`source`)."""
    _Ended.pending = None
    to_tag = KSR.siputils.has_totag() > 0
    if to_tag and side is Side.MICROSOFT:
        # Microsoft's in-dialog requests target the SBC's Contact, with CUCM's URI masked in it.
        # Restore it first: a Request-URI naming us would make loose_route assume a strict router
        # upstream (RFC 3261 §16.4) and route by our own Record-Route entry.
        target = topology.masker(policy).unmask(KSR.pv.gete(CONTACT_TOKEN_PV))
        if target is not None:
            _true(KSR.seturi(target), "seturi")
    # loose_route consumes our own Route headers; only in-dialog requests may carry them here.
    routed = to_tag and KSR.rr.loose_route() > 0
    method = Method.parse(KSR.pv.gete("$rm"))
    # CUCM's headers are read for topology hiding, i.e. for what may be relayed toward Microsoft: an
    # OPTIONS outside a dialog is answered here (keep-alive pings, the most frequent request).
    relayable = side is Side.CUCM and (to_tag or method is not Method.OPTIONS)
    try:
        has_sdp, sdp = _sdp_body()
        headers = _headers() if relayable else ()
        body_problem = ""
    except MalformedBody as exc:
        has_sdp, sdp, headers, body_problem = True, "", (), str(exc)
    raw_mf = KSR.hdr.gete("Max-Forwards").strip()
    proto = KSR.pv.gete("$pr").lower()
    verified, names = _tls_peer() if proto == "tls" else (False, ())
    return Request(
        method=method,
        ruri_user=KSR.pv.gete("$rU"),
        ruri_host=KSR.pv.gete("$rd"),
        from_user=KSR.pv.gete("$fU"),
        source_ip=source_ip,
        source_port=int(KSR.pv.geti("$sp")),
        transport=Transport(proto) if proto in ("udp", "tcp", "tls") else Transport.UDP,
        side=side,
        to_tag=to_tag,
        has_sdp=has_sdp,
        sdp=sdp,
        max_forwards=int(raw_mf) if raw_mf.isdigit() else None,
        routed_to_us=routed,
        tls_verified=verified,
        tls_peer_names=names,
        call_id=KSR.pv.gete("$ci"),
        headers=headers,
        # From the Route CUCM sent (ours, as loose_route just found): rr's check_route_param would
        # compile its regex on every call.
        masked_dialog=routed and side is Side.CUCM and topology.route_has_param(headers, MASKED_DIALOG_PARAM),
        malformed=body_problem or _malformed(raw_mf, sdp),
        require=KSR.hdr.gete("Require").strip() if method is Method.OPTIONS else "",
    )


def _headers() -> tuple[tuple[str, str], ...]:
    try:
        return topology.parse_headers(KSR.pv.gete("$msg(hdrs)"))
    except UnicodeDecodeError as exc:
        raise MalformedBody("headers are not UTF-8 text") from exc


def _tls_peer() -> tuple[bool, tuple[str, ...]]:
    """Whether the TLS client's certificate verified, and the names it carries (CN, first DNS SAN)."""
    verified = KSR.tls.is_peer_verified() > 0
    # KSR.tls.cget returns "" for certificate components in 5.6.3 (it calls the PV getter without the
    # component selector), so read the tls module's PVs by their constant names instead.
    names = (KSR.pv.gete("$tls_peer_subject_cn"), KSR.pv.gete("$tls_peer_san_hostname"))
    return verified, tuple(str(n) for n in names if n)


def is_trying() -> bool:
    """A 100 Trying: hop by hop, tm absorbs it and relays nothing (RFC 3261 §16.7), so a reply
    callback has nothing to do with it; one KSR call instead of reading the whole reply."""
    try:
        return KSR.pv.geti("$rs") == 100
    except Exception:
        return False  # the full handler then reports whatever is wrong with the reply


def read_reply(policy: Policy) -> Reply:
    local_ip, local_port = _side()
    side = side_of(local_ip, local_port, policy)
    has_sdp, sdp = _sdp_body()
    stash = KSR.pv.gete(STASH_AVP)
    # The headers are parsed only where topology hiding reads them: every reply going to Microsoft,
    # and a reply going to CUCM whose Record-Route needs the internal entry back.
    wanted = side is Side.CUCM or (side is Side.MICROSOFT and bool(stash))
    return Reply(
        status=int(KSR.pv.geti("$rs")),
        cseq_method=Method.parse(KSR.pv.gete("$rm")),
        side=side,
        has_sdp=has_sdp,
        sdp=sdp,
        call_id=KSR.pv.gete("$ci"),
        headers=_headers() if wanted else (),
        stash=stash,
        mask_call_id=KSR.pv.geti(MASK_AVP) > 0,
    )


def _edit(edits: HeaderEdits) -> None:
    """Header lumps: applied to the message as it leaves (requests and relayed replies alike)."""
    for name in edits.remove:
        KSR.hdr.remove(name)  # absent is fine: nothing to remove
    # One lump each for all added and all inserted lines: every KSR call costs, the lump's length not.
    if edits.add:
        _ok(KSR.hdr.append("\r\n".join(edits.add) + "\r\n"), "hdr.append")
    if edits.insert:
        _ok(KSR.hdr.insert("\r\n".join(edits.insert) + "\r\n"), "hdr.insert")


def _stash(stash: str, mask_replies: bool = False) -> None:
    if stash:
        KSR.pv.sets(STASH_AVP, stash)
    if mask_replies:
        KSR.pv.seti(MASK_AVP, 1)


class _Ended:
    """The delete the current message sent rtpengine (a BYE's), whose reply the call record reads."""

    pending: rtpengine_ng.Pending | None = None
    call_id = ""


def final_media_stats() -> dict[str, Any] | None:
    """What rtpengine counted for the session this message deleted; None when it deleted none or
    rtpengine did not answer. Read once, after the relay: rtpengine worked on the delete meanwhile."""
    pending, _Ended.pending = _Ended.pending, None
    if pending is None:
        return None
    try:
        return pending.reply()
    except (rtpengine_ng.NgError, OSError) as exc:
        KSR.warn(f"kemi-o365: rtpengine delete for Call-ID {_Ended.call_id}: {exc}\n")
        return None


def _delete_reporting(media: Media, ctl: NgControl) -> None:
    # Straight to rtpengine's ng socket rather than through the rtpengine module, whose delete
    # drops the statistics rtpengine sends back (they would cost a query beforehand). Sent now,
    # answered while the BYE is relayed: the worker does not sit idle for the round trip.
    call_id = _flag_value(media.flags, "call-id")
    # With the tags (as the rtpengine module sends them): rtpengine answers with statistics only when
    # it deletes a dialogue by its tags, not for a bare Call-ID.
    message: dict[str, str | int] = {
        "command": "delete",
        "call-id": call_id,
        "from-tag": KSR.pv.gete("$ft"),
        "to-tag": KSR.pv.gete("$tt"),
    }
    _Ended.call_id = call_id
    try:
        _Ended.pending = rtpengine_ng.send_json(ctl.address, ctl.port, message, timeout=ctl.timeout_s)
    except OSError as exc:
        _Ended.pending = None
        KSR.warn(f"kemi-o365: rtpengine delete for Call-ID {call_id}: {exc}\n")


def _flag_value(flags: str, name: str) -> str:
    prefix = name + "="
    return next((f[len(prefix) :] for f in flags.split() if f.startswith(prefix)), "")


def run_media(media: Media) -> None:
    """One rtpengine step; raises MediaRelayError when rtpengine refuses or is unreachable."""
    if media.action is MediaAction.DELETE:
        # A failed delete (session already gone) must not break the signalling path.
        if media.report is not None:
            _delete_reporting(media, media.report)
        elif media.flags:
            KSR.rtpengine.rtpengine_delete(media.flags)
        else:
            KSR.rtpengine.rtpengine_delete0()
        return
    sdp = media.sdp if media.sdp is not None else KSR.pv.gete("$rb")
    KSR.pv.sets(SDP_PV, sdp)
    if media.action is MediaAction.OFFER:
        rc = KSR.rtpengine.rtpengine_offer(media.flags)
    else:
        rc = KSR.rtpengine.rtpengine_answer(media.flags)
    if rc < 0:
        raise MediaRelayError(f"rtpengine_{media.action} failed (rc={rc})")


def _retransmission() -> bool:
    """True when tm already handles this request (a retransmission); the script must stop."""
    if KSR.tmx.t_precheck_trans() > 0:
        KSR.tm.t_check_trans()
        return True
    return KSR.tm.t_check_trans() == 0


def _relay(onreply: str) -> bool:
    KSR.tm.t_on_reply(onreply)
    if KSR.tm.t_relay() < 0:
        # send_reply answers statefully when t_relay created the transaction before failing.
        KSR.sl.send_reply(500, "Server Error (relay failed)")
        return False
    return True


def _relay_to_proxies(tries: int) -> int:
    """Relay to the dispatcher's current Microsoft proxy; when sending fails at once (no TLS
    connection), treat it as the 477 it is and move to the next proxy, at most `tries` times."""
    for _ in range(tries):
        if KSR.htable.sht_gete(HOLD_TABLE, KSR.pv.gete("$du")):
            # This proxy asked for a pause (503 + Retry-After): go on to the next.
            if KSR.dispatcher.ds_next_dst() < 0:
                break
            continue
        _tls_target(KSR.pv.gete("$dd"))
        KSR.tm.t_on_failure(FAILURE_MICROSOFT)
        KSR.tm.t_on_reply(ONREPLY_INITIAL)
        if KSR.tm.t_relay() > 0:
            return RELAYED
        KSR.warn(f"kemi-o365: cannot send to Microsoft proxy {KSR.pv.gete('$dd')}, Call-ID {call_id()}\n")
        KSR.dispatcher.ds_mark_dst_state("ip")
        if KSR.dispatcher.ds_next_dst() < 0:
            break
    KSR.sl.send_reply(503, "No Microsoft Proxy Reachable")
    KSR.rtpengine.rtpengine_delete0()
    return 503


# What apply did: relayed, nothing (a retransmission tm handles, a drop), or the final code the SBC
# answered itself (its own refusal, or a relay that could not be done).
RELAYED = 0
NOTHING = -1


def apply(decision: Decision) -> int:
    """Carry out `decision`; RELAYED, NOTHING, or the status code the SBC answered with."""
    match decision:
        case Respond(code=code, reason=reason, headers=headers):
            for line in headers:
                KSR.hdr.append_to_reply(line + "\r\n")
            KSR.sl.sl_send_reply(code, reason)
            return code
        case Drop():
            # Hop-by-hop ACKs for negative replies belong to a tm transaction, which absorbs them.
            if KSR.is_ACK() and KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return NOTHING
        case RelayToMicrosoft():
            return _relay_to_microsoft(decision)
        case RelayToCucm():
            return _relay_to_cucm(decision)
        case RelayInDialog():
            return _relay_in_dialog(decision)
        case RelayCancel(media=media):
            if KSR.tm.t_check_trans() > 0:
                run_media(media)
                KSR.tm.t_relay()
                return RELAYED
            return NOTHING
        case _:
            assert_never(decision)


def _new_request_with_media(media: Media | None) -> bool:
    """The steps every relayed request starts with; False when tm already handles it (retransmission).

    A media step rtpengine refuses answers 503 here and re-raises, so nothing is relayed."""
    if _retransmission():
        return False
    _ok(KSR.maxfwd.process_maxfwd(MAX_FORWARDS_DEFAULT), "process_maxfwd")
    if media is not None:
        try:
            run_media(media)
        except MediaRelayError:
            KSR.sl.sl_send_reply(503, "Media Relay Unavailable")
            raise
    return True


def _relay_to_microsoft(d: RelayToMicrosoft) -> int:
    if not _new_request_with_media(d.media):
        return NOTHING
    # uac first: with one Record-Route entry (double_rr expects two once RR is done), its restore
    # parameters must wait in rr's buffer (512 bytes) for record_route_preset_one to take them.
    replaced = KSR.uac.uac_replace_to_uri(d.to_uri) > 0
    if replaced and d.from_uri is not None:
        replaced = KSR.uac.uac_replace_from_uri(d.from_uri) > 0
    if not replaced:
        # Only From/To URIs hundreds of bytes long get here (RFC 4475 longreq), never CUCM's.
        KSR.sl.sl_send_reply(400, "Bad Request (From or To URI too long to relay)")
        KSR.rtpengine.rtpengine_delete0()
        return 400
    _ok(KSR.rr.record_route_preset_one(d.record_route), "record_route_preset_one")
    _edit(d.edits)
    _stash(d.stash)
    _true(KSR.seturi(d.request_uri), "seturi")
    # Algorithm 8: the active proxy with the highest priority becomes the next hop ($du); the
    # Request-URI stays as routing built it (E.164, ;user=phone).
    if KSR.dispatcher.ds_select_dst(d.proxy_set, 8) < 0:
        KSR.sl.sl_send_reply(503, "No Microsoft Proxy Available")
        KSR.rtpengine.rtpengine_delete0()
        return 503
    _ok(KSR.corex.set_send_socket(d.send_socket), "set_send_socket")
    # Via toward Microsoft names the SBC FQDN; the listener itself has no resolvable advertise.
    _ok(KSR.set_advertised_address(d.advertised_host), "set_advertised_address")
    _ok(KSR.set_advertised_port(str(d.advertised_port)), "set_advertised_port")
    return _relay_to_proxies(d.proxies)


def _relay_to_cucm(d: RelayToCucm) -> int:
    if not _new_request_with_media(d.media):
        return NOTHING
    if d.record_route is not None:
        _ok(KSR.rr.record_route_preset(d.record_route[0], d.record_route[1]), "record_route_preset")
    _true(KSR.seturi(d.request_uri), "seturi")
    _true(KSR.setdsturi(d.destination), "setdsturi")
    _ok(KSR.corex.set_send_socket(d.send_socket), "set_send_socket")
    KSR.tm.t_on_failure(FAILURE_CUCM)
    return RELAYED if _relay(ONREPLY_INITIAL) else 500


def _relay_in_dialog(d: RelayInDialog) -> int:
    if KSR.is_ACK():
        if d.media is not None:
            run_media(d.media)
        _next_hop(d)
        KSR.tm.t_relay()
        return RELAYED
    if not _new_request_with_media(d.media):
        return NOTHING
    _next_hop(d)
    if d.late_offer:
        return RELAYED if _relay(ONREPLY_LATE_OFFER) else 500
    return RELAYED if _relay(ONREPLY_IN_DIALOG) else 500


def _next_hop(d: RelayInDialog) -> None:
    _edit(d.edits)
    _stash(d.stash, d.mask_replies)
    if d.tls_server_id is not None:
        _tls_target(d.tls_server_id)
    if d.destination:
        _true(KSR.setdsturi(d.destination), "setdsturi")
    if d.advertise is not None:
        _advertise(d.advertise)


def _advertise(host_port: tuple[str, int]) -> None:
    _ok(KSR.set_advertised_address(host_port[0]), "set_advertised_address")
    _ok(KSR.set_advertised_port(str(host_port[1])), "set_advertised_port")


def apply_reply(action: ReplyAction) -> None:
    if action.provisional:
        KSR.pv.seti(PROVISIONAL_AVP, 1)
    # Edits first: the reply must reach its side with the right Via and Call-ID even if media fails.
    _edit(action.edits)
    if action.media is not None:
        run_media(action.media)


def read_failed_branch() -> FailedBranch:
    retry = KSR.pv.gete("$T_rpl($hdr(Retry-After))").strip().split(" ", 1)[0]
    return FailedBranch(
        status=int(KSR.pv.geti("$T_reply_code")),
        provisional_seen=KSR.pv.geti(PROVISIONAL_AVP) > 0,
        canceled=KSR.tm.t_is_canceled() > 0,
        retry_after=int(retry) if retry.isdigit() else None,
    )


def apply_failure(action: FailureAction) -> None:
    match action:
        case Failover():
            # The failed proxy goes inactive; the dispatcher's OPTIONS bring it back when it answers.
            KSR.warn(
                f"kemi-o365: Microsoft proxy {KSR.pv.gete('$du')} failed ({KSR.pv.geti('$T_reply_code')}), "
                f"Call-ID {call_id()}: inactive until it answers OPTIONS\n"
            )
            KSR.dispatcher.ds_mark_dst_state("ip")
            if action.hold_s > 0:
                KSR.htable.sht_setxi(HOLD_TABLE, KSR.pv.gete("$du"), 1, action.hold_s)
            if KSR.dispatcher.ds_next_dst() > 0:
                _ok(KSR.corex.set_send_socket(action.send_socket), "set_send_socket")
                _advertise((action.advertised_host, action.advertised_port))
                _relay_to_proxies(action.proxies)
                return
            KSR.rtpengine.rtpengine_delete0()
        case GiveUp(media=media):
            run_media(media)
        case _:
            assert_never(action)


def send_keepalives(targets: tuple[tuple[str, str], ...]) -> None:
    """A double CRLF (RFC 5626 §3.5.1) to each proxy, on the SBC's own connection (opened if needed)."""
    for uri, fqdn in targets:
        _tls_target(fqdn)
        if KSR.corex.send_data(uri, "\r\n\r\n") < 0:
            KSR.warn(f"kemi-o365: CRLF keep-alive to {uri} could not be sent\n")


def add_ping_contact(contact: str) -> None:
    """Our OPTIONS pings carry the SBC's Contact (Microsoft answers 403 without its FQDN) and SNI."""
    if KSR.pv.gete("$rm") == "OPTIONS" and KSR.hdr.is_present("Contact") < 0:
        KSR.hdr.append(f"Contact: <{contact}>\r\n")
        _tls_target(KSR.pv.gete("$rd"))


def _tls_target(fqdn: str) -> None:
    """The TLS client profile for `fqdn` (server_id) and the SNI to send: Kamailio 5.6 takes SNI only
    from the tls xavp (modparam xavp_cfg), not from the profile's server_name."""
    _ok(KSR.tls.set_connect_server_id(fqdn), "tls.set_connect_server_id")
    KSR.pv.sets(TLS_SNI_XAVP, fqdn)


def drop_reply() -> None:
    """Not forwarded statelessly (the core's default for a reply no transaction knows)."""
    KSR.set_drop()


def release_media() -> None:
    """After an internal error: an rtpengine session the request may have opened must not linger."""
    try:
        KSR.rtpengine.rtpengine_delete0()
    except Exception as exc:
        KSR.err(f"kemi-o365: could not release media: {exc}\n")


def respond_error(code: int, reason: str) -> None:
    """Last-resort answer after an internal error; never raises."""
    try:
        if KSR.siputils.is_request() > 0 and not KSR.is_ACK():
            KSR.sl.send_reply(code, reason)
    except Exception as exc:
        KSR.err(f"kemi-o365: could not send {code}: {exc}\n")


def call_id() -> str:
    return KSR.pv.gete("$ci")


# --- operations: metrics, call records, policy version ---------------------------------------------

CALLS_TABLE = "calls"  # htable: Call-ID (CUCM's, unmasked) -> calls.start_state JSON
STATE_TABLE = "kemi_state"  # htable: "policy:<pid>" -> "<version> <file>"


def call_state(call_id: str) -> str:
    return KSR.htable.sht_gete(CALLS_TABLE, call_id)


def set_call_state(call_id: str, state: str) -> None:
    KSR.htable.sht_sets(CALLS_TABLE, call_id, state)


def forget_call(call_id: str) -> None:
    KSR.htable.sht_rm(CALLS_TABLE, call_id)


def record_policy(version: str, source: str) -> None:
    """Which policy this process runs (read by `kemi-o365 status` through htable.dump)."""
    KSR.htable.sht_sets(STATE_TABLE, f"policy:{os.getpid()}", f"{version} {source}")


def diagnostic_headers(in_reply: bool) -> tuple[str, str]:
    """(Reason, ms-diagnostics) of the request, or of the failed branch's reply in a failure route."""
    if in_reply:
        return KSR.pv.gete("$T_rpl($hdr(Reason))"), KSR.pv.gete("$T_rpl($hdr(ms-diagnostics))")
    return KSR.hdr.gete("Reason"), KSR.hdr.gete("ms-diagnostics")


def failed_reply_warning() -> str:
    return KSR.pv.gete("$T_rpl($hdr(Warning))")


def from_tag() -> str:
    return KSR.pv.gete("$ft")


def parties() -> tuple[str, str]:
    """(From URI, To URI) as received."""
    return KSR.pv.gete("$fu"), KSR.pv.gete("$tu")


def proxy_active(set_id: int, uri: str) -> bool:
    return KSR.dispatcher.ds_is_active_uri(set_id, uri) > 0


def http_request() -> tuple[int, str]:
    """(local port, URL path) of the HTTP request xhttp hands over."""
    return int(KSR.pv.geti("$Rp")), KSR.pv.gete("$hu")


def http_reply(code: int, reason: str, content_type: str, body: str) -> None:
    KSR.xhttp.xhttp_reply(code, reason, content_type, body)


def log_info(line: str) -> None:
    KSR.info(line + "\n")


def to_tag() -> str:
    return KSR.pv.gete("$tt")
