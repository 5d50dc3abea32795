"""Read a policy YAML file into a frozen `Policy`, or raise `PolicyError` naming file, line and key.

Rule: this is the only module that reads a policy file. It collects every problem before raising,
so an operator fixes a file in one pass; unknown keys are errors (a typo must not silently fall
back to a default) and get a "did you mean".
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kemi_o365.media import DEFAULT_ANSWER_TO_CUCM, DEFAULT_OFFER_TO_MICROSOFT
from kemi_o365.policy.errors import PolicyError, Problem
from kemi_o365.policy.model import (
    DEFAULT_DROP_HEADERS,
    DEFAULT_REWRITE_HOST,
    DEFAULT_USER_AGENT,
    Cucm,
    ExternalSide,
    FloodLimit,
    InternalSide,
    KamailioSettings,
    Metrics,
    Microsoft,
    NumberRule,
    Numbers,
    Policy,
    Profile,
    Proxy,
    Rtpengine,
    Sbc,
    TlsFiles,
    TopologyHiding,
    Transport,
    header_glob,
)

T = TypeVar("T")

_FQDN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_SIP_URI = re.compile(r"^sip:[^@\s<>]+@[A-Za-z0-9.-]+(:\d+)?$")


class _Invalid(Exception):
    """One value is wrong; raised inside a field reader, recorded by `_Reader.field`."""


class _Reader:
    """Walks the composed YAML tree, converting values and recording problems with their line."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.base = source.absolute().parent
        self.problems: list[Problem] = []
        self.key_lines: dict[str, int] = {}
        """Line of each known key seen, by dotted path: where a problem about its value points."""

    def problem(self, node: Node | None, key: str, message: str) -> None:
        self.problem_at(node.start_mark.line + 1 if node is not None else 0, key, message)

    def problem_at(self, line: int, key: str, message: str) -> None:
        self.problems.append(Problem(str(self.source), line, key, message))

    def line_of(self, *keys: str) -> int:
        """Line of the first of `keys` present in the file (most precise first), else 0."""
        return next((self.key_lines[k] for k in keys if k in self.key_lines), 0)

    def mapping(self, node: Node | None, key: str, allowed: dict[str, bool]) -> dict[str, Node]:
        """Children of a mapping; `allowed` maps each known key to whether it is required."""
        if node is None:
            return {}
        if not isinstance(node, MappingNode):
            self.problem(node, key, f"expected a mapping, got {_kind(node)}")
            return {}
        out: dict[str, Node] = {}
        first: dict[str, int] = {}
        for knode, vnode in node.value:
            name = str(knode.value)
            path = f"{key}.{name}" if key else name
            if name in first:
                self.problem(knode, path, f"duplicate key (first at line {first[name]})")
                continue
            first[name] = knode.start_mark.line + 1
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                tip = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(allowed)}"
                self.problem(knode, path, f"unknown key{tip}")
                continue
            out[name] = vnode
            self.key_lines[path] = first[name]
        # A missing key is reported at its parent's key (`sbc:`), not at whichever sibling comes first.
        parent_line = self.key_lines.get(key, node.start_mark.line + 1)
        for name, required in allowed.items():
            if required and name not in out:
                self.problem_at(parent_line, f"{key}.{name}" if key else name, "missing required key")
        return out

    def field(self, node: Node | None, key: str, convert: Callable[[Node], T], default: T) -> T:
        """Convert one value; on a problem record it and return `default` so checking goes on."""
        if node is None:
            return default
        try:
            return convert(node)
        except _Invalid as exc:
            self.problem(node, key, str(exc))
            return default

    def items(self, node: Node | None, key: str, convert: Callable[[Node], T]) -> tuple[T, ...]:
        if node is None:
            return ()
        if not isinstance(node, SequenceNode):
            self.problem(node, key, f"expected a list, got {_kind(node)}")
            return ()
        out: list[T] = []
        for i, child in enumerate(node.value):
            try:
                out.append(convert(child))
            except _Invalid as exc:
                self.problem(child, f"{key}[{i}]", str(exc))
        return tuple(out)

    def path(self, node: Node) -> Path:
        raw = _string(node)
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self.base / p)


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "an empty value"
    return repr(node.value)


