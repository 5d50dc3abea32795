"""What the routing core knows about a message: plain frozen facts the adapter reads from Kamailio.

Rule: no behaviour here beyond small derived properties; no KSR, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kemi_o365.policy.model import Transport


class Side(enum.StrEnum):
    """Which of the SBC's listeners a message arrived on."""

    CUCM = "cucm"
    MICROSOFT = "microsoft"
    UNKNOWN = "unknown"


class Method(enum.StrEnum):
    INVITE = "INVITE"
    ACK = "ACK"
    BYE = "BYE"
    CANCEL = "CANCEL"
    OPTIONS = "OPTIONS"
    UPDATE = "UPDATE"
    INFO = "INFO"
    PRACK = "PRACK"
    REFER = "REFER"
    NOTIFY = "NOTIFY"
    SUBSCRIBE = "SUBSCRIBE"
    REGISTER = "REGISTER"
    MESSAGE = "MESSAGE"
    OTHER = "OTHER"

    @classmethod
    def parse(cls, name: str) -> Method:
        try:
            return cls(name)
        except ValueError:
            return cls.OTHER


@dataclass(frozen=True)
class Request:
    """An incoming SIP request, as far as routing cares."""

    method: Method
    ruri_user: str
    ruri_host: str
    from_user: str
    source_ip: str
    source_port: int
    transport: Transport
    side: Side
    to_tag: bool
    """True for requests inside a dialog (RFC 3261 §12.2)."""
    has_sdp: bool
    sdp: str
    max_forwards: int | None
    """Value of Max-Forwards, None when absent."""
    routed_to_us: bool = False
    """For in-dialog requests: the top Route header named this SBC and was consumed (loose_route)."""
    tls_verified: bool = False
    """Over TLS: the client presented a certificate that chains to the configured CA."""
    tls_peer_names: tuple[str, ...] = ()
    """Over TLS: the client certificate's subject CN and first DNS subjectAltName."""
    call_id: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """All headers as (name, value), for requests from CUCM (topology hiding); () otherwise."""
    masked_dialog: bool = False
    """In-dialog from CUCM: the dialog CUCM started, whose Call-ID Microsoft knows masked."""
    malformed: str = ""
    """What makes the request unusable though Kamailio's parser took it (answered 400), or ""."""
    require: str = ""
    """The Require header's option tags, for requests the SBC answers itself (RFC 3261 §8.2.2.3)."""


@dataclass(frozen=True)
class Reply:
    """An incoming SIP response, as far as routing cares."""

    status: int
    cseq_method: Method
    side: Side
    has_sdp: bool
    sdp: str = ""
    call_id: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    stash: str = ""
    """CUCM's Via lines hidden from Microsoft on the request this answers ("" if none)."""
    mask_call_id: bool = False
    """From CUCM, answering a request whose masked Call-ID the SBC restored: mask it again."""
