"""The policy as typed, frozen data: built once at start-up (or reload), read on every message.

Rule: nothing here does I/O or knows about YAML; `load.py` builds these objects and is the only
place a policy file is read.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path


class Profile(enum.StrEnum):
    """Which Microsoft service the Microsoft side speaks to."""

    EXCHANGE_UM = "exchange-um"
    """Exchange Online Unified Messaging (the seeds; retired by Microsoft in 2020)."""
    TEAMS_DIRECT_ROUTING = "teams-direct-routing"
    """Microsoft Teams Direct Routing (today's service)."""


class Transport(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True)
class TlsFiles:
    certificate: Path
    """PEM certificate the SBC presents, as server and as client (mutual TLS)."""
    private_key: Path
    """PEM private key of that certificate."""
    ca: Path
    """PEM bundle of the CAs the SBC trusts for the Microsoft side."""


@dataclass(frozen=True)
class InternalSide:
    """The CUCM-facing listener."""

    address: str
    """IP address the SBC listens on toward CUCM."""
    port: int
    """SIP port toward CUCM (UDP and TCP share it)."""
    transports: tuple[Transport, ...]
    """Transports CUCM may use (udp, tcp)."""
    name: str | None = None
    """Host name CUCM reaches the SBC by (its trunk destination). Used in the inbound Record-Route,
    which Microsoft sees too: Teams refuses an IP there (MICROSOFT-NOTES §1.4). None: the address."""


@dataclass(frozen=True)
class ExternalSide:
    """The Microsoft-facing TLS listener."""

    address: str
    """IP address the SBC listens on toward Microsoft (behind NAT: the private one)."""
    port: int
    """TLS port toward Microsoft (5061 in production)."""
    advertised_address: str | None
    """Public IP that NAT maps to `address`; written into SDP toward Microsoft."""
    tls_versions: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    """TLS versions the listener accepts from Microsoft (contiguous; older than 1.2 only on request)."""


@dataclass(frozen=True)
class FloodLimit:
    """Sources the policy does not know (anything but CUCM on the CUCM side) are limited by pike."""

    requests: int = 16
    per_seconds: int = 2
    """More than `requests` in `per_seconds` (pike's sampling unit) from one address is a flood..."""
    ban_seconds: int = 300
    """...and that address is then ignored (no answer at all) for this long."""


@dataclass(frozen=True)
class Sbc:
    fqdn: str
    """The SBC's public DNS name: certificate subject, Record-Route/Via toward Microsoft."""
    tls: TlsFiles
    internal: InternalSide
    external: ExternalSide
    flood_limit: FloodLimit = FloodLimit()


@dataclass(frozen=True)
class Rtpengine:
    control_address: str
    """Address of rtpengine's ng control socket (UDP)."""
    control_port: int
    """Port of rtpengine's ng control socket."""
    port_min: int
    """First UDP port rtpengine relays media on."""
    port_max: int
    endpoint_learning: str = "off"
    """rtpengine --endpoint-learning. "off": media is taken only from the address and port each SDP
    gave (strict-source drops the rest from the first packet); "heuristic" learns in the first
    seconds, for peers behind NAT, and lets anything through while it learns."""
    """Last UDP port rtpengine relays media on (4 ports per concurrent call)."""


@dataclass(frozen=True)
class Cucm:
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    """Networks CUCM sends from; requests from anyone else are refused with 403."""
    transport: Transport
    """Transport CUCM uses toward the SBC, and the SBC toward CUCM."""
    address: str | None = None
    """Where requests Microsoft starts (Play on Phone, MWI NOTIFY) are sent; None: they get 404."""
    port: int = 5060
    """CUCM's SIP port for those requests."""
    codecs: tuple[str, ...] = ("PCMU", "PCMA", "telephone-event")
    """Codecs offered to CUCM (rtpengine strips the rest): Microsoft's offers list SILK, G.722,
    Opus... and ICE candidates; trimmed, they fit a UDP leg (MICROSOFT-NOTES §1.5)."""


@dataclass(frozen=True)
class Proxy:
    """One Microsoft SIP proxy, tried in order."""

    fqdn: str
    """Name used in the Request-URI, for TLS SNI and to verify Microsoft's certificate."""
    port: int
    """TLS port (5061)."""
    address: str | None
    """Pinned IP (a lab, or a site without DNS); TLS still verifies `fqdn`."""


@dataclass(frozen=True)
class NumberRule:
    """Rewrite a number that fully matches `pattern` into `replacement` (with \\1 group references)."""

    pattern: re.Pattern[str]
    replacement: str


@dataclass(frozen=True)
class Numbers:
    to_microsoft: tuple[NumberRule, ...] = ()
    """CUCM's called and calling numbers -> what Microsoft expects (E.164 with '+' for Teams)."""
    from_microsoft: tuple[NumberRule, ...] = ()
    """Microsoft's called number -> CUCM's dial plan (DID -> extension); the caller's E.164 stays."""
    user_phone: bool = False
    """Add ;user=phone to the Request-URI and From toward Microsoft (recommended for Teams)."""


@dataclass(frozen=True)
class Microsoft:
    profile: Profile
    match_request_uri_host: re.Pattern[str]
    """Calls from CUCM whose Request-URI host matches go to Microsoft (the seed's SRV name)."""
    to_uri: str | None
    """Exchange UM: the forwarding address written into the To header (Microsoft answers 488
    otherwise). None (Teams): To carries the called number at the proxy's FQDN."""
    proxies: tuple[Proxy, ...]
    offer_flags: tuple[str, ...]
    """rtpengine flags for an offer from CUCM toward Microsoft (RTP -> SRTP)."""
    answer_flags: tuple[str, ...]
    """rtpengine flags for Microsoft's answer back toward CUCM (SRTP -> RTP)."""
    strip_answer_prefixes: tuple[str, ...]
    """SDP lines with these prefixes are removed from Microsoft's SDP before rtpengine sees it."""
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Networks Microsoft connects from; empty: any address with a verified certificate."""
    trusted_names: tuple[str, ...] = ()
    """Certificate names accepted from Microsoft's TLS clients (`*.x` = one label); empty: the proxies."""
    allowed_media: tuple[str, ...] = ("audio",)
    """Media types offered to Microsoft; other m= lines from CUCM are disabled (port 0)."""
    numbers: Numbers = Numbers()
    x_ms_sbc: str | None = None
    """Value of the X-MS-SBC header toward Microsoft ("Vendor/Model/Version"); None: not sent."""
    keepalive_interval: int = 30
    """Seconds between CRLF keep-alives on the SBC's TLS connections to Microsoft (idle timeout 2 min)."""
    options_interval: int = 60
    """Seconds between OPTIONS pings to each proxy (Microsoft demotes a trunk silent for 5 minutes)."""
    codecs: tuple[str, ...] = ()
    """Codecs offered to Microsoft (rtpengine strips the rest); empty: CUCM's offer as it is."""
    hold: str = "passthrough"
    """"inactive": hold offers toward Microsoft carry a=inactive, never sendonly/recvonly or
    c=0.0.0.0 (Teams, MICROSOFT-NOTES §1.5); "passthrough": as CUCM sent them."""
    allow: tuple[str, ...] = ()
    """Allow header toward Microsoft on INVITEs; empty: CUCM's is kept. Without REFER, Microsoft
    performs transfers itself (MICROSOFT-NOTES §1.5)."""

    def accepts_peer_name(self, name: str) -> bool:
        """Whether a verified certificate name belongs to Microsoft (RFC 6125 §6.4.3 one-label wildcard)."""
        name = name.lower().rstrip(".")
        for pattern in self.trusted_names or tuple(p.fqdn for p in self.proxies):
            if pattern.startswith("*."):
                head, _, rest = name.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


# Cisco's own headers name CUCM, its devices and addresses; Microsoft ignores them.
DEFAULT_DROP_HEADERS = ("remote-party-id", "call-info", "cisco-guid", "x-cisco-*", "p-preferred-identity")
# Identity headers Microsoft may read: the user part stays, the host becomes the SBC FQDN.
DEFAULT_REWRITE_HOST = ("p-asserted-identity", "diversion", "referred-by", "history-info")
DEFAULT_USER_AGENT = "kemi-o365"


def header_glob(names: tuple[str, ...]) -> re.Pattern[str]:
    """Lower-case header names with '*' wildcards as one pattern (compiled once, at load)."""
    parts = [re.escape(n.lower()).replace(r"\*", ".*") for n in names]
    return re.compile("|".join(parts) if parts else "(?!)")


_DEFAULT_DROP = header_glob(DEFAULT_DROP_HEADERS)


@dataclass(frozen=True)
class TopologyHiding:
    """What of CUCM's side never reaches Microsoft (kemi_o365.topology does the work)."""

    key: bytes = field(repr=False)
    """Key masking Call-IDs and CUCM's Contact (topology.Masker), derived from the SBC's private key."""
    drop: re.Pattern[str] = _DEFAULT_DROP
    """Headers removed toward Microsoft (lower-case names, wildcards)."""
    drop_names: tuple[str, ...] = DEFAULT_DROP_HEADERS
    rewrite_host: frozenset[str] = frozenset(DEFAULT_REWRITE_HOST)
    """Headers whose sip: URIs get the SBC FQDN as host toward Microsoft."""
    user_agent: str | None = DEFAULT_USER_AGENT
    """User-Agent/Server toward Microsoft instead of CUCM's (product and version); None keeps it."""


@dataclass(frozen=True)
class KamailioSettings:
    children: int
    """SIP worker processes for the UDP listener, and readers for CUCM's TCP connections (TLS has
    one reader whatever this says: kamailio.cfg explains why)."""
    log_level: int
    """Kamailio `debug` level (-5..3; 2 = info)."""
    rtpengine_timeout_ms: int
    """How long a worker waits for rtpengine before the call fails fast."""
    shared_memory_mb: int = 256
    """Kamailio's shared memory pool (-m): transactions live there until their wait timer ends (5 s
    after the final reply), so it grows with calls per second; Kamailio's own default of 64 MB runs
    out near 400 calls/s and answers 500/477."""
    private_memory_mb: int = 16
    """Each Kamailio process's private pool (-M)."""


@dataclass(frozen=True)
class Metrics:
    """Where Prometheus scrapes the SBC (Kamailio's xhttp) and rtpengine (its own --listen-http)."""

    address: str
    port: int
    rtpengine_port: int | None = None


@dataclass(frozen=True)
class Policy:
    """Everything the SBC knows about its site, read from one YAML file."""

    source: Path
    sbc: Sbc
    rtpengine: Rtpengine
    cucm: Cucm
    microsoft: Microsoft
    kamailio: KamailioSettings
    topology: TopologyHiding
    metrics: Metrics | None = None
    """None: no metrics listener."""
    version: str = ""
    """A digest of the file's text: tells which policy each process runs (`kemi-o365 status`)."""
    warnings: tuple[str, ...] = ()
    """Legal but risky settings, shown by `policy check` (e.g. TLS older than 1.2)."""