def _scalar(node: Node) -> object:
    if not isinstance(node, ScalarNode):
        raise _Invalid(f"expected a single value, got {_kind(node)}")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def _string(node: Node) -> str:
    value = _scalar(node)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _integer(node: Node, low: int, high: int) -> int:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise _Invalid(f"must be between {low} and {high}, got {value}")
    return value


def _version(node: Node) -> int:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int) or value != 1:
        raise _Invalid(f"unsupported policy version {value!r}; this kemi-o365 reads version 1")
    return 1


def _port(node: Node) -> int:
    return _integer(node, 1, 65535)


def _ip(node: Node) -> str:
    raw = _scalar(node)
    try:
        return str(ipaddress.ip_address(str(raw)))
    except ValueError as exc:
        raise _Invalid(f"expected an IP address, got {raw!r}") from exc


def _network(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    raw = _scalar(node)
    try:
        return ipaddress.ip_network(str(raw), strict=False)
    except ValueError as exc:
        raise _Invalid(f"expected an address or network (CIDR), got {raw!r}") from exc


def _fqdn(node: Node) -> str:
    value = _string(node)
    if not _FQDN.match(value):
        raise _Invalid(f"expected a fully qualified domain name, got {value!r}")
    return value.lower()


def _regex(node: Node) -> re.Pattern[str]:
    value = _string(node)
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise _Invalid(f"bad regular expression {value!r}: {exc}") from exc


def _sip_uri(node: Node) -> str:
    value = _string(node)
    if not _SIP_URI.match(value):
        raise _Invalid(f"expected a SIP URI like 'sip:87000@host.example.com', got {value!r}")
    return value


def _transport(allowed: tuple[Transport, ...]) -> Callable[[Node], Transport]:
    def convert(node: Node) -> Transport:
        value = _string(node).lower()
        if value not in {t.value for t in allowed}:
            raise _Invalid(f"expected one of {', '.join(t.value for t in allowed)}, got {value!r}")
        return Transport(value)

    return convert


def _profile(node: Node) -> Profile:
    value = _string(node)
    try:
        return Profile(value)
    except ValueError as exc:
        raise _Invalid(f"expected one of {', '.join(p.value for p in Profile)}, got {value!r}") from exc


def _readable_file(r: _Reader) -> Callable[[Node], Path]:
    def convert(node: Node) -> Path:
        p = r.path(node)
        try:
            with p.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise _Invalid(f"cannot read {p}: {exc.strerror}") from exc
        return p

    return convert


def _sbc(r: _Reader, node: Node | None) -> Sbc:
    m = r.mapping(
        node, "sbc", {"fqdn": True, "tls": True, "internal": True, "external": True, "flood_limit": False}
    )
    tls = r.mapping(m.get("tls"), "sbc.tls", {"certificate": True, "private_key": True, "ca": True})
    rf = _readable_file(r)
    nowhere = Path("/nonexistent")
    internal = r.mapping(
        m.get("internal"),
        "sbc.internal",
        {"address": True, "port": False, "transports": False, "name": False},
    )
    external = r.mapping(
        m.get("external"),
        "sbc.external",
        {"address": True, "port": False, "advertised_address": False, "tls_versions": False},
    )
    transports = r.items(
        internal.get("transports"), "sbc.internal.transports", _transport((Transport.UDP, Transport.TCP))
    )
    return Sbc(
        fqdn=r.field(m.get("fqdn"), "sbc.fqdn", _fqdn, "invalid.invalid"),
        tls=TlsFiles(
            certificate=r.field(tls.get("certificate"), "sbc.tls.certificate", rf, nowhere),
            private_key=r.field(tls.get("private_key"), "sbc.tls.private_key", rf, nowhere),
            ca=r.field(tls.get("ca"), "sbc.tls.ca", rf, nowhere),
        ),
        internal=InternalSide(
            address=r.field(internal.get("address"), "sbc.internal.address", _ip, "0.0.0.0"),
            port=r.field(internal.get("port"), "sbc.internal.port", _port, 5060),
            transports=transports or (Transport.UDP, Transport.TCP),
            name=r.field(internal.get("name"), "sbc.internal.name", _fqdn, None),
        ),
        external=ExternalSide(
            address=r.field(external.get("address"), "sbc.external.address", _ip, "0.0.0.0"),
            port=r.field(external.get("port"), "sbc.external.port", _port, 5061),
            advertised_address=r.field(
                external.get("advertised_address"), "sbc.external.advertised_address", _ip, None
            ),
            tls_versions=_tls_versions(r, external.get("tls_versions")),
        ),
        flood_limit=_flood_limit(r, m.get("flood_limit")),
    )


def _flood_limit(r: _Reader, node: Node | None) -> FloodLimit:
    m = r.mapping(node, "sbc.flood_limit", {"requests": False, "per_seconds": False, "ban_seconds": False})
    d = FloodLimit()

    def within(low: int, high: int) -> Callable[[Node], int]:
        return lambda n: _integer(n, low, high)

    key = "sbc.flood_limit"
    return FloodLimit(
        requests=r.field(m.get("requests"), f"{key}.requests", within(1, 100000), d.requests),
        per_seconds=r.field(m.get("per_seconds"), f"{key}.per_seconds", within(1, 60), d.per_seconds),
        ban_seconds=r.field(m.get("ban_seconds"), f"{key}.ban_seconds", within(1, 86400), d.ban_seconds),
    )


TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _tls_version(node: Node) -> str:
    value = _string(node)
    if value not in TLS_VERSIONS:
        raise _Invalid(f"expected one of {', '.join(TLS_VERSIONS)}, got {value!r}")
    return value


def _tls_versions(r: _Reader, node: Node | None) -> tuple[str, ...]:
    if node is None:
        return ("TLSv1.2", "TLSv1.3")
    versions = r.items(node, "sbc.external.tls_versions", _tls_version)
    if not versions:
        if isinstance(node, SequenceNode) and not node.value:
            r.problem(node, "sbc.external.tls_versions", "list at least one TLS version")
        return ("TLSv1.2", "TLSv1.3")
    ordered = tuple(v for v in TLS_VERSIONS if v in versions)
    first, last = TLS_VERSIONS.index(ordered[0]), TLS_VERSIONS.index(ordered[-1])
    if len(ordered) != last - first + 1:
        # Kamailio's tls `method` is one version or a "from X up" range: it cannot skip one.
        r.problem(node, "sbc.external.tls_versions", f"versions must be contiguous, got {', '.join(ordered)}")
    elif ("TLSv1.3" not in ordered and len(ordered) > 1) or ordered == ("TLSv1.3",):
        # Kamailio 5.6's tls `method` is "TLSv1.X" (that one) or "TLSv1.X+" (up to 1.3); nothing else.
        r.problem(
            node,
            "sbc.external.tls_versions",
            "Kamailio 5.6 can accept one version below 1.3, or a range up to TLSv1.3; "
            f"got {', '.join(ordered)}",
        )
    return ordered


def _rtpengine(r: _Reader, node: Node | None) -> Rtpengine:
    m = r.mapping(
        node, "rtpengine", {"control": True, "port_min": False, "port_max": False, "endpoint_learning": False}
    )
    ctl = r.mapping(m.get("control"), "rtpengine.control", {"address": True, "port": True})
    known = len(r.problems)
    port_min = r.field(m.get("port_min"), "rtpengine.port_min", lambda n: _integer(n, 1024, 65535), 30000)
    port_max = r.field(m.get("port_max"), "rtpengine.port_max", lambda n: _integer(n, 1024, 65535), 40000)
    if len(r.problems) == known:  # a wrong bound (or its default) compared with the other says nothing
        _port_range(r, m, port_min, port_max)
    return Rtpengine(
        control_address=r.field(ctl.get("address"), "rtpengine.control.address", _ip, "127.0.0.1"),
        control_port=r.field(ctl.get("port"), "rtpengine.control.port", _port, 22222),
        port_min=port_min,
        port_max=port_max,
        endpoint_learning=r.field(
            m.get("endpoint_learning"), "rtpengine.endpoint_learning", _endpoint_learning, "off"
        ),
    )


def _endpoint_learning(node: Node) -> str:
    value = _string(node)
    if value not in ("heuristic", "delayed", "immediate", "off"):
        raise _Invalid(f"expected heuristic, delayed, immediate or off, got {value!r}")
    return value


def _port_range(r: _Reader, m: dict[str, Node], port_min: int, port_max: int) -> None:
    if port_min > port_max:
        r.problem(
            m.get("port_min") or m.get("port_max"),
            "rtpengine.port_min",
            f"greater than port_max ({port_min} > {port_max})",
        )
    elif port_max - port_min < 3:
        # rtpengine needs RTP+RTCP on each side: 4 ports for one call.
        r.problem(
            m.get("port_max") or m.get("port_min"),
            "rtpengine.port_max",
            "the range must hold at least 4 ports (one call)",
        )


def _cucm(r: _Reader, node: Node | None) -> Cucm:
    m = r.mapping(
        node, "cucm", {"sources": True, "transport": False, "address": False, "port": False, "codecs": False}
    )
    sources = r.items(m.get("sources"), "cucm.sources", _network)
    if isinstance(m.get("sources"), SequenceNode) and not sources and not m["sources"].value:
        r.problem(m.get("sources"), "cucm.sources", "list at least one CUCM address")
    return Cucm(
        sources=sources,
        transport=r.field(
            m.get("transport"), "cucm.transport", _transport((Transport.UDP, Transport.TCP)), Transport.TCP
        ),
        address=r.field(m.get("address"), "cucm.address", _ip, None),
        port=r.field(m.get("port"), "cucm.port", _port, 5060),
        codecs=r.items(m.get("codecs"), "cucm.codecs", _codec) or ("PCMU", "PCMA", "telephone-event"),
    )


def _proxies(r: _Reader, node: Node | None) -> tuple[Proxy, ...]:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode) or not node.value:
        r.problem(node, "microsoft.proxies", "expected a list of at least one Microsoft proxy")
        return ()
    out: list[Proxy] = []
    for i, child in enumerate(node.value):
        key = f"microsoft.proxies[{i}]"
        m = r.mapping(child, key, {"fqdn": True, "port": False, "address": False})
        out.append(
            Proxy(
                fqdn=r.field(m.get("fqdn"), f"{key}.fqdn", _fqdn, "invalid.invalid"),
                port=r.field(m.get("port"), f"{key}.port", _port, 5061),
                address=r.field(m.get("address"), f"{key}.address", _ip, None),
            )
        )
    return tuple(out)


