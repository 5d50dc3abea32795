"""Routing decisions: pure functions of (message facts, policy) -> decision.

Rule: pure. This module may not import KSR, open files or sockets, read the clock or log; the
adapter gathers the facts and carries the decision out.
"""

from __future__ import annotations

import ipaddress

from kemi_o365 import topology
from kemi_o365.decision import (
    NO_EDITS,
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
from kemi_o365.media import (
    DEFAULT_ANSWER_TO_MICROSOFT,
    DEFAULT_OFFER_TO_CUCM,
    anonymous_origin,
    codec_flags,
    disable_media,
    flag_string,
    hold_as_inactive,
    strip_lines,
)
from kemi_o365.numbers import translate
from kemi_o365.policy.model import Policy, Proxy, Transport
from kemi_o365.request import Method, Reply, Request, Side

DELETE = Media(MediaAction.DELETE)
MICROSOFT_SET = 1  # dispatcher set of Microsoft's proxies (launch.render_dispatcher_list)

# Microsoft's own failover codes (Set-CsOnlinePSTNGateway FailoverResponseCodes: 408, 503, 504),
# plus tm's 477 when the request could not be sent at all (TLS/TCP connection failure).
FAILOVER_CODES = frozenset({408, 477, 503, 504})


def decide(req: Request, policy: Policy) -> Decision:
    """What to do with one incoming request."""
    refused = _refused(req, policy)
    if refused is not None:
        return refused
    if req.method is Method.CANCEL:
        return RelayCancel(DELETE)
    if req.to_tag:
        return _in_dialog(req, policy)
    if req.method is Method.OPTIONS:
        # Keep-alive pings from CUCM (SIP OPTIONS ping) and from Microsoft: we answer for ourselves,
        # as a UAS that supports no extension (RFC 3261 §8.2.2.3: 420 listing them as Unsupported).
        if req.require:
            return Respond(420, "Bad Extension", (f"Unsupported: {req.require}",))
        return Respond(200, "OK")
    if req.method is Method.ACK:
        return Drop("ACK outside any dialog")
    if req.side is Side.CUCM and req.method is Method.INVITE:
        return _invite_from_cucm(req, policy)
    if req.side is Side.MICROSOFT:
        return _request_from_microsoft(req, policy)
    return Respond(404, "Not Found")


def cucm_ping(source_ip: str, raw_max_forwards: str, require: str, policy: Policy) -> Respond | None:
    """The answer to an OPTIONS ping from CUCM's side (outside a dialog, no body) when it can be
    given from these few facts, the same `decide` would give; None: read the whole request.

    CUCM pings every trunk every few seconds; this keeps each ping to a handful of KSR calls."""
    if not _in_networks(source_ip, policy.cucm.sources):
        return None  # a stranger: the full path logs and refuses it
    if raw_max_forwards and not (raw_max_forwards.isdigit() and int(raw_max_forwards) <= 255):
        return None  # malformed: answered 400 by the full path
    if require:
        return None  # refused with 420 by the full path, which logs every refusal
    return Respond(200, "OK")


def _refused(req: Request, policy: Policy) -> Respond | Drop | None:
    """Who may not send this, or why it cannot go on: checked before anything else is decided."""
    if req.side is Side.UNKNOWN:
        return Respond(403, "Forbidden")
    if req.side is Side.CUCM and not _in_networks(req.source_ip, policy.cucm.sources):
        return Respond(403, "Forbidden")
    if req.side is Side.MICROSOFT and not _microsoft_allowed(req, policy):
        return Respond(403, "Forbidden")
    # RFC 3261 §17.1.1.3: an ACK is never answered.
    ack = req.method is Method.ACK
    if req.malformed:
        # Never forwarded: RFC 3261 §16.3 step 1 (reasonable syntax check) and §21.4.1.
        return (
            Drop(f"malformed ACK: {req.malformed}") if ack else Respond(400, f"Bad Request ({req.malformed})")
        )
    # RFC 3261 §16.3 step 2: a proxy must not forward a request whose Max-Forwards is zero.
    if req.max_forwards == 0 and req.method is not Method.OPTIONS:
        return Drop("ACK with Max-Forwards 0") if ack else Respond(483, "Too Many Hops")
    return None


def flood_limited(side: Side, source_ip: str, policy: Policy) -> bool:
    """Whether pike counts this source: anyone on the CUCM side who is not CUCM. The TLS side is
    closed by mutual TLS (no certificate, no connection); configured peers are never limited."""
    if side is Side.MICROSOFT:
        return False
    return side is Side.UNKNOWN or not _in_networks(source_ip, policy.cucm.sources)


def _in_networks(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    # Sources are few (CUCM's nodes, Microsoft's proxies): each answer is kept, keyed by the networks
    # tuple's identity (hashing IPv4Network objects costs more than the test itself).
    key = (ip, id(networks))
    hit = _MEMBERSHIP.get(key)
    if hit is not None and hit[0] is networks:
        return hit[1]
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        inside = False
    else:
        inside = any(addr in net for net in networks)
    if len(_MEMBERSHIP) >= 4096:
        _MEMBERSHIP.clear()  # a flood of strangers must not grow it without bound
    _MEMBERSHIP[key] = (networks, inside)
    return inside


_MEMBERSHIP: dict[
    tuple[str, int], tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], bool]
] = {}


