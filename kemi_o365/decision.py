"""The closed set of things routing can decide; the adapter carries each one out.

Rule: frozen data only. Adding a kind here must be matched in `ksr_adapter.apply` (mypy's
exhaustive-match check reports it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MediaAction(enum.StrEnum):
    OFFER = "offer"
    ANSWER = "answer"
    DELETE = "delete"


@dataclass(frozen=True)
class NgControl:
    """rtpengine's ng control socket, for a delete whose final statistics the call record keeps."""

    address: str
    port: int
    timeout_s: float


@dataclass(frozen=True)
class Media:
    """One rtpengine operation; `sdp` (when not None) replaces the body rtpengine reads."""

    action: MediaAction
    flags: str = ""
    sdp: str | None = None
    report: NgControl | None = None
    """DELETE only: sent on this socket, and rtpengine's reply (the session's final packet counts)
    kept for the call record; one round trip instead of a query followed by a delete."""


@dataclass(frozen=True)
class HeaderEdits:
    """Header changes on a relayed message: names removed (every instance, compact forms too), whole
    lines appended at the end, and lines inserted before the first header (restored Vias)."""

    remove: tuple[str, ...] = ()
    add: tuple[str, ...] = ()
    insert: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.add or self.insert)


NO_EDITS = HeaderEdits()


@dataclass(frozen=True)
class Respond:
    """Answer the request ourselves; it is not forwarded."""

    code: int
    reason: str
    headers: tuple[str, ...] = ()
    """Whole header lines added to the reply (e.g. Unsupported with a 420)."""


@dataclass(frozen=True)
class Drop:
    """Silently discard (e.g. a stray ACK that matches no transaction)."""

    why: str


@dataclass(frozen=True)
class RelayToMicrosoft:
    """An initial INVITE from CUCM toward Microsoft's proxies, tried in order, over mutual TLS."""

    request_uri: str
    """E.164/;user=phone as Microsoft wants it; the dispatcher only picks the next hop ($du)."""
    proxy_set: int
    """The dispatcher set of Microsoft's proxies (priority order, health from OPTIONS)."""
    proxies: int
    """How many there are: the most proxies one call tries."""
    to_uri: str
    send_socket: str
    advertised_host: str
    advertised_port: int
    record_route: str
    """The SBC's one Record-Route entry toward Microsoft (its internal one is never shown there)."""
    media: Media
    from_uri: str | None
    """A From URI for Microsoft (E.164, SBC host), or None to keep CUCM's."""
    edits: HeaderEdits
    """Topology hiding and Microsoft's header rules: CUCM's Via, Call-ID, Contact and identities."""
    stash: str
    """CUCM's Via lines, kept with the transaction and put back on the replies."""
    tls_server_id: str = ""
    """Selects the TLS client profile whose SNI and verification name is the proxy's FQDN."""


@dataclass(frozen=True)
class RelayToCucm:
    """A request Microsoft starts (Play on Phone INVITE, MWI NOTIFY) toward CUCM."""

    request_uri: str
    destination: str
    send_socket: str
    record_route: tuple[str, str] | None
    """(toward CUCM, toward Microsoft) for dialog-creating requests; None for NOTIFY."""
    media: Media | None


@dataclass(frozen=True)
class RelayInDialog:
    """A request inside a dialog, already loose-routed; `media` is the rtpengine step, if any."""

    media: Media | None
    destination: str | None
    """Next hop when the Request-URI names a pinned Microsoft proxy; None: route by the URI."""
    advertise: tuple[str, int] | None
    """Toward Microsoft, Via carries the SBC FQDN and port as Record-Route did."""
    late_offer: bool = False
    """A re-INVITE without SDP: the offer comes in the 2xx and the answer in the ACK."""
    edits: HeaderEdits = NO_EDITS
    stash: str = ""
    """Toward Microsoft: CUCM's Via lines, put back on the replies."""
    mask_replies: bool = False
    """Toward CUCM in a dialog CUCM started: its replies get the masked Call-ID again."""
    tls_server_id: str | None = None
    """Toward a configured Microsoft proxy: its TLS client profile (SNI = its FQDN)."""


@dataclass(frozen=True)
class RelayCancel:
    """CANCEL of a pending INVITE: relayed statefully, media session released."""

    media: Media


Decision = Respond | Drop | RelayToMicrosoft | RelayToCucm | RelayInDialog | RelayCancel


@dataclass(frozen=True)
class ReplyAction:
    """What to do with a response passing through: an rtpengine step, or nothing."""

    media: Media | None
    edits: HeaderEdits = NO_EDITS
    """Topology hiding toward Microsoft, or what it hid put back toward CUCM."""
    provisional: bool = False
    """A provisional other than 100 from Microsoft: from now on the call must not fail over."""


@dataclass(frozen=True)
class FailedBranch:
    """What tm knows when a relayed INVITE's branch failed (failure route)."""

    status: int
    """The final status (a local 408 when nothing answered; 477 when sending failed)."""
    provisional_seen: bool
    canceled: bool
    retry_after: int | None = None
    """Seconds from the failed answer's Retry-After header (RFC 3261 §20.33), if any."""


@dataclass(frozen=True)
class Failover:
    """Mark the failed proxy inactive (OPTIONS will re-probe it) and try the next one.

    A branch added in the failure route is built afresh: the send socket and the FQDN in Via must
    be set again."""

    send_socket: str
    advertised_host: str
    advertised_port: int
    proxies: int
    hold_s: int = 0
    """Skip the failed proxy for this long (its 503's Retry-After); 0: until OPTIONS succeed."""


@dataclass(frozen=True)
class GiveUp:
    """Let the failure reach the caller; release the media session."""

    media: Media


FailureAction = Failover | GiveUp