def _microsoft(r: _Reader, node: Node | None) -> Microsoft:
    keys = {
        "profile": True,
        "match": True,
        "to_uri": False,
        "proxies": True,
        "offer_flags": False,
        "answer_flags": False,
        "strip_answer_prefixes": False,
        "sources": False,
        "trusted_names": False,
        "allowed_media": False,
        "numbers": False,
        "x_ms_sbc": False,
        "allow": False,
        "codecs": False,
        "hold": False,
        "options_interval": False,
        "keepalive_interval": False,
    }
    m = r.mapping(node, "microsoft", keys)
    match = r.mapping(m.get("match"), "microsoft.match", {"request_uri_host": True})
    proxies = _proxies(r, m.get("proxies"))
    offer = r.items(m.get("offer_flags"), "microsoft.offer_flags", _string)
    answer = r.items(m.get("answer_flags"), "microsoft.answer_flags", _string)
    return Microsoft(
        profile=r.field(m.get("profile"), "microsoft.profile", _profile, Profile.EXCHANGE_UM),
        match_request_uri_host=r.field(
            match.get("request_uri_host"), "microsoft.match.request_uri_host", _regex, re.compile("(?!)")
        ),
        to_uri=r.field(m.get("to_uri"), "microsoft.to_uri", _sip_uri, None),
        proxies=proxies,
        offer_flags=offer or DEFAULT_OFFER_TO_MICROSOFT,
        answer_flags=answer or DEFAULT_ANSWER_TO_CUCM,
        strip_answer_prefixes=r.items(
            m.get("strip_answer_prefixes"), "microsoft.strip_answer_prefixes", _string
        ),
        sources=r.items(m.get("sources"), "microsoft.sources", _network),
        trusted_names=r.items(m.get("trusted_names"), "microsoft.trusted_names", _name_pattern),
        allowed_media=r.items(m.get("allowed_media"), "microsoft.allowed_media", _media_type) or ("audio",),
        numbers=_numbers(r, m.get("numbers")),
        x_ms_sbc=r.field(m.get("x_ms_sbc"), "microsoft.x_ms_sbc", _header_value, None),
        allow=r.items(m.get("allow"), "microsoft.allow", _sip_method),
        codecs=r.items(m.get("codecs"), "microsoft.codecs", _codec),
        hold=r.field(m.get("hold"), "microsoft.hold", _hold_mode, "passthrough"),
        options_interval=r.field(
            m.get("options_interval"), "microsoft.options_interval", lambda n: _integer(n, 1, 300), 60
        ),
        keepalive_interval=r.field(
            m.get("keepalive_interval"), "microsoft.keepalive_interval", lambda n: _integer(n, 1, 119), 30
        ),
    )