def _microsoft_allowed(req: Request, policy: Policy) -> bool:
    """Mutual TLS with a verified certificate naming Microsoft, from Microsoft's networks if listed.

    MICROSOFT-NOTES §1.2/§1.6: Microsoft opens its own connections; the certificate is the identity.
    """
    ms = policy.microsoft
    if req.transport is not Transport.TLS or not req.tls_verified:
        return False
    if not any(ms.accepts_peer_name(name) for name in req.tls_peer_names):
        return False
    return not ms.sources or _in_networks(req.source_ip, ms.sources)


# Requests Microsoft starts outside a dialog that CUCM handles: calls (Play on Phone, call answering)
# and message-waiting NOTIFYs (seed 003).
_FROM_MICROSOFT = frozenset({Method.INVITE, Method.NOTIFY})


def _request_from_microsoft(req: Request, policy: Policy) -> Decision:
    cucm = policy.cucm
    if req.method not in _FROM_MICROSOFT:
        return Respond(405, "Method Not Allowed")
    if cucm.address is None:
        return Respond(404, "Not Found")
    transport = cucm.transport.value
    target = f"sip:{cucm.address}:{cucm.port};transport={transport}"
    internal = policy.sbc.internal
    if req.method is Method.NOTIFY:
        media, record_route = None, None
    else:
        if not req.has_sdp:
            return Respond(488, "Not Acceptable Here (no SDP offer)")
        sdp = _toward_cucm(req.sdp, policy)
        flags = (*_offer_to_cucm(policy), "direction=external", "direction=internal")
        media = Media(MediaAction.OFFER, flag_string(flags), sdp)
        suffix = ";transport=tcp" if cucm.transport is Transport.TCP else ""
        record_route = (
            f"{internal.name or internal.address}:{internal.port}{suffix};r2=on",
            f"{policy.sbc.fqdn}:{policy.sbc.external.port};transport=tls;r2=on",
        )
    # Microsoft dials E.164 DIDs (Teams); CUCM wants its own dial plan, e.g. the extension.
    called = translate(req.ruri_user, policy.microsoft.numbers.from_microsoft)
    return RelayToCucm(
        request_uri=f"sip:{called}@{cucm.address}:{cucm.port};transport={transport}",
        destination=target,
        send_socket=f"{transport}:{internal.address}:{internal.port}",
        record_route=record_route,
        media=media,
    )