def _codec(node: Node) -> str:
    value = _string(node)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise _Invalid(f"expected a codec name such as PCMU, G722 or telephone-event, got {value!r}")
    return value


def _hold_mode(node: Node) -> str:
    value = _string(node)
    if value not in ("inactive", "passthrough"):
        raise _Invalid(f"expected inactive or passthrough, got {value!r}")
    return value


def _header_value(node: Node) -> str:
    value = _string(node)
    if any(c in value for c in "\r\n\0"):
        raise _Invalid("a header value cannot hold line breaks")
    return value


_METHODS = (
    "INVITE",
    "ACK",
    "CANCEL",
    "BYE",
    "OPTIONS",
    "NOTIFY",
    "REFER",
    "UPDATE",
    "INFO",
    "PRACK",
    "SUBSCRIBE",
)


def _sip_method(node: Node) -> str:
    value = _string(node).upper()
    if value not in _METHODS:
        raise _Invalid(f"expected a SIP method ({', '.join(_METHODS)}), got {value!r}")
    return value


def _numbers(r: _Reader, node: Node | None) -> Numbers:
    m = r.mapping(
        node, "microsoft.numbers", {"to_microsoft": False, "from_microsoft": False, "user_phone": False}
    )
    return Numbers(
        to_microsoft=_number_rules(r, m.get("to_microsoft"), "microsoft.numbers.to_microsoft"),
        from_microsoft=_number_rules(r, m.get("from_microsoft"), "microsoft.numbers.from_microsoft"),
        user_phone=r.field(m.get("user_phone"), "microsoft.numbers.user_phone", _boolean, False),
    )


def _boolean(node: Node) -> bool:
    value = _scalar(node)
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _number_rules(r: _Reader, node: Node | None, key: str) -> tuple[NumberRule, ...]:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        r.problem(node, key, f"expected a list of {{match, replace}} rules, got {_kind(node)}")
        return ()
    out = []
    for i, child in enumerate(node.value):
        at = f"{key}[{i}]"
        m = r.mapping(child, at, {"match": True, "replace": True})
        pattern = r.field(m.get("match"), f"{at}.match", _regex, None)
        replacement = r.field(m.get("replace"), f"{at}.replace", _string, None)
        if pattern is None or replacement is None:
            continue
        try:
            # A group the pattern lacks would fail on the first call it matches: find it at load.
            _check_groups(pattern, replacement)
        except re.error as exc:
            r.problem(m.get("replace"), f"{at}.replace", f"does not fit the pattern: {exc}")
            continue
        out.append(NumberRule(pattern, replacement))
    return tuple(out)


def _check_groups(pattern: re.Pattern[str], replacement: str) -> None:
    for ref in re.findall(r"\\(\d+)|\\g<(\d+)>", replacement):
        number = int(ref[0] or ref[1])
        if number > pattern.groups:
            raise re.error(f"invalid group reference {number} (the pattern has {pattern.groups})")


def _name_pattern(node: Node) -> str:
    value = _string(node).lower()
    if not _FQDN.match(value.removeprefix("*.")):
        raise _Invalid(f"expected a host name or '*.domain', got {value!r}")
    return value


def _media_type(node: Node) -> str:
    value = _string(node).lower()
    if value not in ("audio", "video", "image", "application", "text"):
        raise _Invalid(f"expected an SDP media type (audio, video, image, ...), got {value!r}")
    return value