def _invite_from_cucm(req: Request, policy: Policy) -> Decision:
    ms = policy.microsoft
    if not ms.match_request_uri_host.fullmatch(req.ruri_host):
        return Respond(404, "Not Found")
    if not req.has_sdp:
        # Microsoft does not take delayed offer; CUCM must send SDP (early offer / MTP on the trunk).
        return Respond(488, "Not Acceptable Here (delayed offer: enable early offer on the CUCM trunk)")
    if not topology.via_hides_cleanly(req.headers, req.source_ip):
        return VIA_REFUSED
    proxy = ms.proxies[0]
    numbers = ms.numbers
    called = translate(req.ruri_user, numbers.to_microsoft)
    # Teams wants E.164 with ;user=phone in the Request-URI and From (MICROSOFT-NOTES §1.4).
    phone = ";user=phone" if numbers.user_phone else ""
    # The From host is CUCM's address: Microsoft sees the SBC FQDN (topology hiding), and E.164 for Teams.
    from_uri = f"sip:{translate(req.from_user, numbers.to_microsoft)}@{policy.sbc.fqdn}{phone}"
    edits, stash = _hide_request(
        req,
        policy,
        mask_call_id=True,
        remove=_removed_toward_microsoft(policy),
        add=_added_toward_microsoft(policy),
    )
    return RelayToMicrosoft(
        request_uri=f"sip:{called}@{proxy.fqdn}:{proxy.port};transport=tls{phone}",
        proxy_set=MICROSOFT_SET,
        proxies=len(ms.proxies),
        to_uri=ms.to_uri or f"sip:{called}@{proxy.fqdn}{phone}",
        send_socket=f"tls:{policy.sbc.external.address}:{policy.sbc.external.port}",
        advertised_host=policy.sbc.fqdn,
        advertised_port=policy.sbc.external.port,
        # One entry: Microsoft never sees the internal one, which replies toward CUCM get back
        # (topology.internal_record_route). The marker says "Call-ID masked" on in-dialog requests.
        record_route=f"{policy.sbc.fqdn}:{policy.sbc.external.port};transport=tls;r2=on;{MASKED_DIALOG_PARAM}",
        media=_offer_to_microsoft(req, policy),
        from_uri=from_uri,
        edits=edits,
        stash=stash,
        tls_server_id=proxy.fqdn,
    )


def sbc_contact(policy: Policy) -> str:
    """The SBC's own URI toward Microsoft: Microsoft answers 403 to a Contact with an IP (§1.4)."""
    return f"sip:{policy.sbc.fqdn}:{policy.sbc.external.port};transport=tls"


# The SBC hides CUCM's Via from Microsoft; one that does not name the address it came from cannot be
# hidden (topology.via_hides_cleanly) and is refused rather than leaked.
VIA_REFUSED = Respond(400, "Bad Request (top Via must name the address the request came from)")

# Record-Route parameter of dialogs CUCM started: their Call-ID is masked toward Microsoft.
MASKED_DIALOG_PARAM = "mcid"


def _hide_request(
    req: Request,
    policy: Policy,
    *,
    mask_call_id: bool,
    remove: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
) -> tuple[HeaderEdits, str]:
    """A request from CUCM made fit for Microsoft's eyes; returns the edits and the Via lines to stash."""
    hide = topology.toward_microsoft(req.headers, policy, user_agent_header="User-Agent")
    removed = [*remove, *hide.remove, "Via"]
    added = [*add, *hide.add]
    if mask_call_id:
        removed.append("Call-ID")
        added.append(f"Call-ID: {topology.masker(policy).mask(req.call_id)}")
    contact = _masked_contact(req.headers, policy)
    if contact:
        removed.append("Contact")
        added.append(contact)
    return HeaderEdits(tuple(dict.fromkeys(removed)), tuple(added)), topology.hidden_vias(req.headers)


def _masked_contact(headers: tuple[tuple[str, str], ...], policy: Policy) -> str | None:
    """The SBC's own Contact carrying CUCM's, encrypted (restored from in-dialog Request-URIs)."""
    found = topology.values(headers, "contact")
    if not found:
        return None
    token = topology.masker(policy).mask(topology.contact_uri(found[0]))
    return f"Contact: <{sbc_contact(policy)};{CONTACT_PARAM}={token}>"


# The Contact parameter carrying CUCM's masked Contact (the adapter restores the Request-URI from it).
CONTACT_PARAM = "kemi"


def _removed_toward_microsoft(policy: Policy) -> tuple[str, ...]:
    # Since 2022 Microsoft rejects SBC-originated requests that carry Replaces (MICROSOFT-NOTES §1.4).
    removed = ("Replaces",)
    return (*removed, "Allow") if policy.microsoft.allow else removed


def _added_toward_microsoft(policy: Policy) -> tuple[str, ...]:
    ms = policy.microsoft
    added = []
    if ms.allow:
        added.append(f"Allow: {', '.join(ms.allow)}")
    if ms.x_ms_sbc:
        added.append(f"X-MS-SBC: {ms.x_ms_sbc}")
    return tuple(added)


def _offer_to_microsoft(req: Request, policy: Policy) -> Media:
    ms = policy.microsoft
    edited = anonymous_origin(disable_media(req.sdp, ms.allowed_media))
    flags = (*ms.offer_flags, *codec_flags(ms.codecs))
    if ms.hold == "inactive":
        edited = hold_as_inactive(edited)
        # An RFC 2543 hold (c=0.0.0.0) becomes the SBC's own address; the direction says inactive.
        flags = (*flags, "replace-zero-address")
    return Media(MediaAction.OFFER, flag_string(flags), edited if edited != req.sdp else None)


# Lines Microsoft's media stack adds that CUCM neither needs nor understands; with ICE and extra
# codecs gone they are what keeps a Teams offer above RFC 3261 §18.1.1's 1300 bytes on UDP.
MICROSOFT_ONLY_PREFIXES = ("b=CT:", "a=x-", "a=label:", "a=rtcp-fb:", "a=rtcp-rsize")


def _toward_cucm(sdp: str, policy: Policy) -> str:
    """Microsoft's SDP as rtpengine should see it: its private c= lines and its own extensions gone."""
    return strip_lines(sdp, (*MICROSOFT_ONLY_PREFIXES, *policy.microsoft.strip_answer_prefixes))


def _offer_to_cucm(policy: Policy) -> tuple[str, ...]:
    """Microsoft's offer made plain RTP with only CUCM's codecs: small enough for a UDP leg."""
    return (*DEFAULT_OFFER_TO_CUCM, *codec_flags(policy.cucm.codecs))


def _destination(proxy: Proxy) -> str:
    return f"sip:{proxy.address or proxy.fqdn}:{proxy.port};transport=tls"


def _in_dialog(req: Request, policy: Policy) -> Decision:
    if not req.routed_to_us:
        if req.method is Method.ACK:
            return Drop("ACK with no Route to this SBC")
        # RFC 3261 §16.4 would have us route by Request-URI; an SBC only relays dialogs it recorded.
        return Respond(404, "Not Here")
    toward_microsoft = req.side is Side.CUCM
    if toward_microsoft and not topology.via_hides_cleanly(req.headers, req.source_ip):
        return Drop("ACK whose Via cannot be hidden") if req.method is Method.ACK else VIA_REFUSED
    media = _in_dialog_media(req, policy, toward_microsoft)
    late_offer = req.method is Method.INVITE and not req.has_sdp
    if not toward_microsoft:
        plain = topology.masker(policy).unmask(req.call_id)
        if plain is None:
            return RelayInDialog(media=media, destination=None, advertise=None, late_offer=late_offer)
        return RelayInDialog(
            media=_with_call_id(media, plain),
            destination=None,
            advertise=None,
            late_offer=late_offer,
            edits=HeaderEdits(("Call-ID",), (f"Call-ID: {plain}",)),
            mask_replies=True,
        )
    edits, stash = _hide_request(req, policy, mask_call_id=req.masked_dialog)
    if req.method is Method.ACK:
        stash = ""  # no reply comes back to an ACK: CUCM's Via needs no keeping
    known = next((p for p in policy.microsoft.proxies if p.fqdn == req.ruri_host.lower()), None)
    pinned = known if known is not None and known.address else None
    return RelayInDialog(
        media=media,
        destination=_destination(pinned) if pinned else None,
        advertise=(policy.sbc.fqdn, policy.sbc.external.port),
        late_offer=late_offer,
        edits=edits,
        stash=stash,
        tls_server_id=known.fqdn if known else None,
    )