def _kamailio(r: _Reader, node: Node | None) -> KamailioSettings:
    m = r.mapping(
        node,
        "kamailio",
        {
            "children": False,
            "log_level": False,
            "rtpengine_timeout_ms": False,
            "shared_memory_mb": False,
            "private_memory_mb": False,
        },
    )
    return KamailioSettings(
        children=r.field(m.get("children"), "kamailio.children", lambda n: _integer(n, 1, 64), 4),
        log_level=r.field(m.get("log_level"), "kamailio.log_level", lambda n: _integer(n, -5, 3), 2),
        rtpengine_timeout_ms=r.field(
            m.get("rtpengine_timeout_ms"),
            "kamailio.rtpengine_timeout_ms",
            lambda n: _integer(n, 50, 5000),
            500,
        ),
        shared_memory_mb=r.field(
            m.get("shared_memory_mb"), "kamailio.shared_memory_mb", lambda n: _integer(n, 64, 65536), 256
        ),
        private_memory_mb=r.field(
            m.get("private_memory_mb"), "kamailio.private_memory_mb", lambda n: _integer(n, 8, 1024), 16
        ),
    )


_HEADER_NAME = re.compile(r"[A-Za-z0-9!%*_+`'~.-]+")
# Never configurable: the SIP core of the call. Via, Call-ID, Contact and Record-Route are hidden
# by kemi_o365.topology itself; dropping any of these would break the call, not hide it.
_CORE_HEADERS = frozenset(
    {
        "via",
        "call-id",
        "contact",
        "record-route",
        "route",
        "from",
        "to",
        "cseq",
        "max-forwards",
        "content-type",
        "content-length",
        "v",
        "i",
        "m",
        "f",
        "t",
        "c",
        "l",
    }
)


def _header_name(node: Node) -> str:
    value = _string(node).lower()
    if not _HEADER_NAME.fullmatch(value):
        raise _Invalid(f"expected a header name (letters, digits, '-', '*' as wildcard), got {value!r}")
    if value in _CORE_HEADERS or (
        value.endswith("*") and any(h.startswith(value[:-1]) for h in _CORE_HEADERS)
    ):
        raise _Invalid(f"{value!r} is part of the SIP dialog and cannot be dropped or rewritten")
    return value


def _topology(r: _Reader, node: Node | None, private_key: Path) -> TopologyHiding:
    m = r.mapping(
        node, "topology_hiding", {"drop_headers": False, "rewrite_host": False, "user_agent": False}
    )
    drop = r.items(m.get("drop_headers"), "topology_hiding.drop_headers", _header_name)
    if m.get("drop_headers") is None:
        drop = DEFAULT_DROP_HEADERS
    rewrite = r.items(m.get("rewrite_host"), "topology_hiding.rewrite_host", _header_name)
    if m.get("rewrite_host") is None:
        rewrite = DEFAULT_REWRITE_HOST
    both = sorted(set(drop) & set(rewrite))
    if both:
        r.problem(
            m.get("rewrite_host"), "topology_hiding.rewrite_host", f"{both[0]!r} is also in drop_headers"
        )
    agent: str | None = DEFAULT_USER_AGENT
    if "user_agent" in m:
        # null keeps CUCM's own User-Agent/Server (some operators want Microsoft to see the PBX).
        agent = (
            None
            if _scalar(m["user_agent"]) is None
            else r.field(m.get("user_agent"), "topology_hiding.user_agent", _header_value, DEFAULT_USER_AGENT)
        )
    return TopologyHiding(
        key=_masking_key(private_key),
        drop=header_glob(drop),
        drop_names=drop,
        rewrite_host=frozenset(rewrite),
        user_agent=agent,
    )


def _metrics(r: _Reader, node: Node | None) -> Metrics | None:
    if node is None:
        return None
    m = r.mapping(node, "metrics", {"address": True, "port": True, "rtpengine_port": False})
    return Metrics(
        address=r.field(m.get("address"), "metrics.address", _ip, "127.0.0.1"),
        port=r.field(m.get("port"), "metrics.port", _port, 9095),
        rtpengine_port=r.field(m.get("rtpengine_port"), "metrics.rtpengine_port", _port, None),
    )