def _in_dialog_media(req: Request, policy: Policy, toward_microsoft: bool) -> Media | None:
    if req.method is Method.BYE:
        return Media(MediaAction.DELETE, f"call-id={req.call_id}", report=_ng_control(policy))
    if not req.has_sdp:
        return None
    ms = policy.microsoft
    if req.method is Method.INVITE or req.method is Method.UPDATE:
        if toward_microsoft:
            return _offer_to_microsoft(req, policy)
        sdp = _toward_cucm(req.sdp, policy)
        return Media(MediaAction.OFFER, flag_string(_offer_to_cucm(policy)), sdp)
    if req.method is Method.ACK:
        if toward_microsoft:
            return _answer_to_microsoft(req.sdp)
        return Media(MediaAction.ANSWER, flag_string(ms.answer_flags))
    return None


def _answer_to_microsoft(sdp: str) -> Media:
    """CUCM's answer to an offer Microsoft made, its product name taken out of o=."""
    edited = anonymous_origin(sdp)
    return Media(
        MediaAction.ANSWER, flag_string(DEFAULT_ANSWER_TO_MICROSOFT), edited if edited != sdp else None
    )


def on_reply(reply: Reply, policy: Policy, *, initial: bool, late_offer: bool = False) -> ReplyAction:
    """What to do with a response to a request we relayed.

    `initial` tells a response to the dialog-creating INVITE from one to a re-INVITE: a failed
    re-INVITE leaves the call up, so its media session must survive. `late_offer` marks a re-INVITE
    sent without SDP: its 2xx carries the offer (RFC 3264 §4 via RFC 3261 §13.2.1), answered in the ACK.
    """
    edits = _reply_edits(reply, policy, initial=initial)
    if reply.cseq_method is not Method.INVITE and reply.cseq_method is not Method.UPDATE:
        return ReplyAction(None, edits)
    if reply.status >= 300:
        # A failed initial INVITE may still fail over: the failure route releases the media.
        return ReplyAction(None, edits)
    if reply.status < 101:
        return ReplyAction(None, edits)
    provisional = initial and reply.status < 200 and reply.side is Side.MICROSOFT
    media = _reply_media(reply, policy, late_offer) if reply.has_sdp else None
    if reply.side is Side.MICROSOFT:
        media = _with_call_id(media, topology.masker(policy).unmask(reply.call_id))
    return ReplyAction(media, edits, provisional)


def _ng_control(policy: Policy) -> NgControl:
    rtp = policy.rtpengine
    return NgControl(rtp.control_address, rtp.control_port, policy.kamailio.rtpengine_timeout_ms / 1000)


def _with_call_id(media: Media | None, call_id: str | None) -> Media | None:
    """rtpengine keys sessions by the Call-ID it first saw (CUCM's): name it when Microsoft's
    message carries the masked one."""
    if media is None or call_id is None:
        return media
    if "call-id=" not in media.flags:
        return Media(media.action, f"{media.flags} call-id={call_id}", media.sdp, media.report)
    flags = " ".join(
        [*(f for f in media.flags.split() if not f.startswith("call-id=")), f"call-id={call_id}"]
    )
    return Media(media.action, flags, media.sdp, media.report)


def _reply_edits(reply: Reply, policy: Policy, *, initial: bool) -> HeaderEdits:
    """Toward Microsoft: CUCM's network hidden. Toward CUCM: what was hidden on the request put back."""
    masker = topology.masker(policy)
    if reply.side is Side.MICROSOFT:
        if not reply.stash:
            return NO_EDITS
        remove: list[str] = []
        add: list[str] = []
        plain = masker.unmask(reply.call_id)
        if plain is not None:
            remove.append("Call-ID")
            add.append(f"Call-ID: {plain}")
        if initial:
            tcp = "/TCP " in reply.stash.split("\r\n", 1)[0].upper()
            internal = topology.internal_record_route(reply.headers, policy, transport_tcp=tcp)
            if internal:
                add.append(f"Record-Route: {internal}")
        vias = tuple(line for line in reply.stash.split("\r\n") if line)
        return HeaderEdits(tuple(remove), tuple(add), vias)
    if reply.side is not Side.CUCM:
        return NO_EDITS
    hide = topology.toward_microsoft(reply.headers, policy, user_agent_header="Server")
    remove = list(hide.remove)
    add = list(hide.add)
    routes = topology.record_routes_toward_microsoft(reply.headers, policy)
    if routes is not None:
        remove.append("Record-Route")
        add += [f"Record-Route: {r}" for r in routes]
    contact = _masked_contact(reply.headers, policy)
    if contact:
        remove.append("Contact")
        add.append(contact)
    if reply.mask_call_id:
        remove.append("Call-ID")
        add.append(f"Call-ID: {masker.mask(reply.call_id)}")
    return HeaderEdits(tuple(dict.fromkeys(remove)), tuple(add))


def keepalive_targets(policy: Policy) -> tuple[tuple[str, str], ...]:
    """(URI, FQDN) of each Microsoft proxy the SBC keeps its TLS connection to alive with CRLFs."""
    return tuple((f"sip:{p.fqdn}:{p.port};transport=tls", p.fqdn) for p in policy.microsoft.proxies)


def on_failure(branch: FailedBranch, policy: Policy, *, toward_microsoft: bool) -> FailureAction:
    """After a relayed INVITE failed: try the next Microsoft proxy, or give up.

    Microsoft's rules (MICROSOFT-NOTES §1.8): fail over on 408/503/504 and connection failures,
    never on 603 (the user declined), and not once a provisional other than 100 was received.
    """
    if (
        toward_microsoft
        and not branch.canceled
        and not branch.provisional_seen
        and branch.status in FAILOVER_CODES
    ):
        ext = policy.sbc.external
        # MICROSOFT-NOTES §1.5: a 503 with Retry-After means "not this datacentre, for that long".
        hold = branch.retry_after if branch.status == 503 and branch.retry_after else 0
        return Failover(
            f"tls:{ext.address}:{ext.port}", policy.sbc.fqdn, ext.port, len(policy.microsoft.proxies), hold
        )
    return GiveUp(DELETE)


def _reply_media(reply: Reply, policy: Policy, late_offer: bool) -> Media:
    ms = policy.microsoft
    from_microsoft = reply.side is Side.MICROSOFT
    if late_offer:
        if from_microsoft:
            sdp = _toward_cucm(reply.sdp, policy)
            return Media(MediaAction.OFFER, flag_string(_offer_to_cucm(policy)), sdp)
        edited = anonymous_origin(reply.sdp)
        return Media(MediaAction.OFFER, flag_string(ms.offer_flags), edited if edited != reply.sdp else None)
    if from_microsoft:
        sdp = _toward_cucm(reply.sdp, policy)
        return Media(MediaAction.ANSWER, flag_string(ms.answer_flags), sdp)
    return _answer_to_microsoft(reply.sdp)