def _masking_key(private_key: Path) -> bytes:
    """64 bytes (MAC and stream keys of topology.Masker) derived from the SBC's private key: the same
    in every worker and after a restart, as secret as the key itself, and no extra file to deploy.
    BLAKE2b, not OpenSSL's hashes: see topology.Masker."""
    try:
        material = private_key.read_bytes()
    except OSError:
        material = b""  # already reported as sbc.tls.private_key
    return hashlib.blake2b(material, digest_size=64, person=b"kemi-o365 topo").digest()


def _cross_checks(r: _Reader, policy: Policy) -> None:
    sbc = policy.sbc
    if sbc.internal.address == sbc.external.address and sbc.internal.port == sbc.external.port:
        r.problem_at(
            r.line_of("sbc.external.port", "sbc.external.address"),
            "sbc.external.port",
            "the internal and external listeners use the same address and port",
        )
    rtp = policy.rtpengine
    sip_ports = {sbc.internal.port, sbc.external.port}
    clash = sorted(p for p in sip_ports if rtp.port_min <= p <= rtp.port_max)
    if clash:
        r.problem_at(
            r.line_of("rtpengine.port_min", "rtpengine"),
            "rtpengine.port_min",
            f"media port range overlaps SIP port {clash[0]}",
        )
    if policy.microsoft.profile is Profile.EXCHANGE_UM and policy.microsoft.to_uri is None:
        # Seed 000: Exchange UM answers 488 unless To carries the forwarding address.
        r.problem_at(
            r.line_of("microsoft.profile", "microsoft"),
            "microsoft.to_uri",
            "the exchange-um profile needs the UM forwarding address (to_uri: sip:<pilot>@<forwarding host>)",
        )


@contextmanager
def _parse_errors(source: Path) -> Iterator[None]:
    try:
        yield
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        message = f"YAML syntax error: {exc.problem or exc}"
        if exc.context and exc.context_mark and exc.problem_mark:
            # The problem is often found lines after its cause (an unclosed bracket or quote).
            message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        raise PolicyError([Problem(str(source), line, "", message)]) from exc


def parse_policy(text: str, source: Path) -> Policy:
    """Build a Policy from YAML text; `source` names the file in errors and anchors relative paths."""
    with _parse_errors(source):
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    r = _Reader(source)
    if root is None or (isinstance(root, ScalarNode) and root.tag == "tag:yaml.org,2002:null"):
        raise PolicyError([Problem(str(source), 1, "", "the file is empty")])
    top = r.mapping(
        root,
        "",
        {
            "version": True,
            "sbc": True,
            "rtpengine": True,
            "cucm": True,
            "microsoft": True,
            "kamailio": False,
            "topology_hiding": False,
            "metrics": False,
        },
    )
    version = r.field(top.get("version"), "version", _version, 1)
    sbc = _sbc(r, top.get("sbc"))
    policy = Policy(
        source=source.absolute(),
        sbc=sbc,
        rtpengine=_rtpengine(r, top.get("rtpengine")),
        cucm=_cucm(r, top.get("cucm")),
        microsoft=_microsoft(r, top.get("microsoft")),
        kamailio=_kamailio(r, top.get("kamailio")),
        topology=_topology(r, top.get("topology_hiding"), sbc.tls.private_key),
        metrics=_metrics(r, top.get("metrics")),
    )
    del version  # only one schema version exists; the key is required so the next one can be told apart
    if not r.problems:
        _cross_checks(r, policy)
    if r.problems:
        # Checked section by section; reported in file order, as the operator reads the file.
        raise PolicyError(sorted(r.problems, key=lambda p: p.line))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()
    return dataclasses.replace(policy, warnings=_warnings(policy), version=digest)


def _warnings(policy: Policy) -> tuple[str, ...]:
    out = []
    old = [v for v in policy.sbc.external.tls_versions if v in ("TLSv1", "TLSv1.1")]
    if old:
        out.append(
            f"{policy.source}: sbc.external.tls_versions: {', '.join(old)} accepted; "
            "Microsoft enforces TLS 1.2 since 2022-04-03, keep older versions only for a legacy peer"
        )
    if policy.cucm.address is None:
        out.append(f"{policy.source}: cucm.address is not set: calls and NOTIFYs Microsoft starts get 404")
    return tuple(out)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([Problem(str(source), 0, "", f"cannot read the policy: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(str(source), 0, "", f"not UTF-8 text: {exc.reason}")]) from exc
    return parse_policy(text, source)
